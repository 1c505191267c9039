"""Pass-through pipeline vs a raw kafka-python consume+produce loop, same topic, one run.

The pipeline is streamvqa's full path: Kafka source (splittable DoFn) -> Arrow
decode + validation -> per-stream state (dedup by sequence number) -> outputs
through the ledger-checked idempotent producer, with snapshots and offset
commits (exactly-once machinery) on Beam's FnApiRunner in streaming mode. The
baseline reads the same input with one KafkaConsumer and writes each message
to an output topic with one KafkaProducer, nothing else.

Throughput is counted from the first to the last output record's timestamp
(steady state; the Beam start-up of a few seconds is reported separately).
Goal: the pipeline reaches at least 50% of the raw loop.

Run: python -m bench passthrough [--quick]
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from pathlib import Path

from kafka import KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from streamvqa import connect
from streamvqa.infra.local.stack import LocalStack
from streamvqa.operators.io.records import EOS_HEADER
from streamvqa.pipelines import passthrough
from streamvqa.schemas import Frame, encode
from streamvqa.settings import Settings

SIZES = {"10KB": 10 * 1024, "200KB": 200 * 1024}
VOLUME = 80 * 1024 * 1024
STREAMS = 8
PARTITIONS = 3
OUT = Path(__file__).parent / "out"
console = Console()


def _frames(size: int, count: int) -> list[tuple[bytes, bytes]]:
    body = os.urandom(size - 4)
    messages = []
    for i in range(count):
        stream = f"bench-{i % STREAMS}"
        frame = Frame(
            stream_id=stream,
            seq=i // STREAMS,
            pts_us=i * 1000,
            codec="jpeg",
            width=64,
            height=64,
            payload=b"\xff\xd8" + body + b"\xff\xd9",
        )
        messages.append((stream.encode(), encode(frame)))
    return messages


def _fill(settings, endpoints, topic: str, messages) -> None:
    producer = connect.producer(settings, endpoints, linger_ms=20, batch_size=1 << 20)
    for key, value in messages:
        producer.send(topic, key=key, value=value)
    for partition in range(PARTITIONS):
        producer.send(topic, partition=partition, value=b"", headers=[(EOS_HEADER, b"1")])
    producer.flush()
    producer.close()


def _output_span(settings, endpoints, topic: str, expected: int) -> tuple[int, float]:
    """Count the output records and the seconds between the first and last timestamps."""
    consumer = connect.consumer(settings, endpoints, group_id=None)
    partitions = [TopicPartition(topic, p) for p in range(PARTITIONS)]
    consumer.assign(partitions)
    consumer.seek_to_beginning(*partitions)
    count, first, last = 0, None, None
    deadline = time.monotonic() + 120
    while count < expected and time.monotonic() < deadline:
        for messages in consumer.poll(timeout_ms=500).values():
            for m in messages:
                count += 1
                first = m.timestamp if first is None else min(first, m.timestamp)
                last = m.timestamp if last is None else max(last, m.timestamp)
    consumer.close()
    return count, ((last or 0) - (first or 0)) / 1000.0


def raw_loop(settings, endpoints, source: str, sink: str, expected: int) -> float:
    consumer = connect.consumer(settings, endpoints, group_id=None, isolation_level="read_uncommitted")
    producer = KafkaProducer(
        bootstrap_servers=endpoints.bootstrap_servers,
        linger_ms=5,
        batch_size=1 << 20,
        max_request_size=settings.limits.max_message_bytes + 65536,
    )
    partitions = [TopicPartition(source, p) for p in range(PARTITIONS)]
    consumer.assign(partitions)
    consumer.seek_to_beginning(*partitions)
    seen = 0
    start = time.perf_counter()
    while seen < expected:
        for messages in consumer.poll(timeout_ms=500).values():
            for m in messages:
                if m.headers:
                    continue
                producer.send(sink, key=m.key, value=m.value)
                seen += 1
    producer.flush()
    elapsed = time.perf_counter() - start
    consumer.close()
    producer.close()
    return elapsed


def main(quick: bool = False) -> dict:
    volume = VOLUME // 8 if quick else VOLUME
    rows = []
    with tempfile.TemporaryDirectory(prefix="svqa-bench-") as tmp, Progress(console=console) as progress:
        settings = Settings(data_dir=Path(tmp), local={"broker_storage": "memory"})
        stack = LocalStack(settings)
        bar = progress.add_task("pass-through vs raw loop", total=len(SIZES) * 3)
        try:
            stack.up()
            endpoints = connect.resolve_endpoints(settings)
            admin = connect.admin(settings, endpoints)
            for label, size in SIZES.items():
                count = max(200, volume // size)
                names = [f"bench.{label}.{n}" for n in ("in", "raw", "pipe")]
                admin.create_topics([NewTopic(n, PARTITIONS, 1) for n in names])
                _fill(settings, endpoints, names[0], _frames(size, count))
                progress.advance(bar)

                raw_s = raw_loop(settings, endpoints, names[0], names[1], count)
                _, raw_span = _output_span(settings, endpoints, names[1], count)
                progress.advance(bar)

                start = time.perf_counter()
                passthrough.run(
                    settings, names[0], names[2], f"bench-{label}", commit_every=2000, bounded=True
                )
                wall = time.perf_counter() - start
                got, pipe_span = _output_span(settings, endpoints, names[2], count)
                progress.advance(bar)
                if got != count:
                    raise RuntimeError(f"pipeline wrote {got} of {count} outputs")
                mb = count * size / 2**20
                raw_rate = count / max(raw_span, raw_s / 2, 1e-3)
                pipe_rate = count / max(pipe_span, 1e-3)
                rows.append(
                    {
                        "size": label,
                        "messages": count,
                        "raw_msgs_per_s": raw_rate,
                        "raw_MBps": raw_rate * mb / count,
                        "pipeline_msgs_per_s": pipe_rate,
                        "pipeline_MBps": pipe_rate * mb / count,
                        "pipeline_wall_s": wall,
                        "pipeline_startup_s": max(0.0, wall - pipe_span),
                        "ratio": pipe_rate / raw_rate,
                    }
                )
            admin.close()
        finally:
            stack.down()

    table = Table(title="pass-through pipeline vs raw kafka-python loop (memory:// broker)")
    for column in (
        "size",
        "n",
        "raw msg/s",
        "raw MB/s",
        "pipeline msg/s",
        "pipeline MB/s",
        "start-up s",
        "ratio",
    ):
        table.add_column(column)
    for r in rows:
        table.add_row(
            r["size"],
            str(r["messages"]),
            f"{r['raw_msgs_per_s']:.0f}",
            f"{r['raw_MBps']:.1f}",
            f"{r['pipeline_msgs_per_s']:.0f}",
            f"{r['pipeline_MBps']:.1f}",
            f"{r['pipeline_startup_s']:.1f}",
            f"{r['ratio']:.2f}",
        )
    console.print(table)
    OUT.mkdir(exist_ok=True)
    result = {"machine": f"{platform.node()} {os.cpu_count()} cores", "rows": rows}
    (OUT / "kafka_passthrough.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
