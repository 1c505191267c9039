"""An unbounded Kafka source for Beam Python, as a splittable DoFn over kafka-python.

Beam's own ReadFromKafka is a Java cross-language transform (its expansion
service cannot run here), so streamvqa reads Kafka itself:

- one element per topic partition; its restriction is an offset range
  ``[start, stop)`` (``stop`` = 2**63-1 when unbounded), tracked by Beam's
  OffsetRestrictionTracker, so a runner that checkpoints restrictions (Flink)
  resumes exactly where the checkpoint says;
- start from a given offset, else the consumer group's committed offset, else
  the earliest (never ``auto_offset_reset=latest``: wrong on the embedded broker);
- the watermark follows the records' timestamps (the producers set them to the
  presentation time on the wall clock), monotonic per partition, and advances
  with the wall clock while the partition is idle;
- bounded polling: a bundle ends after ``max_bundle_records`` or
  ``max_bundle_seconds``; an idle partition defers with exponential backoff;
- a clean end: a stop offset, or, only in a bounded run (``end_markers=True``: tests,
  benches, file replays), a record carrying the end-of-stream header. A long-running job
  ignores that header (any producer can set it): the record flows on like any other and the
  exactly-once task dead-letters it;
- one element per record (KafkaRecord), or with ``batch=True`` one element per
  poll (KafkaBatch, consecutive records of one partition) so that Beam's
  per-element cost is paid per batch;
- with ``heartbeat_s``, an idle partition emits an empty KafkaBatch now and then
  (a tick: the exactly-once task lets its processor act on time, see ``tick``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import apache_beam as beam
from apache_beam.io.restriction_trackers import OffsetRange, OffsetRestrictionTracker
from apache_beam.io.watermark_estimators import ManualWatermarkEstimator
from apache_beam.transforms.core import RestrictionProvider
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import Duration, Timestamp

from .records import KafkaBatch, KafkaRecord, PartitionRead

UNBOUNDED = 2**63 - 1


@dataclass(frozen=True)
class SourceConfig:
    """How the source talks to Kafka. ``client`` holds kafka-python connection options."""

    client: dict[str, Any]
    group_id: str | None = None
    poll_timeout_ms: int = 200
    max_bundle_records: int = 2000
    max_bundle_seconds: float = 1.0
    idle_backoff_s: tuple[float, float] = (0.01, 0.5)
    idle_watermark_lag_s: float | None = 5.0  # None: hold the watermark while idle
    max_fetch_bytes: int = 17 * 1024 * 1024
    # A bounded run: a record with the end-of-stream header ends its partition. Off in the
    # long-running job, where ending the input is not something a producer may declare.
    end_markers: bool = False
    emit_end_of_stream: bool = False  # with end_markers: pass the marker on (tasks commit on it)
    batch: bool = False  # emit a KafkaBatch per poll instead of a KafkaRecord per message
    # With ``batch``: an idle partition emits an empty KafkaBatch at most this often, so that
    # stages holding work for a time (questions waiting for their sources) get a turn.
    heartbeat_s: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def consumer(self, with_group: bool = False):
        from kafka import KafkaConsumer

        return KafkaConsumer(
            **self.client,
            group_id=self.group_id if with_group else None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            max_partition_fetch_bytes=self.max_fetch_bytes,
            fetch_max_bytes=max(self.max_fetch_bytes, 52_428_800),
            **self.extra,
        )


def start_offset(config: SourceConfig, read: PartitionRead, consumer=None) -> int:
    """The first offset to read: given, else committed by the group, else the earliest."""
    from kafka import TopicPartition

    if read.start is not None:
        return read.start
    tp = TopicPartition(read.topic, read.partition)
    own = consumer is None
    consumer = consumer or config.consumer(with_group=config.group_id is not None)
    try:
        if config.group_id is not None:
            committed = consumer.committed(tp)
            if committed is not None and committed >= 0:
                return int(committed)
        return int(consumer.beginning_offsets([tp])[tp])
    finally:
        if own:
            consumer.close()


class ReadPartitionFn(beam.DoFn, RestrictionProvider):
    """Reads the partition named by each element, within its offset restriction.

    The DoFn is its own restriction provider (it needs the config for the start offset).
    """

    def __init__(self, config: SourceConfig) -> None:
        self.config = config
        self._consumers: dict[tuple[str, int], Any] = {}
        self._idle: dict[tuple[str, int], float] = {}
        self._next: dict[tuple[str, int], int] = {}  # where the consumer stands per partition
        self._beat: dict[tuple[str, int], float] = {}  # last heartbeat per partition

    # -- restriction provider ---------------------------------------------------------

    def initial_restriction(self, element: PartitionRead) -> OffsetRange:
        start = start_offset(self.config, element)
        stop = element.stop if element.stop is not None else UNBOUNDED
        return OffsetRange(start, max(start, stop))

    def create_tracker(self, restriction: OffsetRange) -> OffsetRestrictionTracker:
        return OffsetRestrictionTracker(restriction)

    def restriction_size(self, element: PartitionRead, restriction: OffsetRange) -> int:
        return min(restriction.size(), 1 << 30)

    def split(self, element: PartitionRead, restriction: OffsetRange) -> Iterator[OffsetRange]:
        yield restriction  # one reader per partition keeps its order

    # -- reading ----------------------------------------------------------------------

    def setup(self) -> None:
        # One consumer per partition this instance reads: each keeps its own prefetched data
        # between bundles (a shared one would drop it on every seek).
        self._consumers = {}

    def teardown(self) -> None:
        for consumer in self._consumers.values():
            consumer.close()
        self._consumers = {}

    @beam.DoFn.unbounded_per_element()
    def process(
        self,
        element: PartitionRead,
        tracker=beam.DoFn.RestrictionParam(),
        watermark=beam.DoFn.WatermarkEstimatorParam(ManualWatermarkEstimator.default_provider()),
    ) -> Iterable[TimestampedValue]:
        from kafka import TopicPartition

        restriction: OffsetRange = tracker.current_restriction()
        tp = TopicPartition(element.topic, element.partition)
        consumer = self._consumers.get((element.topic, element.partition))
        if consumer is None:
            consumer = self._consumers[(element.topic, element.partition)] = self.config.consumer()
            consumer.assign([tp])
        # Seeking drops what the consumer has prefetched: only when not already there.
        if self._next.get((element.topic, element.partition)) != restriction.start:
            consumer.seek(tp, restriction.start)

        deadline = time.monotonic() + self.config.max_bundle_seconds
        emitted = 0
        while emitted < self.config.max_bundle_records and time.monotonic() < deadline:
            batch = self._poll(consumer, tp)
            if not batch:
                break
            records: list[KafkaRecord] = []
            done = False
            for message in batch:
                if not tracker.try_claim(message.offset):
                    done = True  # the runner split the restriction here
                    break
                record = KafkaRecord(
                    topic=message.topic,
                    partition=message.partition,
                    offset=message.offset,
                    key=message.key,
                    value=message.value,
                    timestamp_ms=int(message.timestamp),
                    headers=_headers(message.headers) if message.headers else (),
                )
                if self.config.end_markers and record.has_end_marker:
                    record = replace(record, end_of_stream=True)
                if record.end_of_stream or message.offset + 1 >= restriction.stop:
                    if not record.end_of_stream or self.config.emit_end_of_stream:
                        records.append(record)
                    tracker.try_claim(restriction.stop)  # marks the restriction done
                    done = True
                    break
                records.append(record)
            yield from self._emit(records, watermark)
            emitted += len(records)
            if done:
                return

        key = (element.topic, element.partition)
        if emitted:
            self._idle.pop(key, None)
            self._beat[key] = time.monotonic()
            delay = 0.0
        else:
            beat = self.config.heartbeat_s
            if self.config.batch and beat is not None and time.monotonic() - self._beat.get(key, 0.0) >= beat:
                self._beat[key] = time.monotonic()
                stamp = watermark.current_watermark() or Timestamp.of(time.time())
                yield TimestampedValue(KafkaBatch(element.topic, element.partition, ()), stamp)
            low, high = self.config.idle_backoff_s
            delay = min(high, self._idle.get(key, low / 2) * 2)
            self._idle[key] = delay
            lag = self.config.idle_watermark_lag_s
            if lag is not None:
                self._advance(watermark, Timestamp.of(time.time() - lag))
        tracker.defer_remainder(Duration.of(delay))

    def _poll(self, consumer, tp) -> list:
        mine = consumer.poll(timeout_ms=self.config.poll_timeout_ms, max_records=500).get(tp, [])
        if mine:
            self._next[(tp.topic, tp.partition)] = mine[-1].offset + 1
        return mine

    @staticmethod
    def _advance(watermark, candidate: Timestamp) -> None:
        current = watermark.current_watermark()
        if current is None or candidate > current:
            watermark.set_watermark(candidate)

    def _emit(self, records: list[KafkaRecord], watermark) -> Iterator[TimestampedValue]:
        """One element per record, or one KafkaBatch per poll (``config.batch``): Beam's
        per-element cost then falls on a batch, not on every message."""
        if not records:
            return
        if self.config.batch:
            stamp = Timestamp.of(max(r.timestamp_ms for r in records) / 1000.0)
            self._advance(watermark, stamp)
            yield TimestampedValue(KafkaBatch(records[0].topic, records[0].partition, tuple(records)), stamp)
            return
        for record in records:
            stamp = Timestamp.of(record.timestamp_ms / 1000.0)
            self._advance(watermark, stamp)
            yield TimestampedValue(record, stamp)


def _headers(headers) -> tuple[tuple[str, bytes], ...]:
    return tuple((name, bytes(value or b"")) for name, value in headers)


class _PartitionsOf(beam.DoFn):
    def __init__(self, config: SourceConfig, start: dict | None, stop: dict | None) -> None:
        self.config = config
        self.start = start or {}
        self.stop = stop or {}

    def process(self, topic: str) -> Iterator[PartitionRead]:
        consumer = self.config.consumer()
        try:
            deadline = time.monotonic() + 30
            partitions = consumer.partitions_for_topic(topic)
            while not partitions and time.monotonic() < deadline:
                time.sleep(0.2)
                partitions = consumer.partitions_for_topic(topic)
        finally:
            consumer.close()
        if not partitions:
            raise RuntimeError(f"topic {topic!r} does not exist or has no partitions")
        for partition in sorted(partitions):
            yield PartitionRead(
                topic, partition, self.start.get((topic, partition)), self.stop.get((topic, partition))
            )


class ReadFromKafka(beam.PTransform):
    """``p | ReadFromKafka(config, ["topic"])`` -> PCollection of KafkaRecord, per partition in order.

    ``start_offsets`` / ``stop_offsets`` map (topic, partition) to an offset.
    """

    def __init__(
        self,
        config: SourceConfig,
        topics: list[str],
        start_offsets: dict[tuple[str, int], int] | None = None,
        stop_offsets: dict[tuple[str, int], int] | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.topics = list(topics)
        self.start_offsets = start_offsets
        self.stop_offsets = stop_offsets

    def expand(self, pbegin):
        return (
            pbegin
            | "Topics" >> beam.Create(self.topics)
            | "Partitions" >> beam.ParDo(_PartitionsOf(self.config, self.start_offsets, self.stop_offsets))
            | "Read" >> beam.ParDo(ReadPartitionFn(self.config))
        )
