"""Raw throughput of the embedded stack: the floor every later pipeline benchmark is read against.

Kafka (kafka-python through streamvqa.connect): produce and consume MB/s for
10 KB, 1 MB and 8 MB messages, on the broker's memory:// storage and on its
durable s3:// storage side by side; and streamvqa's producer settings
(idempotent, acks=all) against kafka-python's defaults (acks=1) on the same broker.
S3 (boto3 through streamvqa's ObjectStore): put and get MB/s for the same
sizes, one stream and 4 threads.

Run: python -m bench stack [--quick]
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kafka import KafkaProducer, TopicPartition
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from streamvqa import connect
from streamvqa.infra.local.stack import LocalStack
from streamvqa.settings import Settings

SIZES = {"10KB": 10 * 1024, "1MB": 1024 * 1024, "8MB": 8 * 1024 * 1024}
VOLUME_BYTES = 96 * 1024 * 1024  # per measurement
OUT = Path(__file__).parent / "out"
console = Console()


def _count(size: int, volume: int) -> int:
    return max(4, volume // size)


def kafka_produce(producer: KafkaProducer, topic: str, payload: bytes, count: int) -> float:
    start = time.perf_counter()
    for i in range(count):
        producer.send(topic, key=b"bench-%d" % (i % 8), value=payload)
    producer.flush(timeout=300)
    return time.perf_counter() - start


def kafka_consume(settings: Settings, endpoints, topic: str, count: int) -> float:
    consumer = connect.consumer(settings, endpoints, group_id=None)
    partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
    consumer.assign(partitions)
    consumer.seek_to_beginning(*partitions)
    seen = 0
    start = time.perf_counter()
    deadline = start + 300
    while seen < count and time.perf_counter() < deadline:
        for messages in consumer.poll(timeout_ms=1000).values():
            seen += len(messages)
    elapsed = time.perf_counter() - start
    consumer.close()
    if seen < count:
        raise RuntimeError(f"consumed {seen} of {count} messages from {topic}")
    return elapsed


def s3_rate(store, payload: bytes, count: int, threads: int, prefix: str) -> tuple[float, float]:
    keys = [f"{prefix}/{i:06d}" for i in range(count)]
    with ThreadPoolExecutor(threads) as pool:
        start = time.perf_counter()
        list(pool.map(lambda k: store.put(k, payload), keys))
        put = time.perf_counter() - start
        start = time.perf_counter()
        sizes = list(pool.map(lambda k: len(store.get(k)), keys))
        get = time.perf_counter() - start
    assert all(size == len(payload) for size in sizes)
    for key in keys:
        store.delete(key)
    return put, get


def main(quick: bool = False) -> dict:
    volume = VOLUME_BYTES // 8 if quick else VOLUME_BYTES
    results: dict = {
        "machine": f"{platform.node()} {os.cpu_count()} cores",
        "volume_mb": volume / 2**20,
        "rows": [],
    }
    rows = results["rows"]
    tasks = len(SIZES) * 2 * 3 + len(SIZES) * 2
    with tempfile.TemporaryDirectory(prefix="svqa-bench-") as tmp, Progress(console=console) as progress:
        bar = progress.add_task("stack throughput", total=tasks)
        for storage in ("memory", "s3"):
            settings = Settings(data_dir=Path(tmp) / storage, local={"broker_storage": storage})
            stack = LocalStack(settings)
            try:
                stack.up()
                endpoints = connect.resolve_endpoints(settings)
                admin = connect.admin(settings, endpoints)
                from kafka.admin import NewTopic

                for label, size in SIZES.items():
                    payload = os.urandom(size)
                    count = _count(size, volume)
                    mb = count * size / 2**20
                    variants = {
                        "streamvqa": connect.producer(settings, endpoints, linger_ms=20, batch_size=1 << 20),
                        "kafka-python defaults": KafkaProducer(
                            bootstrap_servers=endpoints.bootstrap_servers,
                            max_request_size=settings.limits.max_message_bytes + 65536,
                        ),
                    }
                    for variant, producer in variants.items():
                        topic = f"bench.{label}.{variant.split()[0]}"
                        admin.create_topics([NewTopic(topic, 3, 1)])
                        produce_s = kafka_produce(producer, topic, payload, count)
                        producer.close()
                        progress.advance(bar)
                        consume_s = kafka_consume(settings, endpoints, topic, count)
                        progress.advance(bar)
                        rows.append(
                            {
                                "system": f"kafka {storage}://",
                                "client": variant,
                                "size": label,
                                "messages": count,
                                "produce_MBps": mb / produce_s,
                                "consume_MBps": mb / consume_s,
                            }
                        )
                    progress.advance(bar)
                    if storage == "memory":  # the object store does not depend on the broker storage
                        store = connect.object_store(settings, endpoints)
                        for threads in (1, 4):
                            put_s, get_s = s3_rate(store, payload, count, threads, f"bench/{label}-{threads}")
                            rows.append(
                                {
                                    "system": "s3 seaweedfs",
                                    "client": f"ObjectStore x{threads}",
                                    "size": label,
                                    "messages": count,
                                    "produce_MBps": mb / put_s,
                                    "consume_MBps": mb / get_s,
                                }
                            )
                            progress.advance(bar)
                admin.close()
            finally:
                stack.down()
    _print(rows)
    OUT.mkdir(exist_ok=True)
    (OUT / "stack_throughput.json").write_text(json.dumps(results, indent=2))
    return results


def _print(rows: list[dict]) -> None:
    table = Table(title="embedded stack throughput (MB/s)")
    for column in ("system", "client", "size", "n", "write/produce", "read/consume"):
        table.add_column(column)
    for r in rows:
        table.add_row(
            r["system"],
            r["client"],
            r["size"],
            str(r["messages"]),
            f"{r['produce_MBps']:.1f}",
            f"{r['consume_MBps']:.1f}",
        )
    console.print(table)

    def find(system: str, client: str, size: str) -> dict | None:
        return next(
            (r for r in rows if r["system"] == system and r["client"] == client and r["size"] == size), None
        )

    ratios = Table(title="ratios (project / baseline)")
    for column in (
        "size",
        "s3:// / memory:// produce",
        "streamvqa / kafka-python defaults produce",
        "S3 x4 / x1 put",
    ):
        ratios.add_column(column)
    for size in SIZES:
        mem = find("kafka memory://", "streamvqa", size)
        dur = find("kafka s3://", "streamvqa", size)
        raw = find("kafka memory://", "kafka-python defaults", size)
        one = find("s3 seaweedfs", "ObjectStore x1", size)
        four = find("s3 seaweedfs", "ObjectStore x4", size)
        ratios.add_row(
            size,
            f"{dur['produce_MBps'] / mem['produce_MBps']:.2f}" if mem and dur else "-",
            f"{mem['produce_MBps'] / raw['produce_MBps']:.2f}" if mem and raw else "-",
            f"{four['produce_MBps'] / one['produce_MBps']:.2f}" if one and four else "-",
        )
    console.print(ratios)


if __name__ == "__main__":
    main()
