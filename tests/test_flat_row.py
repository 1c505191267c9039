"""The flat-row reader (decode's hot path) against pyarrow: the same row for every valid message;
for corrupted ones it either reads what pyarrow reads or declines (and decode takes pyarrow's path)."""

from __future__ import annotations

import random

import pyarrow as pa
import pytest

from streamvqa.schemas import AudioChunk, DeadLetter, Frame, Limits, SchemaError, SpeechNote, decode, encode
from streamvqa.schemas.codec import _check_framing, _known_schema
from streamvqa.schemas.flat_row import FlatPlan, read_row


def _records() -> list:
    jpeg = b"\xff\xd8" + bytes(range(256)) * 4 + b"\xff\xd9"
    return [
        Frame(stream_id="cam-a", seq=7, pts_us=5, codec="jpeg", width=320, height=240, payload=jpeg),
        AudioChunk(
            stream_id="mic.1",
            seq=2**40,
            pts_us=123,
            sample_rate=16000,
            channels=2,
            sample_format="s16le",
            payload=b"\x00\x01" * 64,
        ),
        DeadLetter(
            source_topic="t.frames",
            source_partition=3,
            source_offset=99,
            key=None,
            reason="truncated",
            detail="cut short: naïve — ünïcödé ✓",
            payload_excerpt=b"",
            payload_size=0,
            failed_at_us=1,
        ),
        DeadLetter(
            source_topic="t",
            source_partition=0,
            source_offset=0,
            key=b"k\x00",
            reason="malformed",
            detail="",
            payload_excerpt=b"\xff",
            payload_size=1,
            failed_at_us=2,
        ),
        SpeechNote(
            stream_id="s",
            seq=1,
            start_us=0,
            end_us=10,
            wall_us=5,
            text="hello 世界",
            avg_logprob=-0.25,
            asr_ms=1.5,
            open_since_us=None,
        ),
        SpeechNote(
            stream_id="s",
            seq=1,
            start_us=0,
            end_us=10,
            wall_us=5,
            text="",
            avg_logprob=-1e300,
            asr_ms=0.0,
            open_since_us=4,
        ),
    ]


def _pyarrow_row(data: bytes) -> dict:
    """What decode reads without the fast path: the framing walked, then pyarrow, fully validated."""
    _check_framing(data, Limits())
    reader = pa.ipc.open_stream(pa.py_buffer(data))
    batches = list(reader)
    for batch in batches:
        batch.validate(full=True)
    assert sum(b.num_rows for b in batches) == 1
    return next(b for b in batches if b.num_rows).to_pylist()[0]


def _fast_row(data: bytes, cls) -> dict | None:
    known = _known_schema(data, cls)
    assert known is not None and known[2] is not None
    return read_row(data, 8 + int.from_bytes(data[4:8], "little", signed=True), known[2])


@pytest.mark.parametrize("record", _records(), ids=lambda r: type(r).__name__)
def test_the_fast_row_is_pyarrows_row(record) -> None:
    data = encode(record)
    assert decode(data, type(record)) == record  # the first decode checks the schema (pyarrow path)
    row = _fast_row(data, type(record))
    assert row is not None, "a valid flat message must take the fast path"
    expected = _pyarrow_row(data)
    assert row.keys() == expected.keys()
    for name, value in expected.items():
        assert row[name] == value or (value != value and row[name] != row[name]), name  # NaN-safe
    assert decode(data, type(record)) == record


def test_only_flat_schemas_get_a_plan() -> None:
    from streamvqa.schemas import Answer, Query, VisualNote

    assert all(FlatPlan.of(c.SCHEMA) is not None for c in (Frame, AudioChunk, DeadLetter, SpeechNote))
    assert all(FlatPlan.of(c.SCHEMA) is None for c in (Answer, Query, VisualNote))


def test_corrupted_batches_are_read_as_pyarrow_reads_them_or_declined() -> None:
    """Corrupt what follows the schema message thousands of times (bytes flipped, mostly in the
    batch's metadata; cut short; bytes appended): whenever the fast reader returns a row, the
    framing check and pyarrow accept the message and read the same row; decode never raises
    anything but a SchemaError."""
    rng = random.Random(20261124)
    fast_rows = declined = refused = 0
    for record in _records():
        data = encode(record)
        decode(data, type(record))
        schema_end = 8 + int.from_bytes(data[4:8], "little", signed=True)
        meta_end = (
            schema_end + 8 + int.from_bytes(data[schema_end + 4 : schema_end + 8], "little", signed=True)
        )
        for _ in range(700):
            corrupt = bytearray(data)
            mode = rng.random()
            if mode < 0.1:
                corrupt = corrupt[: rng.randrange(schema_end, len(corrupt))]
            elif mode < 0.15:
                corrupt += bytes(rng.randrange(1, 16))
            else:
                for _ in range(rng.choice((1, 1, 2, 3))):
                    at = (
                        rng.randrange(schema_end, meta_end)
                        if rng.random() < 0.7
                        else rng.randrange(meta_end, len(data))
                    )
                    corrupt[at] = rng.choice((0, 1, 2, 4, 8, 0x7F, 0x80, 0xFF, rng.randrange(256)))
            corrupt = bytes(corrupt)
            row = _fast_row(corrupt, type(record))
            try:
                expected = _pyarrow_row(corrupt)
            except Exception:
                expected = None
                refused += 1
            if row is None:
                declined += 1
            else:
                fast_rows += 1
                assert expected is not None, corrupt.hex()
                assert {k: v for k, v in row.items() if v == v} == {
                    k: v for k, v in expected.items() if v == v
                }
            try:
                decode(corrupt, type(record))
            except SchemaError:
                pass
    assert fast_rows > 100 and declined > 100 and refused > 100, (fast_rows, declined, refused)
