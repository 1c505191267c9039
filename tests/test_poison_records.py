"""A record the processor keeps failing on (a model raising, not a schema problem) must not stop
its partition forever: each failure fails the run, which is run again from the committed state;
after `max_failures` runs the record is dead-lettered with the reason `processing_failed` and the
partition goes on. Infrastructure errors (object store, broker, network) are never counted."""

from __future__ import annotations

import pytest

from streamvqa.operators.io.exactly_once import is_outage
from streamvqa.operators.io.records import KafkaRecord
from streamvqa.pipelines.passthrough import PassThroughProcessor
from streamvqa.schemas import DeadLetter, Frame, decode
from tests.kafka_helpers import frame_bytes, new_topics, partition_task, read_all

pytestmark = pytest.mark.stack


class FailsOnSeq(PassThroughProcessor):
    """The pass-through, with a 'model' that raises on one frame of one stream."""

    def __init__(self, output_topic: str, bad_seq: int, error: type[Exception] = RuntimeError) -> None:
        super().__init__(output_topic)
        self.bad_seq, self.error = bad_seq, error

    def process(self, state, record):
        if decode(record.value, Frame).seq == self.bad_seq:
            raise self.error("the model failed on this frame")
        return super().process(state, record)


def _task(settings, endpoints, topic, out, group, processor):
    return partition_task(settings, endpoints, topic, [out], group, processor)


def test_a_poison_record_is_dead_lettered_after_three_failed_runs(stack_settings, endpoints) -> None:
    topic, out = new_topics(stack_settings, endpoints, "poison-in", "poison-out", partitions=1)
    group = f"g-{topic}"
    records = [KafkaRecord(topic, 0, i, b"cam-p", frame_bytes("cam-p", i), 0) for i in range(10)]
    runs = 0
    while True:
        runs += 1
        task, producer = _task(stack_settings, endpoints, topic, out, group, FailsOnSeq(out, bad_seq=4))
        try:
            for record in records[task.progress.next_offset :]:  # the source resumes at the commit
                task.process(record)
            task.commit()
            break
        except RuntimeError:
            assert runs <= 3, "the poison record was never set aside"
        finally:
            producer.close()
    assert runs == 4  # three failed runs, then the record is dead-lettered
    keys = sorted(m.key for m in read_all(stack_settings, endpoints, out))
    assert keys == sorted(f"cam-p:{i}".encode() for i in range(10) if i != 4)  # each once, the rest went on
    letters = [
        decode(m.value, DeadLetter)
        for m in read_all(stack_settings, endpoints, stack_settings.topics.dead_letter)
    ]
    mine = [d for d in letters if d.source_topic == topic]
    assert [(d.source_offset, d.reason) for d in mine] == [(4, "processing_failed")]
    assert "the model failed on this frame" in mine[0].detail and "3 runs" in mine[0].detail


def test_outages_are_not_counted_against_a_record(stack_settings, endpoints) -> None:
    assert is_outage(ConnectionRefusedError()) and is_outage(TimeoutError())
    assert not is_outage(RuntimeError("model")) and not is_outage(ValueError("bad"))
    topic, out = new_topics(stack_settings, endpoints, "outage-in", "outage-out", partitions=1)
    group = f"g-{topic}"
    record = KafkaRecord(topic, 0, 0, b"cam-o", frame_bytes("cam-o", 0), 0)
    for _ in range(5):
        task, producer = _task(
            stack_settings, endpoints, topic, out, group, FailsOnSeq(out, bad_seq=0, error=ConnectionError)
        )
        with pytest.raises(ConnectionError):
            task.process(record)
        producer.close()
    assert task._failures == {}  # never counted: after the outage the record is processed normally
    task, producer = _task(stack_settings, endpoints, topic, out, group, PassThroughProcessor(out))
    task.process(record)
    task.commit()
    producer.close()
    assert [m.key for m in read_all(stack_settings, endpoints, out)] == [b"cam-o:0"]
