"""What the stages share: limits from the settings, note outputs, wall-clock helpers, the
layout of their state blobs."""

from __future__ import annotations

import json
import struct
import time
from typing import cast

from streamvqa.operators.io.records import OUTPUT_ID_HEADER, KafkaRecord, Output
from streamvqa.schemas import InvalidField, Limits, decode, encode
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


def decode_keyed(record: KafkaRecord, record_type, limits: Limits):
    """The record of an input topic, decoded (SchemaError -> dead letter) and checked to be of the
    stream its Kafka key names: a message cannot reach another stream's state."""
    item = decode(record.value, record_type, limits)
    if item.stream_id.encode() != record.key:
        raise InvalidField(
            f"record key {record.key!r} is not the {record_type.__name__}'s stream id", "stream_id"
        )
    return item


def wall_us(record: KafkaRecord) -> int:
    """The record's Kafka timestamp in microseconds (the producer's wall clock at its pts)."""
    return max(0, int(record.timestamp_ms) * 1000)


def now_us() -> int:
    return int(time.time() * 1_000_000)


def note(topic: str, identity: str, value: Record | bytes, source: KafkaRecord) -> Output:
    """A message for the memory topic: keyed by the stream id like its source (so a stream's
    notes and questions meet in one partition, in order, and the memory stage's task knows the
    stream), identified by ``identity`` (unique per note: a repeated write is recognised)."""
    data = value if isinstance(value, bytes) else encode(value)
    # the source's key is its stream id (decode_keyed checks it)
    return Output(
        topic,
        cast(bytes, source.key),
        data,
        headers=((OUTPUT_ID_HEADER, identity.encode()),),
        partition_key=source.key,
    )


def tagged_blob(tag: bytes, head: dict, body: bytes = b"") -> bytes:
    """``tag``, a length-prefixed JSON ``head``, then ``body``: the layout of the stages' states
    and of the memory stage's index chunks."""
    raw = json.dumps(head, sort_keys=True).encode()
    return tag + struct.pack("<I", len(raw)) + raw + body


def read_tagged_blob(tag: bytes, data: bytes, what: str) -> tuple[dict, bytes]:
    """(head, body) of a :func:`tagged_blob`; ValueError when ``data`` is not one of ``tag``."""
    if not data.startswith(tag):
        raise ValueError(f"not a {what}")
    (n,) = struct.unpack_from("<I", data, len(tag))
    at = len(tag) + 4
    return json.loads(data[at : at + n]), data[at + n :]
