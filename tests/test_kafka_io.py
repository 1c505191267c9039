"""Kafka source and sinks for Beam, on the embedded broker and object store."""

from __future__ import annotations

from typing import ClassVar

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from kafka import KafkaConsumer

from streamvqa import connect
from streamvqa.operators.io.exactly_once import PartitionTask, ProgressConflict, snapshot_namespace
from streamvqa.operators.io.kafka_sink import OffsetCommitter, OutputProducer
from streamvqa.operators.io.kafka_source import ReadFromKafka, SourceConfig
from streamvqa.operators.io.records import KafkaRecord, Output
from streamvqa.operators.io.snapshots import CorruptSnapshot, Snapshot, SnapshotConflict, SnapshotStore
from streamvqa.pipelines import passthrough
from streamvqa.pipelines.passthrough import PassThroughProcessor
from streamvqa.schemas import DeadLetter, decode
from tests.kafka_helpers import frame_bytes, new_topics, read_all, send_end_of_stream

pytestmark = pytest.mark.stack


class _Collect(beam.DoFn):
    """Collects (partition, offset, key, value, timestamp) into a list shared by the test."""

    sink: ClassVar[list] = []

    def process(self, element, timestamp=beam.DoFn.TimestampParam):
        for record in getattr(element, "records", (element,)):  # a KafkaBatch or one record
            stamp = float(timestamp) if not hasattr(element, "records") else record.timestamp_ms / 1000
            _Collect.sink.append((record.partition, record.offset, record.key, record.value, stamp))
        if hasattr(element, "records"):
            assert float(timestamp) == max(r.timestamp_ms for r in element.records) / 1000


def _run_source(settings, endpoints, topics, **kwargs) -> list:
    _Collect.sink = []
    config = SourceConfig(client=connect.kafka_config(settings, endpoints), **kwargs.pop("config", {}))
    with beam.Pipeline(runner=FnApiRunner(), options=PipelineOptions(streaming=True)) as p:
        p | ReadFromKafka(config, topics, **kwargs) | beam.ParDo(_Collect())
    return list(_Collect.sink)


@pytest.mark.parametrize("batch", [False, True], ids=["records", "batches"])
def test_source_delivers_each_partition_in_order_and_stops_at_stop_offsets(
    stack_settings, endpoints, batch
) -> None:
    (topic,) = new_topics(stack_settings, endpoints, "order")
    producer = connect.producer(stack_settings, endpoints)
    sent = {}
    for i in range(60):
        meta = producer.send(
            topic, key=b"s%d" % (i % 7), value=b"%d" % i, timestamp_ms=1_700_000_000_000 + i
        ).get(10)
        sent.setdefault(meta.partition, []).append(meta.offset)
    producer.close()
    stops = {(topic, p): offsets[-1] + 1 for p, offsets in sent.items()}
    got = _run_source(stack_settings, endpoints, [topic], stop_offsets=stops, config={"batch": batch})
    for partition, offsets in sent.items():
        mine = [row for row in got if row[0] == partition]
        assert [row[1] for row in mine] == offsets  # all, once, in offset order
        stamps = [row[4] for row in mine]
        assert stamps == sorted(stamps)  # element timestamps = record timestamps
        assert stamps[0] == pytest.approx(1_700_000_000 + int(mine[0][3]) / 1000)


def test_source_resumes_from_given_and_committed_offsets(stack_settings, endpoints) -> None:
    (topic,) = new_topics(stack_settings, endpoints, "resume", partitions=1)
    producer = connect.producer(stack_settings, endpoints)
    for i in range(20):
        producer.send(topic, key=b"k", value=b"%d" % i)
    send_end_of_stream(producer, topic, partitions=1)
    producer.flush()
    producer.close()

    given = _run_source(
        stack_settings, endpoints, [topic], start_offsets={(topic, 0): 15}, config={"end_markers": True}
    )
    assert [int(row[3]) for row in given] == [15, 16, 17, 18, 19]  # the marker is not emitted

    group = f"resume-{topic}"
    committer = OffsetCommitter(
        KafkaConsumer(**connect.kafka_config(stack_settings, endpoints), group_id=group)
    )
    committer.commit(topic, 0, 12)
    assert committer.committed(topic, 0) == 12
    committer.close()
    committed = _run_source(
        stack_settings, endpoints, [topic], config={"group_id": group, "end_markers": True}
    )
    assert [int(row[3]) for row in committed] == list(range(12, 20))


def test_output_producer_suppresses_what_the_ledger_already_holds(stack_settings, endpoints) -> None:
    (out,) = new_topics(stack_settings, endpoints, "ledger")
    first = OutputProducer(connect.producer(stack_settings, endpoints))
    for i in range(10):
        first.send(Output(out, b"k%d" % i, b"v"))
    positions = first.flush()
    first.close()
    second = OutputProducer(connect.producer(stack_settings, endpoints))
    found = second.load_ledger(lambda: connect.consumer(stack_settings, endpoints, group_id=None), {}, [out])
    assert len(found) == 10 and all(w.source is None for w in found)  # not written by a task
    sent = [second.send(Output(out, b"k%d" % i, b"v")) for i in range(5, 15)]
    second.flush()
    second.close()
    assert sent == [False] * 5 + [True] * 5
    keys = sorted(m.key for m in read_all(stack_settings, endpoints, out))
    assert keys == sorted(b"k%d" % i for i in range(15))
    # A ledger read from recorded positions only sees what came after them.
    third = OutputProducer(connect.producer(stack_settings, endpoints))
    later = third.load_ledger(
        lambda: connect.consumer(stack_settings, endpoints, group_id=None), {out: positions[out]}, [out]
    )
    assert sorted(w.identity for w in later) == sorted(b"k%d" % i for i in range(10, 15))
    third.close()


def test_snapshots_are_compare_and_set_and_stream_checked(stack_settings, endpoints) -> None:
    store = connect.object_store(stack_settings, endpoints)
    snapshots = SnapshotStore(store, "unit")
    assert snapshots.load("snap-a") == (None, None)
    head1 = snapshots.save(Snapshot("snap-a", "unit", 1, {"t:0": 5}, b"state-1"), None)
    loaded, head = snapshots.load("snap-a")
    assert loaded.state == b"state-1" and loaded.next_offsets == {"t:0": 5} and head == head1
    head2 = snapshots.save(Snapshot("snap-a", "unit", 2, {"t:0": 9}, b"state-2"), head1)
    with pytest.raises(SnapshotConflict):  # a zombie still holding head1
        snapshots.save(Snapshot("snap-a", "unit", 2, {"t:0": 7}, b"zombie"), head1)
    assert snapshots.load("snap-a")[0].state == b"state-2"
    assert not store.contains(head1.blob_key)  # the superseded blob is gone
    assert store.contains(head2.blob_key)
    # A HEAD crafted to point at another stream's blob is refused.
    snapshots.save(Snapshot("snap-b", "unit", 1, {}, b"b-state"), None)
    b_blob = snapshots.load("snap-b")[1].blob_key
    store.put("streams/snap-c/snapshots/unit/HEAD", b'{"generation": 1, "blob": "%s"}' % b_blob.encode())
    with pytest.raises(CorruptSnapshot, match="outside its prefix"):
        snapshots.load("snap-c")


def _task(settings, endpoints, topic, out, group, producer, processor=None, **kwargs) -> PartitionTask:
    store = connect.object_store(settings, endpoints)
    committer = OffsetCommitter(KafkaConsumer(**connect.kafka_config(settings, endpoints), group_id=group))
    processor = processor or PassThroughProcessor(out)
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
        **kwargs,
    )
    task.recover_ledger(
        lambda: connect.consumer(settings, endpoints, group_id=None, fetch_max_wait_ms=20), [out]
    )
    return task


def _record(topic: str, offset: int, stream: str, seq: int) -> KafkaRecord:
    return KafkaRecord(topic, 0, offset, stream.encode(), frame_bytes(stream, seq), 0)


def test_task_crash_between_commits_gives_each_output_once(stack_settings, endpoints) -> None:
    topic, out = new_topics(stack_settings, endpoints, "task-in", "task-out", partitions=1)
    group = f"g-{topic}"
    records = [_record(topic, i, f"st{i % 3}", i // 3) for i in range(40)]

    producer = OutputProducer(connect.producer(stack_settings, endpoints))
    task = _task(
        stack_settings, endpoints, topic, out, group, producer, commit_every=15, commit_interval_s=1e9
    )
    for record in records[:25]:  # commits after 15; 10 more absorbed, produced, not committed
        task.process(record)
    producer.flush()
    producer.close()  # "crash": the in-memory states of the last 10 records are lost
    assert task.progress.next_offset == 15

    producer = OutputProducer(connect.producer(stack_settings, endpoints))
    task = _task(
        stack_settings, endpoints, topic, out, group, producer, commit_every=15, commit_interval_s=1e9
    )
    for record in records[task.progress.next_offset :]:  # the source resumes at the commit
        task.process(record)
    task.commit()
    producer.close()
    assert producer.suppressed == 10
    keys = [m.key for m in read_all(stack_settings, endpoints, out)]
    assert sorted(keys) == sorted(f"st{i % 3}:{i // 3}".encode() for i in range(40))


def test_a_task_sharing_its_producer_keeps_the_window_it_has_not_replayed(stack_settings, endpoints) -> None:
    """Two tasks (two input topics) write one output partition through one producer, as the fused
    pipeline does. After a crash, the slow task commits before it has re-emitted every output of the
    killed run, while the fast task's new outputs land after them; a second crash must still find
    the rest in its ledger (the chaos test's duplicated note)."""
    fast, slow, out = new_topics(stack_settings, endpoints, "share-a", "share-b", "share-out", partitions=1)
    group = f"g-{fast}"
    a_records = [_record(fast, i, "sa", i) for i in range(30)]
    b_records = [_record(slow, i, "sb", i) for i in range(30)]

    def run(a_from: int | None, a_to: int, b_from: int, b_to: int, commit: bool) -> OutputProducer:
        producer = OutputProducer(connect.producer(stack_settings, endpoints))
        if a_from is not None:
            a = _task(
                stack_settings, endpoints, fast, out, group, producer, commit_every=15, commit_interval_s=1e9
            )
            for record in a_records[max(a_from, a.progress.next_offset) : a_to]:
                a.process(record)
        b = _task(
            stack_settings, endpoints, slow, out, group, producer, commit_every=15, commit_interval_s=1e9
        )
        for record in b_records[max(b_from, b.progress.next_offset) : b_to]:
            b.process(record)
        if commit:
            b.commit()
        producer.flush()
        producer.close()  # "crash"
        return producer, b

    run(0, 25, 0, 25, commit=False)  # both commit after 15 records; 10 more each are written
    second, slow_task = run(15, 30, 15, 18, commit=True)  # the slow task replays 3 of its 10, commits
    assert second.suppressed == 13 and second.sent == 5
    messages = read_all(stack_settings, endpoints, out)
    first_unreplayed = min(m.offset for m in messages if m.key == b"sb:18")
    assert slow_task.progress.outputs[out][0] == first_unreplayed  # held back, not past sa:25..29
    _, slow_task = run(None, 0, 18, 30, commit=True)
    keys = [m.key for m in read_all(stack_settings, endpoints, out)]
    twice = sorted(k for k in set(keys) if keys.count(k) > 1)
    assert not twice, f"written twice: {twice}"
    assert sorted(keys) == sorted(
        [f"sa:{i}".encode() for i in range(30)] + [f"sb:{i}".encode() for i in range(30)]
    )
    assert slow_task.progress.outputs[out][0] == len(keys)  # every output written again: nothing held


class _TicksOnce(PassThroughProcessor):
    """Writes one more output, on the first tick after frame 7 (a held question timing out)."""

    def tick(self, state, now_us):
        if state.get("ticked") or state["last_seq"] < 7:
            return state, []
        return {**state, "ticked": True}, [Output(self.output_topic, b"tk/tick", b"t")]


def test_a_tick_output_not_yet_ticked_again_holds_the_positions(stack_settings, endpoints) -> None:
    """The killed run ticked after frame 7; the restarted run goes past that point and commits
    before its next tick. The tick's output must stay in the window a second restart reads."""
    topic, out = new_topics(stack_settings, endpoints, "tick-in", "tick-out", partitions=1)
    group = f"g-{topic}"
    records = [_record(topic, i, "tk", i) for i in range(20)]

    def run(stop: int, tick_at: int | None, commit: bool) -> PartitionTask:
        producer = OutputProducer(connect.producer(stack_settings, endpoints))
        task = _task(
            stack_settings,
            endpoints,
            topic,
            out,
            group,
            producer,
            _TicksOnce(out),
            commit_every=1000,
            commit_interval_s=1e9,
        )
        if task.progress.next_offset == 0:
            for record in records[:5]:
                task.process(record)
            task.commit()
        for record in records[task.progress.next_offset : stop]:
            task.process(record)
            if record.offset == tick_at:
                task.tick()
        if commit:
            task.commit()
        producer.flush()
        producer.close()
        return task

    run(10, tick_at=7, commit=False)  # commits after 5; frames 5..9 and the tick written; killed
    second = run(12, tick_at=None, commit=True)  # passes frame 7 without a tick; commits
    tick_offset = next(m.offset for m in read_all(stack_settings, endpoints, out) if m.key == b"tk/tick")
    assert second.progress.outputs[out][0] == tick_offset
    run(20, tick_at=15, commit=True)
    keys = [m.key for m in read_all(stack_settings, endpoints, out)]
    assert sorted(keys) == sorted([b"tk/tick"] + [f"tk:{i}".encode() for i in range(20)]), keys


class _TicksForOneStream(PassThroughProcessor):
    """On a tick, stream "tk" writes one more output once it has frame 4 (a held question timing out)."""

    def initial_state(self, stream_id: str) -> dict:
        return {**super().initial_state(stream_id), "stream": stream_id}

    def tick(self, state, now_us):
        if state["stream"] != "tk" or state.get("ticked") or state["last_seq"] < 4:
            return state, []
        return {**state, "ticked": True}, [Output(self.output_topic, b"tk/tick", b"t")]


def test_a_tick_output_waits_for_a_tick_that_gave_its_stream_a_turn(stack_settings, endpoints) -> None:
    """The killed run ticked stream tk after other streams' records. The restarted run ticks at that
    position before any record of tk has loaded tk's state: that tick cannot have written tk's
    output again, so it must not let go of it (a second restart would write it twice)."""
    topic, out = new_topics(stack_settings, endpoints, "tick2-in", "tick2-out", partitions=1)
    group = f"g-{topic}"
    records = (
        [_record(topic, i, "tk", i) for i in range(5)]
        + [_record(topic, 5 + i, "ot", i) for i in range(8)]
        + [_record(topic, 13, "tk", 5)]
    )

    def run(steps) -> PartitionTask:
        producer = OutputProducer(connect.producer(stack_settings, endpoints))
        task = _task(
            stack_settings,
            endpoints,
            topic,
            out,
            group,
            producer,
            _TicksForOneStream(out),
            commit_every=1000,
            commit_interval_s=1e9,
        )
        for step in steps:
            if step == "tick":
                task.tick()
            elif step == "commit":
                task.commit()
            else:
                task.process(records[step])
        producer.flush()
        producer.close()
        return task

    run([0, 1, 2, 3, 4, "commit", 5, 6, 7, 8, 9, "tick"])  # tk's output at position 10; killed
    second = run([5, 6, 7, 8, 9, "tick", 10, 11, 12, "commit"])  # tk not loaded at that tick
    tick_offset = next(m.offset for m in read_all(stack_settings, endpoints, out) if m.key == b"tk/tick")
    assert second.progress.outputs[out][0] == tick_offset
    run([13, "tick", "commit"])
    keys = [m.key for m in read_all(stack_settings, endpoints, out)]
    assert sorted(keys) == sorted(
        [b"tk/tick", *(f"tk:{i}".encode() for i in range(6)), *(f"ot:{i}".encode() for i in range(8))]
    ), keys


def test_zombie_task_is_fenced(stack_settings, endpoints) -> None:
    topic, out = new_topics(stack_settings, endpoints, "zombie-in", "zombie-out", partitions=1)
    group = f"g-{topic}"
    producer = OutputProducer(connect.producer(stack_settings, endpoints))
    old = _task(
        stack_settings, endpoints, topic, out, group, producer, commit_every=1000, commit_interval_s=1e9
    )
    new = _task(
        stack_settings, endpoints, topic, out, group, producer, commit_every=1000, commit_interval_s=1e9
    )
    new.process(_record(topic, 0, "z", 0))
    new.commit()
    old.process(_record(topic, 0, "z2", 0))
    with pytest.raises(ProgressConflict):
        old.commit()
    producer.close()


def test_passthrough_pipeline_drops_duplicates_dead_letters_garbage_and_goes_on(
    stack_settings, endpoints
) -> None:
    topic, out = new_topics(stack_settings, endpoints, "pt-in", "pt-out")
    producer = connect.producer(stack_settings, endpoints)
    for seq in range(20):
        for stream in ("cam-a", "cam-b"):
            producer.send(topic, key=stream.encode(), value=frame_bytes(stream, seq))
        if seq == 7:
            producer.send(topic, key=b"cam-a", value=frame_bytes("cam-a", 3))  # duplicate seq
            producer.send(topic, key=b"cam-b", value=b"\x00not arrow")  # malformed
            producer.send(topic, key=b"../etc", value=frame_bytes("cam-a", 99))  # bad key
    send_end_of_stream(producer, topic)
    producer.flush()
    producer.close()
    passthrough.run(stack_settings, topic, out, f"g-{topic}", commit_every=8, bounded=True)
    keys = sorted(m.key for m in read_all(stack_settings, endpoints, out))
    assert keys == sorted(f"{s}:{q}".encode() for q in range(20) for s in ("cam-a", "cam-b"))
    letters = [
        decode(m.value, DeadLetter)
        for m in read_all(stack_settings, endpoints, stack_settings.topics.dead_letter)
        if m.value and decode(m.value, DeadLetter).source_topic == topic
    ]
    assert sorted(letter.reason for letter in letters) == ["invalid_field", "malformed"]
    assert all(letter.payload_size > 0 for letter in letters)


def test_decode_or_dead_letter_and_write_to_kafka(stack_settings, endpoints) -> None:
    from streamvqa.operators.io.transforms import DEAD_LETTER, DecodeOrDeadLetter, WriteToKafka
    from streamvqa.schemas import Frame

    topic, out, dlq = new_topics(stack_settings, endpoints, "dec-in", "dec-out", "dec-dlq")
    producer = connect.producer(stack_settings, endpoints)
    for seq in range(6):
        producer.send(topic, key=b"cam", value=frame_bytes("cam", seq))
    producer.send(topic, key=b"cam", value=frame_bytes("cam", 6)[:-30])  # truncated
    send_end_of_stream(producer, topic)
    producer.flush()
    producer.close()
    kafka = connect.kafka_config(stack_settings, endpoints)
    for _ in range(2):  # the second run re-reads everything; the ledger keeps outputs single
        with beam.Pipeline(runner=FnApiRunner(), options=PipelineOptions(streaming=True)) as p:
            decoded = (
                p
                | ReadFromKafka(SourceConfig(client=kafka, end_markers=True), [topic])
                | beam.ParDo(DecodeOrDeadLetter(Frame, dlq)).with_outputs(DEAD_LETTER, main="frames")
            )
            (
                decoded.frames
                | beam.Map(lambda f: Output(out, f"{f.stream_id}:{f.seq}".encode(), b"%d" % f.width))
                | "Out" >> WriteToKafka(kafka, ledger_topics=(out,))
            )
            decoded[DEAD_LETTER] | "DLQ" >> WriteToKafka(kafka, ledger_topics=(dlq,))
    assert sorted(m.key for m in read_all(stack_settings, endpoints, out)) == [
        b"cam:%d" % i for i in range(6)
    ]
    letters = [decode(m.value, DeadLetter) for m in read_all(stack_settings, endpoints, dlq)]
    assert [letter.reason for letter in letters] == ["truncated"]
    assert letters[0].source_topic == topic and letters[0].source_offset == 6


def test_progress_keeps_positions_of_partitions_not_written_since(stack_settings, endpoints) -> None:
    (topic,) = new_topics(stack_settings, endpoints, "pos-in", partitions=1)
    (out,) = new_topics(stack_settings, endpoints, "pos-out", partitions=3)
    producer = OutputProducer(connect.producer(stack_settings, endpoints))
    for i in range(5):  # history in every output partition, written by someone else
        producer.send(Output(out, b"old-%d" % i, b"x"))
    producer.flush()
    producer.close()
    producer = OutputProducer(connect.producer(stack_settings, endpoints))
    task = _task(
        stack_settings,
        endpoints,
        topic,
        out,
        f"g-{topic}",
        producer,
        commit_every=1000,
        commit_interval_s=1e9,
    )
    ends = task.progress.outputs[out]
    assert set(ends) == {0, 1, 2} and sum(ends.values()) == 5  # generation 0: where outputs ended
    for seq in range(3):
        task.process(_record(topic, seq, "one-stream", seq))  # all to one partition
    task.commit()
    producer.close()
    positions = task.progress.outputs[out]
    assert set(positions) == {0, 1, 2}
    assert sum(positions.values()) == 5 + 3


def test_two_streams_reusing_a_query_id_each_get_their_note_once_across_a_kill(
    stack_settings, endpoints
) -> None:
    """Output identities are scoped by stream (issue #20, defect 4). The ledger suppresses an
    identity across all partitions of a topic, once: when two streams on two partitions asked
    with the same query id and the pipeline was killed in the commit window, the restarted run
    suppressed the wrong stream's note (one question lost) and wrote the other's again."""
    from streamvqa.pipelines.video_qa.queries import QueryStage
    from streamvqa.schemas import Query, encode

    x_topic, y_topic, out = new_topics(stack_settings, endpoints, "qid-x", "qid-y", "qid-out", partitions=1)
    group = f"g-{x_topic}"

    def query(topic: str, stream: str) -> KafkaRecord:
        q = Query(query_id="same-id", stream_id=stream, text=f"what did {stream} say?", asked_at_us=1_000)
        return KafkaRecord(topic, 0, 0, stream.encode(), encode(q), 0)

    def task(topic: str, producer) -> PartitionTask:
        return _task(
            stack_settings,
            endpoints,
            topic,
            out,
            group,
            producer,
            QueryStage(out),
            commit_every=1000,
            commit_interval_s=1e9,
        )

    producer = OutputProducer(connect.producer(stack_settings, endpoints))
    task(x_topic, producer).process(query(x_topic, "cam-x"))  # written, not committed: killed
    producer.flush()
    producer.close()

    producer = OutputProducer(connect.producer(stack_settings, endpoints))  # the restarted run
    y_task, x_task = task(y_topic, producer), task(x_topic, producer)
    y_task.process(query(y_topic, "cam-y"))  # the other partition's task gets its turn first
    x_task.process(query(x_topic, "cam-x"))  # the replay of what the killed run wrote
    y_task.commit()
    x_task.commit()
    producer.close()
    notes = sorted((m.key, dict(m.headers)["streamvqa-id"]) for m in read_all(stack_settings, endpoints, out))
    assert notes == [(b"cam-x", b"cam-x/q/same-id"), (b"cam-y", b"cam-y/q/same-id")], notes


def test_an_output_identity_that_does_not_name_its_stream_is_refused(stack_settings, endpoints) -> None:
    from streamvqa.operators.io.exactly_once import UnscopedOutput

    class Unscoped(PassThroughProcessor):
        def process(self, state, record):
            state, outputs = super().process(state, record)
            return state, [
                Output(o.topic, b"seq-only", o.value, partition_key=o.partition_key) for o in outputs
            ]

    topic, out = new_topics(stack_settings, endpoints, "unscoped-in", "unscoped-out", partitions=1)
    producer = OutputProducer(connect.producer(stack_settings, endpoints))
    task = _task(stack_settings, endpoints, topic, out, f"g-{topic}", producer, Unscoped(out))
    with pytest.raises(UnscopedOutput, match="seq-only"):
        task.process(_record(topic, 0, "cam-u", 0))
    producer.close()
    assert not read_all(stack_settings, endpoints, out, timeout_ms=1000)
