"""Helpers shared by the Kafka IO tests (real broker from the session fixture)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

from kafka.admin import NewTopic

from streamvqa import connect
from streamvqa.operators.io.records import EOS_HEADER
from streamvqa.schemas import Frame, encode


def new_topics(settings, endpoints, *names: str, partitions: int = 3) -> list[str]:
    """Create uniquely named topics for one test; returns their names in order."""
    suffix = uuid.uuid4().hex[:8]
    topics = [f"t.{name}.{suffix}" for name in names]
    admin = connect.admin(settings, endpoints)
    try:
        admin.create_topics([NewTopic(t, partitions, 1) for t in topics])
    finally:
        admin.close()
    return topics


def private_topics(settings, prefix: str):
    """``settings`` with topics of one test alone (``<prefix>-<hex>.<role>``), created: other tests
    write frames, good and bad, to the default ones. Returns (settings, endpoints)."""
    from streamvqa.infra.provision import ensure_topics

    tag = f"{prefix}-{uuid.uuid4().hex[:6]}"
    topics = settings.topics.model_copy(update={role: f"{tag}.{role}" for role in settings.topics.names()})
    settings = settings.model_copy(update={"topics": topics})
    endpoints = connect.resolve_endpoints(settings)
    admin = connect.admin(settings, endpoints)
    try:
        ensure_topics(admin, topics)
    finally:
        admin.close()
    return settings, endpoints


def frame_bytes(stream_id: str, seq: int, size: int = 64) -> bytes:
    payload = b"\xff\xd8" + os.urandom(max(0, size - 4)) + b"\xff\xd9"
    return encode(
        Frame(
            stream_id=stream_id,
            seq=seq,
            pts_us=seq * 40_000,
            codec="jpeg",
            width=16,
            height=16,
            payload=payload,
        )
    )


def send_end_of_stream(producer, topic: str, partitions: int = 3) -> None:
    for partition in range(partitions):
        producer.send(topic, partition=partition, value=b"", headers=[(EOS_HEADER, b"1")])


def read_all(settings, endpoints, topic: str, timeout_ms: int = 3000) -> list:
    consumer = connect.consumer(settings, endpoints, topic, group_id=None, consumer_timeout_ms=timeout_ms)
    try:
        return list(consumer)
    finally:
        consumer.close()


def partition_task(
    settings, endpoints, topic: str, outputs: list[str], group: str, processor, *, max_failures: int = 3
):
    """(PartitionTask over partition 0 of ``topic``, its producer): committing after every record,
    its ledger recovered from ``outputs`` and the dead-letter topic. Close the producer after."""
    from kafka import KafkaConsumer

    from streamvqa.operators.io.exactly_once import PartitionTask, snapshot_namespace
    from streamvqa.operators.io.kafka_sink import OffsetCommitter, OutputProducer
    from streamvqa.operators.io.snapshots import SnapshotStore

    store = connect.object_store(settings, endpoints)
    producer = OutputProducer(connect.producer(settings, endpoints))
    committer = OffsetCommitter(KafkaConsumer(**connect.kafka_config(settings, endpoints), group_id=group))
    task = PartitionTask(
        topic,
        0,
        processor,
        SnapshotStore(store, snapshot_namespace(group, processor.name)),
        store,
        group,
        producer,
        committer,
        settings.topics.dead_letter,
        commit_every=1,
        commit_interval_s=1e9,
        max_failures=max_failures,
    )
    task.recover_ledger(
        lambda: connect.consumer(settings, endpoints, group_id=None, fetch_max_wait_ms=20),
        [*outputs, settings.topics.dead_letter],
    )
    return task, producer


def start_passthrough(settings, topic: str, out: str, group: str, log, *options: str) -> subprocess.Popen:
    """``streamvqa run passthrough`` in its own process group (for SIGKILL), output to ``log``."""
    argv = [sys.executable, "-m", "streamvqa.cli", "run", "passthrough", "--input", topic, "--output", out,
            "--group", group, "--data-dir", str(settings.data_dir), *options]  # fmt: skip
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
