"""What the stages share: limits from the settings, note outputs, wall-clock helpers."""

from __future__ import annotations

import time

from streamvqa.operators.io.records import KafkaRecord, Output
from streamvqa.schemas import Limits, encode
from streamvqa.schemas.records import Record

from streamvqa.settings import Settings


def limits_from(settings: Settings) -> Limits:
    return Limits(
        max_message_bytes=settings.limits.max_message_bytes,
        max_payload_bytes=settings.limits.max_message_bytes - 64 * 1024,
        max_width=settings.limits.max_frame_side,
        max_height=settings.limits.max_frame_side,
        max_text_chars=settings.limits.max_query_chars,
    )


def wall_us(record: KafkaRecord) -> int:
    """The record's Kafka timestamp in microseconds (the producer's wall clock at its pts)."""
    return max(0, int(record.timestamp_ms) * 1000)


def now_us() -> int:
    return int(time.time() * 1_000_000)


def note(topic: str, key: str, record: Record, source: KafkaRecord) -> Output:
    """A record for the memory topic, keyed uniquely (``key``) and partitioned like its source
    (the stream id), so a stream's notes and questions meet in one partition, in order."""
    return Output(topic, key.encode(), encode(record), partition_key=source.key)
