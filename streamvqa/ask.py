"""`streamvqa ask` and `streamvqa answers`: put a question to a stream, follow the answers.

``ask`` publishes a Query (asked now, on the wall clock the producers stamp frames with) and
waits for its Answer on the answers topic, reading only the partition of its stream from where
it ended before the question went out. A stream no frame or audio chunk was ever published for
is refused at once (exit 3), before anything is published; no answer within the timeout exits 4
with a hint (is the pipeline running?). An invalid stream id or question exits 2 with a one-line
error, before anything is read or published (ids: :mod:`streamvqa.cli_ids`).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from streamvqa.schemas import Answer

__all__ = [
    "AskError",
    "UnknownStream",
    "answers_command",
    "ask",
    "ask_command",
    "follow_answers",
    "format_answer",
    "make_query",
    "publish_query",
]


class AskError(RuntimeError):
    """No answer came (the pipeline is not running, or is far behind)."""


class UnknownStream(AskError):
    """No frame or audio of the stream is on the input topics."""


def stream_known(settings, endpoints, stream_id: str) -> bool:
    from streamvqa import connect
    from streamvqa.produce import find_last, partition_for
    from streamvqa.schemas import AudioChunk, Frame

    producer = connect.producer(settings, endpoints)
    try:
        factory = lambda: connect.consumer(settings, endpoints, group_id=None)  # noqa: E731
        for topic, kind in ((settings.topics.frames, Frame), (settings.topics.audio, AudioChunk)):
            partition = partition_for(producer, topic, stream_id.encode())
            if find_last(factory, topic, partition, stream_id, kind, window=5000) is not None:
                return True
        return False
    finally:
        producer.close()


def make_query(
    stream_id: str,
    text: str,
    *,
    image: bytes | None = None,
    image_codec: str | None = None,
    options: tuple[str, ...] | None = None,
    asked_at_us: int | None = None,
    query_id: str | None = None,
):
    """A Query asked now (``asked_at_us``: the wall clock in µs, the producers' timestamp clock)."""
    from streamvqa.schemas import Query

    return Query(
        # the stream id cut so the query id stays within the 128 characters an id may have
        query_id=query_id or f"{stream_id[:115]}-{uuid.uuid4().hex[:12]}",
        stream_id=stream_id,
        text=text,
        asked_at_us=asked_at_us if asked_at_us is not None else time.time_ns() // 1000,
        options=options,
        image=image,
        image_codec=image_codec,
    )


def publish_query(settings, producer, query) -> None:
    """Send a Query to the queries topic, keyed by its stream (validated first)."""
    from streamvqa.schemas import encode

    producer.send(settings.topics.queries, key=query.stream_id.encode(), value=encode(query)).get(timeout=30)


def ask(
    settings,
    stream_id: str,
    text: str,
    *,
    image: bytes | None = None,
    image_codec: str | None = None,
    options: tuple[str, ...] | None = None,
    asked_at_us: int | None = None,
    timeout_s: float = 120.0,
    check_stream: bool = True,
    query_id: str | None = None,
) -> Answer:
    """Publish a question and return its answer (raises UnknownStream / AskError; InvalidField for
    an invalid id or question, before anything is read or published)."""
    from kafka import TopicPartition

    from streamvqa import connect
    from streamvqa.produce import high_watermark, partition_for
    from streamvqa.schemas import decode, encode, validate_id

    validate_id(stream_id, "stream_id")
    if query_id is not None:
        validate_id(query_id, "query_id")
    endpoints = connect.resolve_endpoints(settings)
    if check_stream and not stream_known(settings, endpoints, stream_id):
        raise UnknownStream(
            f"unknown stream {stream_id!r}: nothing of it on {settings.topics.frames} or {settings.topics.audio} "
            "(publish it with `streamvqa produce SOURCE --stream-id ...`)"
        )
    query = make_query(
        stream_id,
        text,
        image=image,
        image_codec=image_codec,
        options=options,
        asked_at_us=asked_at_us,
        query_id=query_id,
    )
    value = encode(query)  # validates: a bad question is refused here, not dead-lettered
    producer = connect.producer(settings, endpoints)
    consumer = connect.consumer(settings, endpoints, group_id=None)
    try:
        tp = TopicPartition(
            settings.topics.answers, partition_for(producer, settings.topics.answers, stream_id.encode())
        )
        consumer.assign([tp])
        start = high_watermark(consumer, tp)
        consumer.seek(tp, start)
        producer.send(settings.topics.queries, key=stream_id.encode(), value=value).get(timeout=30)
        deadline = time.monotonic() + timeout_s
        want = query.query_id.encode()
        while time.monotonic() < deadline:
            for message in consumer.poll(timeout_ms=200).get(tp, []):
                if message.key == want:  # answers are keyed by query id, which two streams may share
                    answer = decode(message.value, Answer)
                    if answer.stream_id == stream_id:
                        return answer
        raise AskError(
            f"no answer to {query.query_id} within {timeout_s:.0f} s: is the pipeline running "
            "(`streamvqa run pipeline`), and has it caught up with the stream?"
        )
    finally:
        producer.close()
        consumer.close()


def follow_answers(
    settings,
    *,
    stream_id: str | None = None,
    from_beginning: bool = True,
    idle_timeout_s: float | None = None,
    stop: threading.Event | None = None,
) -> Iterator[Answer]:
    """Answers as they arrive on the answers topic (all partitions), optionally of one stream;
    until ``idle_timeout_s`` passes without a message, or ``stop`` is set."""
    from kafka import TopicPartition

    from streamvqa import connect
    from streamvqa.produce import high_watermark
    from streamvqa.schemas import SchemaError, decode

    endpoints = connect.resolve_endpoints(settings)
    consumer = connect.consumer(settings, endpoints, group_id=None)
    try:
        topic = settings.topics.answers
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        if not parts:
            raise AskError(f"topic {topic} does not exist (is the stack up?)")
        consumer.assign(parts)
        if not from_beginning:
            for tp in parts:
                consumer.seek(tp, high_watermark(consumer, tp))
        last = time.monotonic()
        while (idle_timeout_s is None or time.monotonic() - last < idle_timeout_s) and not (
            stop and stop.is_set()
        ):
            for messages in consumer.poll(timeout_ms=200).values():
                for message in messages:
                    last = time.monotonic()
                    try:
                        answer = decode(message.value, Answer)
                    except SchemaError:
                        continue
                    if stream_id is None or answer.stream_id == stream_id:
                        yield answer
    finally:
        consumer.close()


def format_answer(answer: Answer) -> str:
    evidence = ", ".join(f"{e.start_us / 1e6:.1f}-{e.end_us / 1e6:.1f} s" for e in answer.evidence) or "none"
    latency = " ".join(f"{s.stage} {s.ms:.0f}" for s in answer.latency)
    return f"{answer.text}\n  evidence: {evidence}\n  latency ms: {latency}\n  [{answer.query_id}, {answer.model_id}]"


def _as_json(answer: Answer) -> str:
    return json.dumps(
        {
            "query_id": answer.query_id,
            "stream_id": answer.stream_id,
            "text": answer.text,
            "model_id": answer.model_id,
            "evidence": [
                {"start_s": e.start_us / 1e6, "end_s": e.end_us / 1e6, "score": e.score}
                for e in answer.evidence
            ],
            "latency_ms": {s.stage: s.ms for s in answer.latency},
        }
    )


def ask_command(
    stream_id: Annotated[str, typer.Argument(help="The stream to ask about.")],
    question: Annotated[str, typer.Argument(help="The question.")],
    image: Annotated[
        Path | None, typer.Option(help="An example image (JPEG/PNG): 'when did this appear?'.")
    ] = None,
    option: Annotated[
        list[str] | None, typer.Option("--option", help="A multiple-choice option (repeat).")
    ] = None,
    timeout: Annotated[float, typer.Option(min=1, help="Seconds to wait for the answer.")] = 120.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the answer as JSON.")] = False,
    data_dir: Annotated[Path | None, typer.Option("--data-dir", help="Project data folder.")] = None,
) -> None:
    """Ask a question about a stream and print the answer (with evidence and latency)."""
    from streamvqa.cli_ids import INVALID_INPUT_EXIT, checked_id
    from streamvqa.schemas import SchemaError
    from streamvqa.settings import Settings

    stream_id = checked_id(stream_id, "STREAM_ID")
    overrides: dict[str, Any] = {"data_dir": data_dir} if data_dir else {}
    settings = Settings(**overrides)
    payload = codec = None
    if image is not None:
        payload = image.read_bytes()
        codec = "png" if payload.startswith(b"\x89PNG") else "jpeg"
    try:
        answer = ask(
            settings,
            stream_id,
            question,
            image=payload,
            image_codec=codec,
            options=tuple(option) if option else None,
            timeout_s=timeout,
        )
    except SchemaError as err:  # the question itself is invalid (blank, too long, a bad image)
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(INVALID_INPUT_EXIT) from err
    except UnknownStream as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(3) from err
    except AskError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(4) from err
    typer.echo(_as_json(answer) if as_json else format_answer(answer))


def answers_command(
    stream: Annotated[str | None, typer.Option(help="Only this stream's answers.")] = None,
    new: Annotated[bool, typer.Option("--new", help="Only answers arriving from now on.")] = False,
    idle_timeout: Annotated[float | None, typer.Option(help="Stop after this many idle seconds.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    data_dir: Annotated[Path | None, typer.Option("--data-dir", help="Project data folder.")] = None,
) -> None:
    """Follow the answers topic and print each answer as it arrives."""
    from streamvqa.cli_ids import checked_id
    from streamvqa.settings import Settings

    if stream is not None:
        stream = checked_id(stream, "--stream")
    overrides: dict[str, Any] = {"data_dir": data_dir} if data_dir else {}
    settings = Settings(**overrides)
    for answer in follow_answers(
        settings, stream_id=stream, from_beginning=not new, idle_timeout_s=idle_timeout
    ):
        typer.echo(_as_json(answer) if as_json else f"[{answer.stream_id}] {format_answer(answer)}")
