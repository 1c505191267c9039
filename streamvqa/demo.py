"""`streamvqa demo`: until the full pipeline lands, a real round trip through the stack.

Frames decoded with PyAV from a shipped sample video travel as schema-checked
Arrow messages through Kafka, their JPEG payloads through the object store,
and a deliberately broken frame is turned away with its reason onto the
dead-letter topic.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from kafka import TopicPartition
from rich.console import Console
from rich.table import Table

from streamvqa import connect, media
from streamvqa.infra.local.stack import LocalStack
from streamvqa.schemas import DeadLetter, Frame, Limits, SchemaError, decode, encode, make_dead_letter
from streamvqa.settings import Settings
from streamvqa.storage.keys import content_hash, object_key


@dataclass
class DemoReport:
    stream_id: str
    frames_sent: int = 0
    frames_received: int = 0
    objects_verified: int = 0
    dead_letters: list[str] = field(default_factory=list)
    steps: list[tuple[str, str, float]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (
            self.frames_sent > 0
            and self.frames_received == self.frames_sent
            and self.objects_verified == self.frames_sent
            and len(self.dead_letters) == 1
        )


def limits_from(settings: Settings) -> Limits:
    return Limits(
        max_message_bytes=settings.limits.max_message_bytes,
        max_payload_bytes=settings.limits.max_message_bytes - 64 * 1024,
        max_width=settings.limits.max_frame_side,
        max_height=settings.limits.max_frame_side,
        max_text_chars=settings.limits.max_query_chars,
    )


def run_demo(
    settings: Settings,
    frames: int = 8,
    video: str = "bikes.mp4",
    keep_stack: bool = False,
    console: Console | None = None,
) -> DemoReport:
    console = console or Console()
    stack = LocalStack(settings) if settings.embedded else None
    started_here = False
    report = DemoReport(stream_id=f"demo-{uuid.uuid4().hex[:8]}")

    def step(name: str, detail: str, since: float) -> None:
        report.steps.append((name, detail, time.perf_counter() - since))
        console.log(f"[bold]{name}[/]: {detail}")

    try:
        if stack is not None and not stack.is_up():
            t = time.perf_counter()
            with console.status("starting the embedded stack (SeaweedFS + Tansu)"):
                state = stack.up()
            started_here = True
            step("stack up", f"broker {state.bootstrap_servers} ({state.broker_storage}://), "
                 f"S3 {state.s3_endpoint}", t)
        endpoints = connect.resolve_endpoints(settings)
        limits = limits_from(settings)
        topics = settings.topics

        t = time.perf_counter()
        path = media.sample_video(video)
        records = [
            Frame(
                stream_id=report.stream_id, seq=seq, pts_us=pts_us, codec="jpeg",
                width=rgb.shape[1], height=rgb.shape[0], payload=media.encode_jpeg(rgb),
            )
            for seq, (pts_us, rgb) in enumerate(media.decode_frames(path, limit=frames))
        ]
        step("decode", f"{len(records)} frames of {path.name} with PyAV, JPEG-encoded", t)

        t = time.perf_counter()
        producer = connect.producer(settings, endpoints)
        try:
            for record in records:
                producer.send(topics.frames, key=record.message_key(), value=encode(record))
            # A frame whose JPEG lost its tail, as a flaky camera sends it.
            broken = records[0].payload[: len(records[0].payload) // 2]
            producer.send(topics.frames, key=report.stream_id.encode(), value=_unchecked_frame(records[0], broken))
            producer.flush(timeout=30)
        finally:
            producer.close()
        report.frames_sent = len(records)
        step("produce", f"{len(records)} frames + 1 corrupt frame to {topics.frames}", t)

        t = time.perf_counter()
        received, dead = _consume_stream(settings, endpoints, report.stream_id, len(records) + 1, limits)
        report.frames_received = len(received)
        step("consume", f"{len(received)} valid frames back, in order: "
             f"{[r.seq for r in received] == list(range(len(records)))}", t)

        t = time.perf_counter()
        producer = connect.producer(settings, endpoints)
        try:
            for letter in dead:
                producer.send(topics.dead_letter, key=letter.key, value=encode(letter))
                report.dead_letters.append(f"{letter.reason}: {letter.detail}")
            producer.flush(timeout=30)
        finally:
            producer.close()
        step("dead letter", f"{len(dead)} to {topics.dead_letter}: "
             + "; ".join(report.dead_letters), t)

        t = time.perf_counter()
        store = connect.object_store(settings, endpoints)
        for record in received:
            key = object_key(record.stream_id, "frames", f"{record.seq:08d}", record.payload)
            store.put(key, record.payload, content_type="image/jpeg")
            back = store.get(key)
            image = media.decode_jpeg(back)
            if content_hash(back) == content_hash(record.payload) and image.shape == (record.height, record.width, 3):
                report.objects_verified += 1
        step("object store", f"{report.objects_verified} JPEGs put, read back and verified "
             f"under streams/{report.stream_id}/frames/ in bucket {settings.s3.bucket}", t)
    finally:
        if started_here and not keep_stack and stack is not None:
            t = time.perf_counter()
            stack.down()
            step("stack down", "stopped what the demo started", t)

    table = Table(title=f"streamvqa demo: stream {report.stream_id}")
    for column in ("step", "what happened", "ms"):
        table.add_column(column)
    for name, detail, seconds in report.steps:
        table.add_row(name, detail, f"{seconds * 1000:.0f}")
    console.print(table)
    console.print("[green]demo OK[/]" if report.ok else "[red]demo FAILED[/]")
    return report


def _unchecked_frame(template: Frame, payload: bytes) -> bytes:
    """Encode a frame without validation, to show what the consumer side does with it."""
    import pyarrow as pa

    row = {name: getattr(template, name) for name in Frame.SCHEMA.names}
    row["payload"] = payload
    batch = pa.RecordBatch.from_pylist([row], schema=Frame.SCHEMA)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, Frame.SCHEMA) as writer:
        writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


def _consume_stream(settings, endpoints, stream_id: str, expected: int, limits: Limits, timeout_s: float = 30.0):
    """Read the frames topic from the start; keep this stream's messages; decode each."""
    consumer = connect.consumer(settings, endpoints, group_id=None)
    received: list[Frame] = []
    dead: list[DeadLetter] = []
    try:
        partitions = [TopicPartition(settings.topics.frames, p)
                      for p in consumer.partitions_for_topic(settings.topics.frames) or []]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        deadline = time.monotonic() + timeout_s
        seen = 0
        while seen < expected and time.monotonic() < deadline:
            for tp, messages in consumer.poll(timeout_ms=500).items():
                for message in messages:
                    if message.key != stream_id.encode():
                        continue
                    seen += 1
                    try:
                        received.append(decode(message.value, Frame, limits))
                    except SchemaError as err:
                        dead.append(make_dead_letter(
                            err, source_topic=tp.topic, source_partition=tp.partition,
                            source_offset=message.offset, payload=message.value, key=message.key,
                        ))
    finally:
        consumer.close()
    return received, dead
