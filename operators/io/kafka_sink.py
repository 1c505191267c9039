"""Producing outputs so that a repeated write is recognised, and committing input offsets.

``OutputProducer`` wraps an idempotent kafka-python producer. Every output has
a deterministic identity: its key (the query id, or stream id + sequence number), or
the ``streamvqa-id`` header when the key is not unique (notes keyed by stream id); after a
restart the producer first reads back what was already written since the last
commit (the *ledger*) and suppresses those identities, so re-processing the same
inputs does not write them twice. This does not rely on Kafka transactions:
the embedded broker shows aborted transactional records to read_committed
consumers, so an aborted write would still be visible there.

``OffsetCommitter`` commits an input partition's next offset to the consumer group.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.partitioner.default import murmur2
from kafka.structs import OffsetAndMetadata

from .records import SOURCE_HEADER, Output, header, output_identity

OutputPositions = dict[str, dict[int, int]]  # topic -> partition -> next offset


@dataclass(frozen=True, slots=True)
class Written:
    """An output found on an output topic by a ledger read: where it is, what it is, who wrote it."""

    topic: str
    partition: int
    offset: int
    identity: bytes
    source: bytes | None  # the ``streamvqa-src`` header, if the writer set one


class ProduceFailed(RuntimeError):
    """An output could not be written (after the producer's own retries)."""


class OutputProducer:
    def __init__(self, producer: KafkaProducer) -> None:
        self._producer = producer
        self._positions: OutputPositions = {}
        self._pending: list[tuple[Any, str, bytes]] = []  # (future, topic, key) since the last flush
        self._suppress: set[tuple[str, bytes]] = set()
        self._partitions: dict[str, list[int]] = {}
        self._partition_of: dict[tuple[str, bytes], int] = {}  # (topic, partition key) -> partition
        self.sent = 0
        self.suppressed = 0

    # -- writing ----------------------------------------------------------------------

    def send(self, output: Output) -> bool:
        """Produce ``output`` unless the ledger shows it was written already. True if sent."""
        marker = (output.topic, output.identity)
        if marker in self._suppress:
            self._suppress.discard(marker)
            self.suppressed += 1
            return False
        future = self._producer.send(
            output.topic,
            key=output.key,
            value=output.value,
            headers=list(output.headers),
            partition=self._partition(output),
        )
        self._pending.append((future, output.topic, output.key))
        self.sent += 1
        return True

    def _partition(self, output: Output) -> int | None:
        """The partition Kafka's default partitioner would give ``partition_key``."""
        if output.partition_key is None:
            return None
        cached = self._partition_of.get((output.topic, output.partition_key))
        if cached is not None:
            return cached
        partitions = self._partitions.get(output.topic)
        if partitions is None:
            partitions = sorted(self._producer.partitions_for(output.topic))
            self._partitions[output.topic] = partitions
        partition = partitions[(murmur2(output.partition_key) & 0x7FFFFFFF) % len(partitions)]
        if len(self._partition_of) >= 65536:
            self._partition_of.clear()
        self._partition_of[(output.topic, output.partition_key)] = partition
        return partition

    def flush(self, timeout_s: float = 60.0) -> OutputPositions:
        """Block until every output sent so far is acknowledged; return the output positions.
        Raises ``ProduceFailed`` for the first output that could not be written."""
        self._producer.flush(timeout=timeout_s)
        pending, self._pending = self._pending, []
        error = None
        for future, topic, key in pending:
            if not future.is_done:
                error = error or ProduceFailed(f"writing {key!r} to {topic} timed out")
            elif future.failed():
                error = error or ProduceFailed(f"writing {key!r} to {topic} failed: {future.exception}")
            else:
                metadata = future.value
                parts = self._positions.setdefault(metadata.topic, {})
                if metadata.offset + 1 > parts.get(metadata.partition, 0):
                    parts[metadata.partition] = metadata.offset + 1
        if error is not None:
            raise error
        return {topic: dict(parts) for topic, parts in self._positions.items()}

    # -- the ledger ---------------------------------------------------------------------

    def load_ledger(
        self, consumer_factory: Callable[[], KafkaConsumer], since: OutputPositions, topics: list[str]
    ) -> list[Written]:
        """Read every output written at or after ``since`` (from the start of partitions
        ``since`` does not name) and suppress those identities. Returns what was found."""
        found: list[Written] = []

        def collect(tp: TopicPartition, messages) -> None:
            for message in messages:
                identity = output_identity(message.key, message.headers)
                if identity is not None:
                    self._suppress.add((tp.topic, identity))
                    found.append(
                        Written(
                            tp.topic,
                            tp.partition,
                            message.offset,
                            identity,
                            header(message.headers, SOURCE_HEADER),
                        )
                    )

        _scan(consumer_factory, topics, since, collect)
        return found

    def close(self) -> None:
        self._producer.close()


def output_ends(consumer_factory: Callable[[], KafkaConsumer], topics: list[str]) -> OutputPositions:
    """The current end offset of every partition of ``topics``, without reading them.

    ListOffsets "latest" is wrong on the embedded broker; the high watermark that every
    fetch response carries is right, so fetch one record per partition and read it there.
    """
    ends: OutputPositions = {}

    def note(tp: TopicPartition, _messages) -> None:
        pass

    _scan(consumer_factory, topics, None, note, ends=ends)
    return ends


def _scan(consumer_factory, topics: list[str], since: OutputPositions | None, on_batch, ends=None) -> None:
    """Read partitions of ``topics`` from ``since`` to their high watermark (``ends`` given:
    only learn the high watermarks, into ``ends``)."""
    consumer = consumer_factory()
    try:
        partitions = [
            TopicPartition(topic, p)
            for topic in topics
            for p in sorted(consumer.partitions_for_topic(topic) or ())
        ]
        if not partitions:
            return
        consumer.assign(partitions)
        beginning = consumer.beginning_offsets(partitions)
        for tp in partitions:
            start = beginning[tp] if since is None else since.get(tp.topic, {}).get(tp.partition, 0)
            consumer.seek(tp, max(start, beginning[tp]))
        pending = set(partitions)
        deadline = time.monotonic() + 30.0
        while pending:
            if time.monotonic() > deadline:
                raise ProduceFailed(f"could not read outputs to their end: {sorted(map(str, pending))}")
            batch = consumer.poll(timeout_ms=100, max_records=1 if ends is not None else 500)
            for tp, messages in batch.items():
                on_batch(tp, messages)
            for tp in list(pending):
                high = consumer.highwater(tp)
                if high is None:
                    continue
                if ends is not None:
                    ends.setdefault(tp.topic, {})[tp.partition] = int(high)
                    pending.discard(tp)
                elif consumer.position(tp) >= high:
                    pending.discard(tp)
    finally:
        consumer.close()


class OffsetCommitter:
    """Commits input offsets to a consumer group (what the source resumes from, and what
    lag tools read). The embedded broker drops commit metadata, so output positions are
    kept in the task's progress record in the object store instead."""

    def __init__(self, consumer: KafkaConsumer) -> None:
        self._consumer = consumer

    def commit(self, topic: str, partition: int, next_offset: int) -> None:
        self._consumer.commit({TopicPartition(topic, partition): OffsetAndMetadata(next_offset, None, -1)})

    def committed(self, topic: str, partition: int) -> int | None:
        result = self._consumer.committed(TopicPartition(topic, partition))
        return None if result is None or result < 0 else int(result)

    def close(self) -> None:
        self._consumer.close()
