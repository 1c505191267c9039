"""Exactly-once results across restarts, on any runner, without relying on the broker.

A ``PartitionTask`` processes one input partition in offset order. It keeps one
state per stream id (the records' key), produced by a deterministic
``StreamProcessor``, and commits in three ordered steps (the Kafka Streams
protocol, with the object store as the state backend):

1. flush the producer: every output of the absorbed inputs is acknowledged;
2. write a snapshot of every stream whose state changed (compare-and-set), each
   recording the next input offset it has absorbed;
3. write the partition's progress record (next offset, output positions;
   compare-and-set, so a zombie task is fenced) and commit the offset to the
   consumer group.

After a crash anywhere, the source resumes from the group's committed offset
(never ahead of the snapshots); each stream restores its snapshot and skips
inputs it had absorbed; inputs after the snapshot are processed again from the
same state and give the same outputs, and the producer suppresses those whose
keys the output topics already hold since the progress record's positions.
Every output names the input that wrote it (``streamvqa-src``); a restarted task that
commits before it has written again everything its killed run wrote keeps its positions
before the first of those, so that a second crash still finds them. (Tasks of one step share
a producer: without this, another task's new outputs would move the positions past them.)
Result: every input affects the state once and every output appears once.
See docs/exactly-once.md.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import apache_beam as beam

from streamvqa.schemas import InvalidField, SchemaError, encode, make_dead_letter
from streamvqa.storage.keys import valid_stream_id
from streamvqa.storage.object_store import ObjectNotFound, ObjectStore, PreconditionFailed

from .kafka_sink import OffsetCommitter, OutputPositions, OutputProducer, Written, output_ends
from .records import END_MARKER_REFUSED, SOURCE_HEADER, KafkaBatch, KafkaRecord, Output, is_scoped
from .snapshots import Head, Snapshot, SnapshotConflict, SnapshotStore

log = logging.getLogger(__name__)


class StreamProcessor(Protocol):
    """Deterministic per-stream logic: same state and record in, same state and outputs out.

    ``process`` may raise ``SchemaError`` for a bad record: the task sends it to the
    dead-letter topic with the reason and goes on.
    """

    name: str

    def initial_state(self, stream_id: str) -> Any: ...

    def process(self, state: Any, record: KafkaRecord) -> tuple[Any, list[Output]]: ...

    def encode_state(self, state: Any) -> bytes: ...

    def decode_state(self, data: bytes) -> Any: ...


class TickingProcessor(StreamProcessor, Protocol):
    """A processor that also acts on time (e.g. a question held for its sources times out).

    ``tick`` is called on heartbeats of an idle partition (``SourceConfig.heartbeat_s``) for
    every stream the task holds, with the wall clock in microseconds; it returns the new
    state and outputs like ``process``. What a tick emits must be keyed like any output (a
    replayed tick's output is recognised), and a state that a tick changed is snapshotted.
    """

    def tick(self, state: Any, now_us: int) -> tuple[Any, list[Output]]: ...


class UnscopedOutput(TypeError):
    """A processor wrote an output whose identity does not name the stream it came from."""


def _scoped(output: Output, stream_id: str, stage: str) -> Output:
    """The ledger suppresses a repeated identity across the topic's partitions: an identity that
    did not name its stream could suppress another stream's output after a restart."""
    if not is_scoped(output.identity, stream_id):
        raise UnscopedOutput(
            f"the {stage} stage wrote output {output.identity!r} for stream {stream_id!r}: "
            "identities must start with the stream id (records.scoped_id)"
        )
    return output


@dataclass
class _Slot:
    state: Any
    next_offset: int  # first offset of this partition not yet absorbed into ``state``
    generation: int
    head: Head | None
    dirty: bool = False


@dataclass(frozen=True, slots=True)
class _Held:
    """An output the killed run wrote that this run has not written again (yet)."""

    source: int  # the offset of the input that wrote it, or the task's position at a tick
    tick: bool
    topic: str
    partition: int
    offset: int
    stream: str | None = None  # a tick's: the stream whose turn it was


@dataclass(frozen=True)
class Progress:
    """The partition's commit record: where it stands, and where outputs stood then."""

    generation: int
    next_offset: int
    outputs: OutputPositions = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        return json.dumps(
            {
                "generation": self.generation,
                "next_offset": self.next_offset,
                "outputs": {t: {str(p): o for p, o in parts.items()} for t, parts in self.outputs.items()},
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Progress:
        raw = json.loads(data)
        return cls(
            int(raw["generation"]),
            int(raw["next_offset"]),
            {t: {int(p): int(o) for p, o in parts.items()} for t, parts in raw.get("outputs", {}).items()},
        )


class ProcessingFailed(SchemaError):
    """A record the processor failed on (not a schema problem: a model raising) in several runs."""

    reason = "processing_failed"


def is_outage(err: BaseException) -> bool:
    """An error of the infrastructure (object store, broker, network), not of the record: a run
    that fails on it is run again, and the record is not counted against."""
    if isinstance(err, ConnectionError | TimeoutError | OSError):
        return True
    module = type(err).__module__ or ""
    return module.startswith(("botocore", "urllib3", "kafka", "boto3", "minio"))


class ProgressConflict(RuntimeError):
    """Another task instance committed this partition: this one is a zombie and must stop."""


class PartitionTask:
    def __init__(
        self,
        topic: str,
        partition: int,
        processor: StreamProcessor,
        snapshots: SnapshotStore,
        progress_store: ObjectStore,
        group: str,
        producer: OutputProducer,
        committer: OffsetCommitter,
        dead_letter_topic: str,
        commit_every: int = 1000,
        commit_interval_s: float = 1.0,
        io_threads: int = 4,
        clock: Callable[[], float] = time.monotonic,
        max_failures: int = 3,
        tick_interval_s: float = 0.5,
    ) -> None:
        self.topic = topic
        self.partition = partition
        self.processor = processor
        self.snapshots = snapshots
        self.progress_store = progress_store
        self.progress_key = f"tasks/{group}/{processor.name}/{topic}/{partition}/progress"
        self.producer = producer
        self.committer = committer
        self.dead_letter_topic = dead_letter_topic
        self.commit_every = commit_every
        self.commit_interval_s = commit_interval_s
        self.clock = clock
        self.tick_interval_s = tick_interval_s
        self._last_tick = clock()
        self._pool = ThreadPoolExecutor(io_threads, thread_name_prefix=f"snap-{partition}")
        self._slots: dict[str, _Slot] = {}
        self._uncommitted = 0
        self._last_commit = clock()
        self._position: int | None = None  # next offset after the last record seen
        self.skipped = 0
        self.dead_letters = 0
        self.max_failures = max_failures
        self.failures_prefix = f"tasks/{group}/{processor.name}/{topic}/{partition}/failures/"
        self.progress, self._progress_etag = self._load_progress()
        self._failures = self._load_failures()
        self._held: dict[tuple[str, bytes], _Held] = {}

    @property
    def source_offset_key(self) -> str:
        return f"{self.topic}:{self.partition}"

    # -- recovery -----------------------------------------------------------------------

    def _load_progress(self) -> tuple[Progress, str | None]:
        try:
            data, etag = self.progress_store.get_with_etag(self.progress_key)
            return Progress.from_bytes(data), etag
        except ObjectNotFound:
            return Progress(0, 0, {}), None

    def _load_failures(self) -> dict[int, dict]:
        """Records this partition's processor failed on in earlier runs (offset -> count, error)."""
        out = {}
        for info in self.progress_store.list(self.failures_prefix):
            try:
                entry = json.loads(self.progress_store.get(info.key))
                out[int(entry["offset"])] = entry
            except (ObjectNotFound, ValueError, KeyError):
                continue
        return out

    def _record_failure(self, record: KafkaRecord, err: BaseException) -> None:
        """Count a failure of the processor on ``record``; the run then fails and is run again
        from the committed state. After ``max_failures`` such runs the record is dead-lettered
        instead of processed (a poison record must not stop its partition forever)."""
        entry = self._failures.get(record.offset, {"offset": record.offset, "count": 0})
        entry = {**entry, "count": entry["count"] + 1, "error": f"{type(err).__name__}: {err}"[:2000]}
        self.progress_store.put(f"{self.failures_prefix}{record.offset:020d}", json.dumps(entry).encode())
        self._failures[record.offset] = entry

    def recover_ledger(
        self,
        consumer_factory,
        output_topics: list[str],
        ends: Callable[[], OutputPositions] | None = None,
    ) -> int:
        """Call once, before ``process``. A task that committed before suppresses the outputs
        written since its last commit. A task's first run records where the output topics
        end before it writes anything (progress generation 0), so that a crash before its
        first commit still leaves a bounded window to read back. ``ends``: where they ended at
        some time before this task's first output (default: read now)."""
        if self._progress_etag is None:
            found = ends() if ends is not None else output_ends(consumer_factory, output_topics)
            self._write_progress(Progress(0, 0, found))
            return 0
        written = self.producer.load_ledger(consumer_factory, self.progress.outputs, output_topics)
        self._hold(written)
        return len(written)

    def _hold(self, written: list[Written]) -> None:
        """Keep what this partition's inputs wrote since the last commit: until this run writes
        each again (or passes the input that wrote it), commits keep the output positions before it."""
        prefix = f"{self.topic}/{self.partition}/".encode()
        for w in written:
            if w.source is None or not w.source.startswith(prefix):
                continue  # another task's output (or one written before sources were named)
            rest = w.source[len(prefix) :]
            tick = rest.startswith(b"t")
            at, _, stream = (rest[1:] if tick else rest).partition(b"/")
            try:
                source = int(at)
            except ValueError:
                continue
            self._held[(w.topic, w.identity)] = _Held(
                source,
                tick,
                w.topic,
                w.partition,
                w.offset,
                stream.decode(errors="replace") if stream else None,
            )

    def _send(self, output: Output, source: str) -> None:
        self.producer.send(
            Output(
                output.topic,
                output.key,
                output.value,
                (*output.headers, (SOURCE_HEADER, source.encode())),
                output.partition_key,
            )
        )
        if self._held:
            self._held.pop((output.topic, output.identity), None)

    def _release(self, upto: int, tick: bool) -> None:
        """This run has processed the input at ``upto`` (or ticked at position ``upto``): what
        the killed run wrote from there is written again by now, or never will be (a snapshot
        had absorbed it); it no longer holds the positions back. A tick's output is let go
        only by a tick that gave its stream a turn (the stream's state is loaded)."""
        if self._held:
            self._held = {
                k: h
                for k, h in self._held.items()
                if h.tick != tick
                or h.source > upto
                or (tick and h.stream is not None and h.stream not in self._slots)
            }

    def _held_positions(self, positions: OutputPositions) -> OutputPositions:
        for held in self._held.values():
            parts = positions.setdefault(held.topic, {})
            parts[held.partition] = min(parts.get(held.partition, held.offset), held.offset)
        return positions

    def _slot(self, stream_id: str) -> _Slot:
        slot = self._slots.get(stream_id)
        if slot is not None:
            return slot
        snapshot, head = self.snapshots.load(stream_id)
        if snapshot is None:
            slot = _Slot(self.processor.initial_state(stream_id), 0, 0, None)
        else:
            slot = _Slot(
                self.processor.decode_state(snapshot.state),
                snapshot.next_offsets.get(self.source_offset_key, 0),
                snapshot.generation,
                head,
            )
        self._slots[stream_id] = slot
        return slot

    # -- processing -----------------------------------------------------------------------

    def process(self, record: KafkaRecord) -> None:
        """Absorb one record (in offset order) and produce its outputs; commit when due."""
        if record.end_of_stream:
            # Commit up to, not past, the marker: a run restarted after this commit must
            # read the marker again to know where the replay ends.
            self._position = record.offset
            self.commit()
            return
        self._position = record.offset + 1
        self._uncommitted += 1
        stream_id = _stream_id(record)
        if record.has_end_marker:  # a long-running job's source passes markers on: a producer's claim
            self._dead_letter(record, InvalidField(END_MARKER_REFUSED, "headers"))
        elif stream_id is None:
            self._dead_letter(record, InvalidField("message key is missing or not a valid stream id", "key"))
        else:
            slot = self._slot(stream_id)
            if record.offset < slot.next_offset:
                self.skipped += 1  # absorbed before a restart
            else:
                failed = self._failures.get(record.offset)
                try:
                    if failed is not None and failed["count"] >= self.max_failures:
                        raise ProcessingFailed(
                            f"the {self.processor.name} stage failed on this record in {failed['count']} runs; "
                            f"last: {failed.get('error', '?')}"
                        )
                    slot.state, outputs = self.processor.process(slot.state, record)
                except SchemaError as err:
                    outputs = []
                    self._dead_letter(record, err)
                except Exception as err:
                    if not is_outage(err):
                        self._record_failure(record, err)
                    raise  # the run fails; it is run again from the committed state
                slot.next_offset = record.offset + 1
                slot.dirty = True
                source = f"{self.topic}/{self.partition}/{record.offset}"
                for output in outputs:
                    self._send(_scoped(output, stream_id, self.processor.name), source)
        self._release(record.offset, tick=False)
        if self.commit_due():
            self.commit()

    def tick(self, now_us: int | None = None) -> int:
        """Give a ticking processor (one with ``tick``) a turn on every stream this task holds;
        returns how many streams it changed. Commits when due."""
        tick = getattr(self.processor, "tick", None)
        if tick is None:
            return 0
        now_us = int(time.time() * 1e6) if now_us is None else now_us
        self._last_tick = self.clock()
        position = self.progress.next_offset if self._position is None else self._position
        changed = 0
        for stream_id, slot in self._slots.items():
            state, outputs = tick(slot.state, now_us)
            if state is slot.state and not outputs:
                continue
            slot.state, slot.dirty = state, True
            changed += 1
            for output in outputs:
                self._send(
                    _scoped(output, stream_id, self.processor.name),
                    f"{self.topic}/{self.partition}/t{position}/{stream_id}",
                )
        # the same states (or later ones) at a later time give what the killed run's tick here gave
        self._release(position, tick=True)
        if changed:
            self._uncommitted += 1
        if self.commit_due():
            self.commit()
        return changed

    def tick_due(self) -> bool:
        """A busy partition gets no heartbeats: its streams get their turns every
        ``tick_interval_s`` all the same (a question's hold timeout must not wait for idleness)."""
        return self.clock() - self._last_tick >= self.tick_interval_s

    def has_uncommitted(self) -> bool:
        return self._uncommitted > 0

    def commit_due(self) -> bool:
        return self._uncommitted >= self.commit_every or (
            self._uncommitted > 0 and self.clock() - self._last_commit >= self.commit_interval_s
        )

    def _dead_letter(self, record: KafkaRecord, error: SchemaError) -> None:
        letter = make_dead_letter(
            error,
            source_topic=record.topic,
            source_partition=record.partition,
            source_offset=record.offset,
            payload=record.value,
            key=record.key,
        )
        key = f"{record.topic}/{record.partition}/{record.offset}"
        self._send(Output(self.dead_letter_topic, key.encode(), encode(letter)), key)
        self.dead_letters += 1

    # -- committing ------------------------------------------------------------------------

    def commit(self) -> None:
        """Flush outputs, snapshot changed streams, then record progress and commit the offset."""
        if self._position is None:
            return
        outputs = self.producer.flush()
        dirty = [(sid, slot) for sid, slot in self._slots.items() if slot.dirty]
        for (_, slot), head in zip(dirty, self._pool.map(self._save, dirty), strict=True):
            slot.head, slot.dirty = head, False
            slot.generation += 1
        positions = self._held_positions(_merge(self.progress.outputs, outputs))
        self._write_progress(Progress(self.progress.generation + 1, self._position, positions))
        self.committer.commit(self.topic, self.partition, self._position)
        self._uncommitted = 0
        self._last_commit = self.clock()

    def _write_progress(self, progress: Progress) -> None:
        data = progress.to_bytes()
        try:
            if self._progress_etag is None:
                etag = self.progress_store.put(self.progress_key, data, if_none_match=True)
            else:
                etag = self.progress_store.put(self.progress_key, data, if_match=self._progress_etag)
        except PreconditionFailed as err:
            raise ProgressConflict(
                f"partition {self.topic}:{self.partition} was committed by another task instance"
            ) from err
        self.progress, self._progress_etag = progress, etag

    def _save(self, item: tuple[str, _Slot]) -> Head:
        stream_id, slot = item
        snapshot = Snapshot(
            stream_id=stream_id,
            processor=self.snapshots.processor,
            generation=slot.generation + 1,
            next_offsets={self.source_offset_key: slot.next_offset},
            state=self.processor.encode_state(slot.state),
        )
        return self.snapshots.save(snapshot, slot.head)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def _merge(old: OutputPositions, new: OutputPositions) -> OutputPositions:
    """Positions of every partition known before, moved forward where this task wrote since:
    a partition the producer has not written to keeps its position (and is not read back
    from its beginning after a restart)."""
    merged = {topic: dict(parts) for topic, parts in old.items()}
    for topic, parts in new.items():
        for partition, offset in parts.items():
            target = merged.setdefault(topic, {})
            target[partition] = max(target.get(partition, 0), offset)
    return merged


def snapshot_namespace(group: str, processor: str) -> str:
    """Snapshots belong to one application (consumer group) and one processor: the same
    stream processed by two pipelines has two independent states."""
    return f"{group}.{processor}"


def _stream_id(record: KafkaRecord) -> str | None:
    if record.key is None:
        return None
    try:
        key = record.key.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return key if valid_stream_id(key) else None


@dataclass(frozen=True)
class TaskConfig:
    """What an ExactlyOnceDoFn needs to build its tasks on a worker (picklable)."""

    kafka: dict[str, Any]
    s3: Any  # S3Endpoint
    bucket: str
    group: str
    output_topics: tuple[str, ...]
    dead_letter_topic: str
    commit_every: int = 1000
    commit_interval_s: float = 1.0
    max_message_bytes: int = 16 * 1024 * 1024


_ENDS_REUSE_S = 10.0


class ExactlyOnceDoFn(beam.DoFn):
    """Beam adapter: runs a PartitionTask per input partition of the records it receives.

    The tasks are a cache of what the object store holds: a new DoFn instance (a
    restart, a rebalance) rebuilds them from snapshots and progress records.
    It emits nothing; its outputs go to Kafka through the task's producer.
    """

    def __init__(
        self,
        config: TaskConfig,
        processor_factory: Callable[[], StreamProcessor] | Mapping[str, Callable[[], StreamProcessor]],
    ) -> None:
        """``processor_factory``: one processor for every input topic, or a mapping from input
        topic to the factory of that topic's processor (one fused step reading several topics:
        each topic's streams have their own state and snapshots, under the processor's name)."""
        self.config = config
        self.processor_factory = processor_factory
        self._tasks: dict[tuple[str, int], PartitionTask] = {}

    def setup(self) -> None:
        from kafka import KafkaConsumer, KafkaProducer

        c = self.config
        self._producer = OutputProducer(
            KafkaProducer(
                **c.kafka,
                acks="all",
                enable_idempotence=True,
                linger_ms=5,
                batch_size=1 << 20,
                max_request_size=c.max_message_bytes + 65536,
            )
        )
        self._committer = OffsetCommitter(
            KafkaConsumer(**c.kafka, group_id=c.group, enable_auto_commit=False)
        )
        self._store = ObjectStore(c.s3, c.bucket)
        self._ends: tuple[float, OutputPositions] | None = None
        self._processors: dict[str | None, tuple[StreamProcessor, SnapshotStore]] = {}
        factories = (
            dict(self.processor_factory)
            if isinstance(self.processor_factory, Mapping)
            else {None: self.processor_factory}
        )
        for topic, factory in factories.items():
            processor = factory()
            self._processors[topic] = (
                processor,
                SnapshotStore(self._store, snapshot_namespace(c.group, processor.name)),
            )
        names = [p.name for p, _ in self._processors.values()]
        if len(set(names)) != len(names):
            raise ValueError(f"processors of one step need distinct names, got {names}")
        self._tasks = {}

    def _processor_for(self, topic: str) -> tuple[StreamProcessor, SnapshotStore]:
        found = self._processors.get(topic) or self._processors.get(None)
        if found is None:
            raise KeyError(f"no processor for topic {topic!r} (has {sorted(map(str, self._processors))})")
        return found

    def _reader(self):
        from kafka import KafkaConsumer

        return KafkaConsumer(
            **self.config.kafka,
            group_id=None,
            enable_auto_commit=False,
            fetch_max_wait_ms=20,
            max_partition_fetch_bytes=self.config.max_message_bytes + 65536,
        )

    def _task(self, topic: str, partition: int) -> PartitionTask:
        key = (topic, partition)
        task = self._tasks.get(key)
        if task is None:
            processor, snapshots = self._processor_for(topic)
            task = PartitionTask(
                topic,
                partition,
                processor,
                snapshots,
                self._store,
                self.config.group,
                self._producer,
                self._committer,
                self.config.dead_letter_topic,
                self.config.commit_every,
                self.config.commit_interval_s,
            )
            found = task.recover_ledger(self._reader, self._output_topics(), self._first_run_ends)
            if found:
                log.info("partition %s:%s: %d outputs since the last commit", *key, found)
            self._tasks[key] = task
        return task

    def _output_topics(self) -> list[str]:
        return [*self.config.output_topics, self.config.dead_letter_topic]

    def _first_run_ends(self) -> OutputPositions:
        """Where the output topics ended a moment ago: the window start of a task's first run
        (earlier than needed only widens the window; tasks built together share one read)."""
        if self._ends is None or time.monotonic() - self._ends[0] > _ENDS_REUSE_S:
            self._ends = (time.monotonic(), output_ends(self._reader, self._output_topics()))
        return self._ends[1]

    def process(self, element: KafkaRecord | KafkaBatch) -> Iterable[None]:
        records = element.records if isinstance(element, KafkaBatch) else (element,)
        if records:
            task = self._task(records[0].topic, records[0].partition)
            for record in records:
                task.process(record)
            if task.tick_due():
                task.tick()
        else:  # a heartbeat of an idle partition: time passes for the streams it holds
            idle = self._tasks.get((element.topic, element.partition))
            if idle is not None:
                idle.tick()
        return ()

    def finish_bundle(self) -> None:
        # A bundle is finished only when what it did is durable: Beam may hand the next
        # bundle of a partition to another worker, or end the pipeline, right after.
        for task in self._tasks.values():
            if task.has_uncommitted():
                task.commit()

    def teardown(self) -> None:
        for task in self._tasks.values():
            task.close()
        for closeable in (getattr(self, "_producer", None), getattr(self, "_committer", None)):
            if closeable is not None:
                closeable.close()


__all__ = [
    "ExactlyOnceDoFn",
    "PartitionTask",
    "Progress",
    "ProcessingFailed",
    "ProgressConflict",
    "SnapshotConflict",
    "StreamProcessor",
    "TaskConfig",
    "TickingProcessor",
]
