"""A ticking processor gets its turns on a busy partition too: heartbeats come only when a
partition is idle, and a question's hold timeout must not wait for idleness."""

from __future__ import annotations

import time
from typing import ClassVar

import pytest

from streamvqa import connect
from streamvqa.operators.io.exactly_once import ExactlyOnceDoFn, TaskConfig
from streamvqa.operators.io.records import KafkaBatch, KafkaRecord
from streamvqa.pipelines.passthrough import PassThroughProcessor
from tests.kafka_helpers import frame_bytes, new_topics

pytestmark = pytest.mark.stack


class Ticking(PassThroughProcessor):
    ticks: ClassVar[list[int]] = []

    def tick(self, state, now_us):
        Ticking.ticks.append(now_us)
        return state, []


def test_a_busy_partition_is_ticked_without_heartbeats(stack_settings, endpoints) -> None:
    topic, out = new_topics(stack_settings, endpoints, "busy-in", "busy-out", partitions=1)
    config = TaskConfig(
        kafka=connect.kafka_config(stack_settings, endpoints),
        s3=endpoints.s3,
        bucket=stack_settings.s3.bucket,
        group=f"g-{topic}",
        output_topics=(out,),
        dead_letter_topic=stack_settings.topics.dead_letter,
    )
    fn = ExactlyOnceDoFn(config, lambda: Ticking(out))
    fn.setup()
    offset = 0

    def batch() -> None:
        nonlocal offset
        records = tuple(
            KafkaRecord(topic, 0, offset + i, b"cam-b", frame_bytes("cam-b", offset + i), 0) for i in range(2)
        )
        fn.process(KafkaBatch(topic, 0, records))
        offset += 2

    try:
        batch()  # the partition's task is built (ledger recovered) on its first batch
        Ticking.ticks = []
        t0 = time.monotonic()
        while time.monotonic() - t0 < 1.6:  # never idle: a batch every 50 ms
            batch()
            time.sleep(0.05)
        fn.finish_bundle()
    finally:
        fn.teardown()
    # every tick_interval_s (0.5 s) while records kept coming: 3 in 1.6 s (not one per batch)
    assert 2 <= len(Ticking.ticks) <= 4, Ticking.ticks
