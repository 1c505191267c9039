"""Record schemas and codec: round trips, hostile bytes, and every validation rule."""

from __future__ import annotations

import dataclasses
import math
import pickle
import re

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamvqa.schemas import (
    DEFAULT_LIMITS,
    MAX_TIME_US,
    RECORD_TYPES,
    Answer,
    AudioChunk,
    DeadLetter,
    EvidenceSpan,
    Frame,
    InvalidField,
    Limits,
    MalformedMessage,
    ManifestBlock,
    ManifestFrame,
    MemoryManifest,
    OversizedMessage,
    Query,
    SchemaError,
    SchemaMismatch,
    SourceOffset,
    SpeechNote,
    StageLatency,
    TruncatedMessage,
    VisualNote,
    WrongRecordType,
    WrongVersion,
    decode,
    decode_any,
    encode,
    make_dead_letter,
    validate,
)

ROUND_TRIP = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# Mutations of valid messages; every single-byte flip is also tried exhaustively below.
MUTATE = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])

JPEG = b"\xff\xd8\xff\xe0" + bytes(range(40)) + b"\xff\xd9"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(30) + b"\x00\x00\x00\x00IEND\xaeB`\x82"

# ------------------------------------------------------------------ strategies

ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def tokens(first: str, rest: str, max_size: int) -> st.SearchStrategy[str]:
    """Strings of one character from ``first`` then up to ``max_size`` from ``rest``
    (cheaper to generate than st.from_regex)."""
    return st.builds(str.__add__, st.sampled_from(first), st.text(rest, max_size=max_size))


ids = tokens(ALNUM, ALNUM + "._-", 40).filter(lambda s: ".." not in s)
times = st.integers(0, MAX_TIME_US)
counters = st.integers(0, 2**63 - 1)
words = st.text(min_size=1, max_size=40).filter(lambda s: s.strip())
finite = st.floats(allow_nan=False, allow_infinity=False)
topics = st.text(ALNUM + "._-", min_size=1, max_size=40).filter(lambda s: s not in {".", ".."})
hashes = tokens(ALNUM, ALNUM + ":._-", 70)
object_keys = st.just("") | st.lists(tokens(ALNUM + "_-", ALNUM + "._-", 12), min_size=1, max_size=4).map(
    "/".join
)


def jpeg_bytes(draw) -> bytes:
    return b"\xff\xd8" + draw(st.binary(max_size=64)) + b"\xff\xd9"


def png_bytes(draw) -> bytes:
    return PNG[:8] + draw(st.binary(max_size=64)) + PNG[-12:]


@st.composite
def frames(draw) -> Frame:
    codec = draw(st.sampled_from(["jpeg", "png", "rgb24"]))
    if codec == "rgb24":
        width, height = draw(st.integers(1, 16)), draw(st.integers(1, 16))
        payload = draw(st.binary(min_size=width * height * 3, max_size=width * height * 3))
    else:
        width, height = draw(st.integers(1, 8192)), draw(st.integers(1, 8192))
        payload = jpeg_bytes(draw) if codec == "jpeg" else png_bytes(draw)
    return Frame(
        stream_id=draw(ids),
        seq=draw(counters),
        pts_us=draw(times),
        codec=codec,
        width=width,
        height=height,
        payload=payload,
    )


@st.composite
def audio_chunks(draw) -> AudioChunk:
    channels = draw(st.integers(1, 8))
    sample_format = draw(st.sampled_from(["s16le", "f32le"]))
    n = draw(st.integers(1, 60)) * channels
    if sample_format == "s16le":
        payload = draw(st.binary(min_size=2 * n, max_size=2 * n))
    else:
        samples = draw(
            st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=n, max_size=n)
        )
        payload = np.array(samples, dtype="<f4").tobytes()
    return AudioChunk(
        stream_id=draw(ids),
        seq=draw(counters),
        pts_us=draw(st.integers(0, MAX_TIME_US - 60_000_000)),  # the chunk ends by MAX_TIME_US too
        sample_rate=draw(st.integers(1, 192_000)),
        channels=channels,
        sample_format=sample_format,
        payload=payload,
    )


@st.composite
def queries(draw) -> Query:
    options = draw(st.none() | st.lists(words, min_size=1, max_size=26, unique=True).map(tuple))
    codec = draw(st.sampled_from([None, "jpeg", "png"]))
    image = None if codec is None else (jpeg_bytes(draw) if codec == "jpeg" else png_bytes(draw))
    return Query(
        query_id=draw(ids),
        stream_id=draw(ids),
        text=draw(words),
        asked_at_us=draw(times),
        options=options,
        image=image,
        image_codec=codec,
    )


@st.composite
def spans(draw) -> EvidenceSpan:
    start = draw(times)
    return EvidenceSpan(start_us=start, end_us=draw(st.integers(start, MAX_TIME_US)), score=draw(finite))


answers = st.builds(
    Answer,
    query_id=ids,
    stream_id=ids,
    text=st.text(max_size=200),
    answered_at_us=times,
    model_id=tokens(ALNUM, ALNUM + "._:/@+-", 40),
    evidence=st.lists(spans(), max_size=5).map(tuple),
    latency=st.lists(
        st.builds(
            StageLatency,
            stage=tokens(ALNUM, ALNUM + "._:-", 20),
            ms=st.floats(min_value=0, allow_infinity=False),
        ),
        max_size=5,
    ).map(tuple),
)


@st.composite
def dead_letters(draw) -> DeadLetter:
    excerpt = draw(st.binary(max_size=1024))
    return DeadLetter(
        source_topic=draw(topics),
        source_partition=draw(st.integers(-1, 2**31 - 1)),
        source_offset=draw(st.integers(-1, 2**63 - 1)),
        key=draw(st.none() | st.binary()),
        reason=draw(tokens("abcdefghijklmnopqrstuvwxyz", "abcdefghijklmnopqrstuvwxyz0123456789_", 30)),
        detail=draw(st.text(max_size=200)),
        payload_excerpt=excerpt,
        payload_size=len(excerpt) + draw(st.integers(0, 2**40)),
        failed_at_us=draw(times),
    )


@st.composite
def manifest_blocks(draw) -> ManifestBlock:
    start = draw(times)
    return ManifestBlock(
        block_index=draw(counters),
        start_us=start,
        end_us=draw(st.integers(start, MAX_TIME_US)),
        tier=draw(st.sampled_from(["gpu", "cpu", "disk", "object"])),
        nbytes=draw(counters),
        key=draw(object_keys),
        content_hash=draw(hashes),
    )


manifests = st.builds(
    MemoryManifest,
    stream_id=ids,
    generation=counters,
    updated_at_us=times,
    token_budget=counters,
    total_tokens=counters,
    frames=st.lists(
        st.builds(
            ManifestFrame,
            seq=counters,
            pts_us=times,
            tier=st.sampled_from(["clear", "fuzzy", "evicted"]),
            tokens=st.integers(0, 2**31 - 1),
            score=finite,
            content_hash=hashes,
        ),
        max_size=5,
    ).map(tuple),
    kv_blocks=st.lists(manifest_blocks(), max_size=5).map(tuple),
    source_offsets=st.lists(
        st.builds(SourceOffset, topic=topics, partition=st.integers(0, 2**31 - 1), next_offset=counters),
        max_size=3,
    ).map(tuple),
)

STRATEGIES = {
    Frame: frames(),
    AudioChunk: audio_chunks(),
    Query: queries(),
    Answer: answers,
    DeadLetter: dead_letters(),
    MemoryManifest: manifests,
}
any_record = st.one_of(*STRATEGIES.values())

# ------------------------------------------------------------------ fixed samples

FRAME = Frame(
    stream_id="cam-1",
    seq=7,
    pts_us=1_000_000,
    codec="rgb24",
    width=4,
    height=2,
    payload=bytes(range(24)),
)
JPEG_FRAME = Frame(
    stream_id="cam-1", seq=8, pts_us=1_033_333, codec="jpeg", width=640, height=480, payload=JPEG
)
AUDIO = AudioChunk(
    stream_id="cam-1",
    seq=3,
    pts_us=500_000,
    sample_rate=16_000,
    channels=2,
    sample_format="f32le",
    payload=np.linspace(-1, 1, 64, dtype="<f4").tobytes(),
)
QUERY = Query(
    query_id="q-1",
    stream_id="cam-1",
    text="What colour is the car?",
    asked_at_us=1_700_000_000_000_000,
)
MC_QUERY = Query(
    query_id="q-2",
    stream_id="cam-1",
    text="When did this appear?",
    asked_at_us=1_700_000_000_000_001,
    options=("red", "blue", "green"),
    image=PNG,
    image_codec="png",
)
ANSWER = Answer(
    query_id="q-1",
    stream_id="cam-1",
    text="Red.",
    model_id="smollm2-135m",
    answered_at_us=1_700_000_000_500_000,
    evidence=(
        EvidenceSpan(start_us=0, end_us=2_000_000, score=0.9),
        EvidenceSpan(start_us=5_000_000, end_us=5_000_000, score=-0.5),
    ),
    latency=(StageLatency(stage="retrieve", ms=3.5), StageLatency(stage="llm.decode", ms=120.0)),
)
DEAD = DeadLetter(
    source_topic="frames",
    source_partition=2,
    source_offset=1234,
    key=b"cam-1",
    reason="truncated",
    detail="message ends early",
    payload_excerpt=b"\xff\xff",
    payload_size=2,
    failed_at_us=1_700_000_000_000_000,
)
MANIFEST = MemoryManifest(
    stream_id="cam-1",
    generation=4,
    updated_at_us=1_700_000_000_000_000,
    token_budget=8192,
    total_tokens=300,
    frames=(
        ManifestFrame(seq=1, pts_us=0, tier="clear", tokens=196, score=0.7, content_hash="sha256:ab12"),
        ManifestFrame(seq=2, pts_us=33_333, tier="evicted", tokens=0, score=0.1, content_hash="sha256:cd34"),
    ),
    kv_blocks=(
        ManifestBlock(
            block_index=0,
            start_us=0,
            end_us=33_333,
            tier="object",
            nbytes=1 << 20,
            key="streams/cam-1/kv/000000.bin",
            content_hash="sha256:ef56",
        ),
    ),
    source_offsets=(SourceOffset(topic="frames", partition=0, next_offset=99),),
)
SAMPLES = [FRAME, JPEG_FRAME, AUDIO, QUERY, MC_QUERY, ANSWER, DEAD, MANIFEST]
ENCODED = [encode(r) for r in SAMPLES]


def raw_message(cls, rows, *, schema=None, batches=None) -> bytes:
    """An IPC stream written straight with pyarrow, bypassing encode's validation."""
    schema = schema or cls.SCHEMA
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema) as writer:
        for part in batches or [rows]:
            writer.write_batch(pa.RecordBatch.from_pylist(part, schema=schema))
    return sink.getvalue().to_pybytes()


def row(record) -> dict:
    return dataclasses.asdict(record)


# ------------------------------------------------------------------ round trips


@pytest.mark.parametrize("cls", list(STRATEGIES), ids=lambda c: c.__name__)
@ROUND_TRIP
@given(data=st.data())
def test_round_trip(cls, data) -> None:
    record = data.draw(STRATEGIES[cls])
    encoded = encode(record)
    decoded = decode(encoded, cls)
    assert decoded == record
    assert type(decoded) is cls
    assert decode_any(encoded) == record


@pytest.mark.parametrize("record", SAMPLES, ids=lambda r: type(r).__name__)
def test_fixed_samples_round_trip(record) -> None:
    decoded = decode(encode(record), type(record))
    assert decoded == record
    # lists come back as tuples of the item dataclasses, not dicts
    for name in type(record).ITEMS:
        assert all(
            type(item) is type(type(record).ITEMS[name](**row(item))) for item in getattr(decoded, name)
        )


def test_optional_fields_absent_and_present() -> None:
    plain, full = decode(encode(QUERY), Query), decode(encode(MC_QUERY), Query)
    assert (plain.options, plain.image, plain.image_codec) == (None, None, None)
    assert full.options == ("red", "blue", "green") and full.image == PNG
    assert full.image_codec == "png"
    assert decode(encode(dataclasses.replace(DEAD, key=None)), DeadLetter).key is None


def test_schema_metadata_and_keys() -> None:
    for name, cls in RECORD_TYPES.items():
        assert cls.SCHEMA.metadata[b"streamvqa.type"] == name.encode()
        assert cls.SCHEMA.metadata[b"streamvqa.version"] == b"1"
        assert cls.VERSION == 1
        assert cls.SCHEMA.field("schema_version").type == pa.int16()
        assert {f.name for f in dataclasses.fields(cls)} == set(cls.SCHEMA.names)
    assert pa.ipc.open_stream(ENCODED[0]).schema.metadata[b"streamvqa.type"] == b"Frame"
    assert FRAME.message_key() == b"cam-1"
    assert AUDIO.message_key() == b"cam-1"
    assert QUERY.message_key() == b"cam-1"
    assert ANSWER.message_key() == b"q-1"
    assert DEAD.message_key() == b"cam-1"
    assert dataclasses.replace(DEAD, key=None).message_key() is None
    assert MANIFEST.message_key() == b"cam-1"


def test_records_are_frozen_and_slotted() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        FRAME.width = 5  # type: ignore[misc]
    assert not hasattr(FRAME, "__dict__")
    assert hash(ANSWER) == hash(decode(encode(ANSWER), Answer))


def test_encoding_is_one_row_ipc_stream() -> None:
    reader = pa.ipc.open_stream(encode(ANSWER))
    table = reader.read_all()
    assert table.num_rows == 1
    assert table.schema.equals(Answer.SCHEMA, check_metadata=True)
    assert encode(ANSWER).endswith(b"\xff\xff\xff\xff\x00\x00\x00\x00")


# ------------------------------------------------------------------ hostile bytes


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes_raise_only_schema_errors(data: bytes) -> None:
    with pytest.raises(SchemaError):
        decode(data, Frame)
    with pytest.raises(SchemaError):
        decode_any(data)


@FUZZ
@given(st.binary(max_size=600))
def test_random_bytes_behind_a_continuation_marker(data: bytes) -> None:
    # Gets past the first framing check, into the flatbuffer metadata parsing.
    with pytest.raises(SchemaError):
        decode_any(b"\xff\xff\xff\xff" + data)


@MUTATE
@given(st.sampled_from(range(len(SAMPLES))), st.data())
def test_spliced_messages_raise_only_schema_errors(index: int, data) -> None:
    encoded = ENCODED[index]
    cut = data.draw(st.integers(0, len(encoded)))
    tail = data.draw(st.binary(max_size=64))
    resume = data.draw(st.integers(0, len(encoded)))
    mutated = encoded[:cut] + tail + encoded[resume:]
    try:
        record = decode_any(mutated)
    except SchemaError:
        return
    validate(record)


@pytest.mark.parametrize("index", range(len(SAMPLES)), ids=lambda i: type(SAMPLES[i]).__name__)
def test_every_truncation_is_reported_as_truncated(index: int) -> None:
    encoded, cls = ENCODED[index], type(SAMPLES[index])
    for length in range(len(encoded)):
        with pytest.raises(TruncatedMessage) as info:
            decode(encoded[:length], cls)
        assert info.value.reason == "truncated"
    with pytest.raises(TruncatedMessage):
        decode_any(encoded[:-8])  # complete but for the end-of-stream marker


@pytest.mark.parametrize("index", range(len(SAMPLES)), ids=lambda i: type(SAMPLES[i]).__name__)
def test_every_single_byte_flip(index: int) -> None:
    encoded, cls = ENCODED[index], type(SAMPLES[index])
    outcomes = set()
    for pos in range(len(encoded)):
        corrupted = bytearray(encoded)
        corrupted[pos] ^= 0xFF
        try:
            record = decode(bytes(corrupted), cls)
        except SchemaError as exc:
            outcomes.add(exc.reason)
            continue
        validate(record)
        outcomes.add("decoded")
    assert "malformed" in outcomes  # the corruptions are really noticed


@MUTATE
@given(st.sampled_from(range(len(SAMPLES))), st.data())
def test_random_single_byte_corruption(index: int, data) -> None:
    encoded = bytearray(ENCODED[index])
    pos = data.draw(st.integers(0, len(encoded) - 1))
    encoded[pos] = data.draw(st.integers(0, 255))
    try:
        record = decode(bytes(encoded), type(SAMPLES[index]))
    except SchemaError:
        return
    validate(record)
    assert type(record) is type(SAMPLES[index])


@pytest.mark.parametrize("value", [None, "text", 42, b"", bytearray()])
def test_non_messages(value) -> None:
    with pytest.raises(SchemaError):
        decode(value, Frame)  # type: ignore[arg-type]


def test_bytes_like_inputs_are_accepted() -> None:
    assert decode(bytearray(ENCODED[0]), Frame) == FRAME
    assert decode(memoryview(ENCODED[0]), Frame) == FRAME


def test_not_arrow_is_malformed() -> None:
    with pytest.raises(MalformedMessage) as info:
        decode(b'{"stream_id": "cam-1"}', Frame)
    assert info.value.reason == "malformed"
    assert "continuation marker" in str(info.value)


def test_trailing_bytes_after_end_of_stream() -> None:
    with pytest.raises(MalformedMessage, match="after the end-of-stream marker"):
        decode(ENCODED[0] + b"\x00", Frame)


def test_two_messages_concatenated() -> None:
    with pytest.raises(MalformedMessage):
        decode(ENCODED[0] + ENCODED[0], Frame)


def test_compressed_body_is_refused() -> None:
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression="zstd")
    with pa.ipc.new_stream(sink, Frame.SCHEMA, options=options) as writer:
        writer.write_batch(pa.RecordBatch.from_pylist([row(FRAME)], schema=Frame.SCHEMA))
    with pytest.raises(MalformedMessage, match="compressed"):
        decode(sink.getvalue().to_pybytes(), Frame)


def test_legacy_ipc_format_is_refused() -> None:
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(use_legacy_format=True)
    with pa.ipc.new_stream(sink, Frame.SCHEMA, options=options) as writer:
        writer.write_batch(pa.RecordBatch.from_pylist([row(FRAME)], schema=Frame.SCHEMA))
    with pytest.raises(MalformedMessage):
        decode(sink.getvalue().to_pybytes(), Frame)


# ------------------------------------------------------------------ size limits


def test_oversized_is_rejected_before_parsing() -> None:
    small = Limits(max_message_bytes=512)
    with pytest.raises(OversizedMessage) as info:
        decode(ENCODED[0], Frame, small)
    assert info.value.reason == "oversized"
    assert str(len(ENCODED[0])) in str(info.value) and "512" in str(info.value)
    # garbage over the limit is reported as oversized, not malformed: nothing was parsed
    with pytest.raises(OversizedMessage):
        decode_any(b"\x00" * 513, small)
    with pytest.raises(MalformedMessage):
        decode_any(b"\x00" * 512, small)
    # exactly at the limit is fine
    assert decode(ENCODED[0], Frame, Limits(max_message_bytes=len(ENCODED[0]))) == FRAME


def test_encode_refuses_oversized_output() -> None:
    with pytest.raises(OversizedMessage):
        encode(FRAME, Limits(max_message_bytes=256))


def test_big_frame_round_trips_at_default_limit() -> None:
    big = Frame(
        stream_id="cam-1",
        seq=0,
        pts_us=0,
        codec="rgb24",
        width=1920,
        height=1080,
        payload=bytes(1920 * 1080 * 3),
    )
    assert decode(encode(big), Frame) == big


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError):
        Limits(max_width=0)
    with pytest.raises(ValueError):
        Limits(max_audio_seconds=-1.0)
    assert DEFAULT_LIMITS.max_message_bytes == 16 * 1024 * 1024
    assert DEFAULT_LIMITS.max_width == DEFAULT_LIMITS.max_height == 8192
    assert DEFAULT_LIMITS.max_text_chars == 4096 and DEFAULT_LIMITS.max_options == 26


# ------------------------------------------------------------------ versions, types, schemas


def versioned_schema(cls, version: bytes) -> pa.Schema:
    return cls.SCHEMA.with_metadata({**cls.SCHEMA.metadata, b"streamvqa.version": version})


def test_wrong_version() -> None:
    data = raw_message(Frame, [{**row(FRAME), "schema_version": 2}], schema=versioned_schema(Frame, b"2"))
    with pytest.raises(WrongVersion) as info:
        decode(data, Frame)
    err = info.value
    assert err.reason == "wrong_version"
    assert err.found == 2 and err.supported == (1,)
    assert re.search(r"\b2\b", str(err)) and "supported versions: 1" in str(err)
    with pytest.raises(WrongVersion):
        decode_any(data)


def test_version_column_must_agree_with_metadata() -> None:
    data = raw_message(Frame, [{**row(FRAME), "schema_version": 2}])
    with pytest.raises(WrongVersion) as info:
        decode(data, Frame)
    assert info.value.field == "schema_version" and info.value.found == 2


@pytest.mark.parametrize("version", [b"", b"one", b"1.0", b"-1", b"0"])
def test_unparseable_or_unknown_version_metadata(version: bytes) -> None:
    data = raw_message(Frame, [row(FRAME)], schema=versioned_schema(Frame, version))
    with pytest.raises(WrongVersion):
        decode(data, Frame)


def test_missing_metadata() -> None:
    data = raw_message(Frame, [row(FRAME)], schema=Frame.SCHEMA.remove_metadata())
    with pytest.raises(SchemaMismatch, match=r"streamvqa\.type"):
        decode(data, Frame)


def test_writing_another_version_is_refused() -> None:
    future = dataclasses.replace(FRAME, schema_version=2)
    with pytest.raises(WrongVersion):
        validate(future)
    with pytest.raises(WrongVersion):
        encode(future)


def test_wrong_record_type() -> None:
    with pytest.raises(WrongRecordType) as info:
        decode(ENCODED[0], Query)
    assert info.value.reason == "wrong_type"
    assert (info.value.expected, info.value.found) == ("Query", "Frame")
    assert "Query" in str(info.value) and "Frame" in str(info.value)


def test_unknown_record_type_in_decode_any() -> None:
    schema = Frame.SCHEMA.with_metadata({b"streamvqa.type": b"Bogus", b"streamvqa.version": b"1"})
    with pytest.raises(WrongRecordType, match="Bogus"):
        decode_any(raw_message(Frame, [row(FRAME)], schema=schema))


def test_decode_any_dispatches_on_type() -> None:
    for record, data in zip(SAMPLES, ENCODED, strict=True):
        decoded = decode_any(data)
        assert type(decoded) is type(record) and decoded == record


def test_decode_requires_a_record_class() -> None:
    with pytest.raises(TypeError):
        decode(ENCODED[0], dict)  # type: ignore[arg-type]


def test_missing_field_is_a_schema_mismatch() -> None:
    schema = Frame.SCHEMA.remove(Frame.SCHEMA.get_field_index("width"))
    values = {k: v for k, v in row(FRAME).items() if k != "width"}
    with pytest.raises(SchemaMismatch) as info:
        decode(raw_message(Frame, [values], schema=schema), Frame)
    assert info.value.reason == "schema_mismatch"
    assert info.value.field == "width" and "missing field 'width'" in str(info.value)


def test_changed_type_is_a_schema_mismatch() -> None:
    index = Frame.SCHEMA.get_field_index("width")
    schema = Frame.SCHEMA.set(index, pa.field("width", pa.int64(), nullable=False))
    with pytest.raises(SchemaMismatch) as info:
        decode(raw_message(Frame, [row(FRAME)], schema=schema), Frame)
    assert info.value.field == "width" and "int64" in str(info.value)


def test_nested_type_change_is_a_schema_mismatch() -> None:
    index = Answer.SCHEMA.get_field_index("evidence")
    struct = pa.struct(
        [
            pa.field("start_us", pa.int64(), nullable=False),
            pa.field("end_us", pa.int64(), nullable=False),
            pa.field("score", pa.float32(), nullable=False),
        ]
    )
    schema = Answer.SCHEMA.set(
        index,
        pa.field("evidence", pa.list_(pa.field("item", struct, nullable=False)), nullable=False),
    )
    with pytest.raises(SchemaMismatch) as info:
        decode(raw_message(Answer, [row(ANSWER)], schema=schema), Answer)
    assert info.value.field == "evidence"


def test_extra_field_is_a_schema_mismatch() -> None:
    schema = Frame.SCHEMA.append(pa.field("extra", pa.int8()))
    with pytest.raises(SchemaMismatch, match="unexpected field 'extra'"):
        decode(raw_message(Frame, [{**row(FRAME), "extra": 1}], schema=schema), Frame)


def test_field_order_does_not_matter() -> None:
    names = list(reversed(Frame.SCHEMA.names))
    schema = pa.schema([Frame.SCHEMA.field(n) for n in names], metadata=Frame.SCHEMA.metadata)
    assert decode(raw_message(Frame, [row(FRAME)], schema=schema), Frame) == FRAME


@pytest.mark.parametrize(
    "batches",
    [[[row(FRAME), row(FRAME)]], [[row(FRAME)], [row(FRAME)]], [[]], []],
    ids=["two-rows", "two-batches", "empty-batch", "no-batch"],
)
def test_exactly_one_row(batches) -> None:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, Frame.SCHEMA) as writer:
        for part in batches:
            writer.write_batch(pa.RecordBatch.from_pylist(part, schema=Frame.SCHEMA))
    with pytest.raises(InvalidField, match="exactly one row"):
        decode(sink.getvalue().to_pybytes(), Frame)


def test_null_in_required_field() -> None:
    with pytest.raises(InvalidField) as info:
        decode(raw_message(Frame, [{**row(FRAME), "width": None}]), Frame)
    assert info.value.field == "width" and "width" in str(info.value)


def test_null_in_nested_required_field() -> None:
    values = row(ANSWER)
    values["evidence"] = [{"start_us": 1, "end_us": 2, "score": None}]
    with pytest.raises(InvalidField) as info:
        decode(raw_message(Answer, [values]), Answer)
    assert info.value.field == "evidence[0].score"


def test_decode_validates_values_written_by_others() -> None:
    data = raw_message(Frame, [{**row(FRAME), "width": 0}])
    with pytest.raises(InvalidField) as info:
        decode(data, Frame)
    assert info.value.field == "width"
    data = raw_message(Frame, [{**row(JPEG_FRAME), "payload": JPEG[:-2]}])
    with pytest.raises(InvalidField, match="truncated or corrupt JPEG"):
        decode_any(data)


# ------------------------------------------------------------------ validation rules

NAN_AUDIO = np.array([0.0, np.nan, 0.5, 0.25], dtype="<f4").tobytes()
INF_AUDIO = np.array([0.0, 0.1, np.inf, 0.25], dtype="<f4").tobytes()
INT64_MAX = 2**63 - 1
VISUAL = VisualNote(
    stream_id="cam-1",
    seq=1,
    pts_us=33_333,
    wall_us=1_700_000_000_033_333,
    tier="clear",
    reason="first",
    tokens=196,
    memory_tokens=196,
    cached_fraction=0.0,
    feature=(0.5,),
    keyframe_key="",
    content_hash="ab",
    encode_ms=1.0,
)
SPEECH = SpeechNote(
    stream_id="cam-1", seq=2, start_us=0, end_us=1_000_000, wall_us=1_700_000_001_000_000, text="hello"
)

INVALID = [
    # (record, field, fragment of the message)
    (dataclasses.replace(FRAME, stream_id="cam/1"), "stream_id", "not a valid id"),
    (dataclasses.replace(FRAME, stream_id="a..b"), "stream_id", "'..'"),
    (dataclasses.replace(FRAME, stream_id=""), "stream_id", "not a valid id"),
    (dataclasses.replace(FRAME, stream_id="-cam"), "stream_id", "not a valid id"),
    (dataclasses.replace(FRAME, stream_id="cam\n"), "stream_id", "not a valid id"),
    (dataclasses.replace(FRAME, stream_id="c" * 129), "stream_id", "not a valid id"),
    (dataclasses.replace(FRAME, width=0, payload=b""), "width", "between 1 and 8192"),
    (dataclasses.replace(JPEG_FRAME, height=0), "height", "got 0"),
    (dataclasses.replace(JPEG_FRAME, width=100_000), "width", "between 1 and 8192"),
    (dataclasses.replace(JPEG_FRAME, width=-3), "width", "got -3"),
    (dataclasses.replace(FRAME, seq=-1), "seq", ">= 0"),
    (dataclasses.replace(FRAME, pts_us=-1), "pts_us", ">= 0"),
    (dataclasses.replace(FRAME, codec="gif"), "codec", "not one of jpeg, png, rgb24"),
    (dataclasses.replace(FRAME, payload=bytes(23)), "payload", "width*height*3 = 24"),
    (dataclasses.replace(JPEG_FRAME, payload=b""), "payload", "empty"),
    (dataclasses.replace(JPEG_FRAME, payload=JPEG[:-2]), "payload", "truncated or corrupt JPEG"),
    (dataclasses.replace(JPEG_FRAME, payload=PNG), "payload", "no SOI marker"),
    (dataclasses.replace(JPEG_FRAME, payload=b"\xff\xd9"), "payload", "JPEG"),
    (dataclasses.replace(JPEG_FRAME, codec="png"), "payload", "not a PNG"),
    (dataclasses.replace(JPEG_FRAME, codec="png", payload=PNG[:-5]), "payload", "truncated"),
    (dataclasses.replace(FRAME, width="4"), "width", "must be an int"),
    (dataclasses.replace(FRAME, width=True), "width", "must be an int"),
    (dataclasses.replace(FRAME, width=2**31), "width", "does not fit in int32"),
    (dataclasses.replace(FRAME, payload=bytearray(24)), "payload", "must be bytes"),
    (dataclasses.replace(FRAME, stream_id=None), "stream_id", "required"),
    (dataclasses.replace(AUDIO, payload=NAN_AUDIO), "payload", "non-finite"),
    (dataclasses.replace(AUDIO, payload=INF_AUDIO), "payload", "non-finite"),
    (dataclasses.replace(AUDIO, payload=AUDIO.payload[:-4]), "payload", "not a multiple"),
    (
        dataclasses.replace(AUDIO, sample_format="s16le", payload=b"\x00" * 6),
        "payload",
        "not a multiple of channels*bytes_per_sample = 4",
    ),
    (dataclasses.replace(AUDIO, payload=b""), "payload", "empty"),
    (dataclasses.replace(AUDIO, channels=0), "channels", "between 1 and 8"),
    (dataclasses.replace(AUDIO, channels=9), "channels", "between 1 and 8"),
    (dataclasses.replace(AUDIO, sample_rate=0), "sample_rate", "between 1 and 192000"),
    (dataclasses.replace(AUDIO, sample_rate=384_000), "sample_rate", "between 1 and 192000"),
    (dataclasses.replace(AUDIO, sample_format="u8"), "sample_format", "not one of f32le, s16le"),
    (
        dataclasses.replace(AUDIO, sample_rate=1, payload=bytes(2 * 4 * 61)),
        "payload",
        "61.000 s of audio, more than max_audio_seconds=60",
    ),
    (dataclasses.replace(QUERY, text=""), "text", "empty"),
    (dataclasses.replace(QUERY, text=" \n\t "), "text", "empty or only whitespace"),
    (dataclasses.replace(QUERY, text="x" * 4097), "text", "4097 characters, more than 4096"),
    (dataclasses.replace(QUERY, text="\ud800"), "text", "not valid Unicode"),
    (dataclasses.replace(QUERY, query_id="q/../1"), "query_id", "not a valid id"),
    (dataclasses.replace(QUERY, asked_at_us=-5), "asked_at_us", ">= 0"),
    (dataclasses.replace(QUERY, options=()), "options", "empty"),
    (dataclasses.replace(QUERY, options=["a", "b"]), "options", "must be a tuple"),
    (
        dataclasses.replace(QUERY, options=tuple(f"o{i}" for i in range(27))),
        "options",
        "27 entries, more than 26",
    ),
    (dataclasses.replace(QUERY, options=("a", " ")), "options[1]", "empty"),
    (dataclasses.replace(QUERY, options=("a", "b" * 513)), "options[1]", "more than 512"),
    (dataclasses.replace(QUERY, options=("a", "a")), "options", "more than once"),
    (dataclasses.replace(QUERY, options=("a", None)), "options[1]", "required"),
    (dataclasses.replace(QUERY, image=JPEG), "image_codec", "image_codec is missing"),
    (dataclasses.replace(QUERY, image_codec="jpeg"), "image", "image is missing"),
    (dataclasses.replace(QUERY, image=JPEG, image_codec="gif"), "image_codec", "not one of"),
    (dataclasses.replace(QUERY, image=JPEG[:10], image_codec="jpeg"), "image", "truncated"),
    (dataclasses.replace(QUERY, image=b"", image_codec="png"), "image", "empty"),
    (
        dataclasses.replace(ANSWER, evidence=(EvidenceSpan(start_us=10, end_us=5),)),
        "evidence[0].end_us",
        "before evidence[0].start_us",
    ),
    (
        dataclasses.replace(ANSWER, evidence=(EvidenceSpan(start_us=-1, end_us=5),)),
        "evidence[0].start_us",
        ">= 0",
    ),
    (
        dataclasses.replace(
            ANSWER,
            evidence=(ANSWER.evidence[0], EvidenceSpan(start_us=1, end_us=5, score=math.nan)),
        ),
        "evidence[1].score",
        "finite",
    ),
    (
        dataclasses.replace(ANSWER, evidence=({"start_us": 1, "end_us": 2, "score": 0.0},)),
        "evidence[0]",
        "must be a EvidenceSpan",
    ),
    (
        dataclasses.replace(ANSWER, latency=(StageLatency(stage="asr", ms=-1.0),)),
        "latency[0].ms",
        ">= 0",
    ),
    (
        dataclasses.replace(ANSWER, latency=(StageLatency(stage="asr", ms=math.inf),)),
        "latency[0].ms",
        "finite",
    ),
    (
        dataclasses.replace(ANSWER, latency=(StageLatency(stage="", ms=1.0),)),
        "latency[0].stage",
        "stage name",
    ),
    (dataclasses.replace(ANSWER, model_id=""), "model_id", "model id"),
    (dataclasses.replace(ANSWER, text="x" * 65537), "text", "more than 65536"),
    (dataclasses.replace(ANSWER, stream_id="cam 1"), "stream_id", "not a valid id"),
    (dataclasses.replace(ANSWER, answered_at_us=-1), "answered_at_us", ">= 0"),
    (dataclasses.replace(DEAD, reason="Not A Code"), "reason", "reason code"),
    (dataclasses.replace(DEAD, source_topic="bad topic"), "source_topic", "Kafka topic"),
    (dataclasses.replace(DEAD, source_topic=".."), "source_topic", "Kafka topic"),
    (dataclasses.replace(DEAD, source_partition=-2), "source_partition", ">= -1"),
    (
        dataclasses.replace(DEAD, payload_excerpt=bytes(1025), payload_size=2000),
        "payload_excerpt",
        "more than max_excerpt_bytes=1024",
    ),
    (dataclasses.replace(DEAD, payload_size=1), "payload_size", ">= 2"),
    (dataclasses.replace(DEAD, detail="d" * 4097), "detail", "more than 4096"),
    (dataclasses.replace(DEAD, failed_at_us=-1), "failed_at_us", ">= 0"),
    (dataclasses.replace(MANIFEST, generation=-1), "generation", ">= 0"),
    (dataclasses.replace(MANIFEST, total_tokens=-1), "total_tokens", ">= 0"),
    (dataclasses.replace(MANIFEST, token_budget=-1), "token_budget", ">= 0"),
    (
        dataclasses.replace(MANIFEST, frames=(dataclasses.replace(MANIFEST.frames[0], tier="hot"),)),
        "frames[0].tier",
        "not one of clear, evicted, fuzzy",
    ),
    (
        dataclasses.replace(MANIFEST, frames=(dataclasses.replace(MANIFEST.frames[0], tokens=-1),)),
        "frames[0].tokens",
        ">= 0",
    ),
    (
        dataclasses.replace(MANIFEST, frames=(dataclasses.replace(MANIFEST.frames[0], content_hash=""),)),
        "frames[0].content_hash",
        "content hash",
    ),
    (
        dataclasses.replace(MANIFEST, kv_blocks=(dataclasses.replace(MANIFEST.kv_blocks[0], tier="ram"),)),
        "kv_blocks[0].tier",
        "not one of cpu, disk, gpu, object",
    ),
    (
        dataclasses.replace(MANIFEST, kv_blocks=(dataclasses.replace(MANIFEST.kv_blocks[0], key="a/../b"),)),
        "kv_blocks[0].key",
        "not a valid object key",
    ),
    (
        dataclasses.replace(MANIFEST, kv_blocks=(dataclasses.replace(MANIFEST.kv_blocks[0], key="/abs"),)),
        "kv_blocks[0].key",
        "not a valid object key",
    ),
    (
        dataclasses.replace(MANIFEST, kv_blocks=(dataclasses.replace(MANIFEST.kv_blocks[0], end_us=-1),)),
        "kv_blocks[0].end_us",
        "before",
    ),
    (
        dataclasses.replace(
            MANIFEST, source_offsets=(SourceOffset(topic="frames", partition=-1, next_offset=0),)
        ),
        "source_offsets[0].partition",
        ">= 0",
    ),
    (
        dataclasses.replace(
            MANIFEST, source_offsets=(SourceOffset(topic="a/b", partition=0, next_offset=0),)
        ),
        "source_offsets[0].topic",
        "Kafka topic",
    ),
    # times: in [0, MAX_TIME_US], refused where validated (naming the field), not later
    (dataclasses.replace(FRAME, pts_us=INT64_MAX), "pts_us", "MAX_TIME_US"),
    (dataclasses.replace(FRAME, pts_us=MAX_TIME_US + 1), "pts_us", "MAX_TIME_US"),
    (dataclasses.replace(AUDIO, pts_us=INT64_MAX), "pts_us", "MAX_TIME_US"),
    # starts at MAX_TIME_US, so its end is past it
    (dataclasses.replace(AUDIO, pts_us=MAX_TIME_US), "pts_us", "ends after MAX_TIME_US"),
    (dataclasses.replace(QUERY, asked_at_us=INT64_MAX), "asked_at_us", "MAX_TIME_US"),
    (dataclasses.replace(ANSWER, answered_at_us=MAX_TIME_US + 1), "answered_at_us", "MAX_TIME_US"),
    (
        dataclasses.replace(ANSWER, evidence=(EvidenceSpan(start_us=0, end_us=INT64_MAX),)),
        "evidence[0].end_us",
        "MAX_TIME_US",
    ),
    (
        dataclasses.replace(ANSWER, evidence=(EvidenceSpan(start_us=INT64_MAX, end_us=INT64_MAX),)),
        "evidence[0].start_us",
        "MAX_TIME_US",
    ),
    (dataclasses.replace(DEAD, failed_at_us=INT64_MAX), "failed_at_us", "MAX_TIME_US"),
    (dataclasses.replace(MANIFEST, updated_at_us=INT64_MAX), "updated_at_us", "MAX_TIME_US"),
    (
        dataclasses.replace(MANIFEST, frames=(dataclasses.replace(MANIFEST.frames[0], pts_us=INT64_MAX),)),
        "frames[0].pts_us",
        "MAX_TIME_US",
    ),
    (
        dataclasses.replace(
            MANIFEST, kv_blocks=(dataclasses.replace(MANIFEST.kv_blocks[0], end_us=INT64_MAX),)
        ),
        "kv_blocks[0].end_us",
        "MAX_TIME_US",
    ),
    (dataclasses.replace(VISUAL, pts_us=INT64_MAX), "pts_us", "MAX_TIME_US"),
    (dataclasses.replace(VISUAL, wall_us=INT64_MAX), "wall_us", "MAX_TIME_US"),
    (dataclasses.replace(SPEECH, start_us=INT64_MAX, end_us=INT64_MAX), "start_us", "MAX_TIME_US"),
    (dataclasses.replace(SPEECH, end_us=INT64_MAX), "span.end_us", "MAX_TIME_US"),
    (dataclasses.replace(SPEECH, wall_us=INT64_MAX), "wall_us", "MAX_TIME_US"),
]


@pytest.mark.parametrize(
    ("record", "field", "fragment"),
    INVALID,
    ids=[f"{type(r).__name__}-{f}-{i}" for i, (r, f, _) in enumerate(INVALID)],
)
def test_validation_rule(record, field: str, fragment: str) -> None:
    with pytest.raises(InvalidField) as info:
        validate(record)
    err = info.value
    assert err.reason == "invalid_field"
    assert err.field == field
    assert field in str(err), str(err)
    assert fragment in str(err), str(err)
    assert isinstance(err, ValueError)
    # encode validates too: an invalid record cannot be produced
    with pytest.raises(InvalidField):
        encode(record)


def test_the_valid_base_records_pass() -> None:
    # INVALID's records differ from these valid ones in one field only
    for record in [*SAMPLES, VISUAL, SPEECH]:
        validate(record)


def test_times_up_to_max_time_us_are_valid() -> None:
    assert MAX_TIME_US == 2**62  # documented in streamvqa.schemas.records
    validate(dataclasses.replace(FRAME, pts_us=MAX_TIME_US))
    validate(dataclasses.replace(QUERY, asked_at_us=MAX_TIME_US))
    validate(dataclasses.replace(ANSWER, evidence=(EvidenceSpan(start_us=MAX_TIME_US, end_us=MAX_TIME_US),)))
    validate(dataclasses.replace(SPEECH, start_us=MAX_TIME_US, end_us=MAX_TIME_US, wall_us=MAX_TIME_US))
    # an audio chunk may end exactly at MAX_TIME_US (16 frames at 16 kHz: 1000 µs), not 1 µs later
    ending = dataclasses.replace(AUDIO, pts_us=MAX_TIME_US - 1000, payload=AUDIO.payload[: 16 * 8])
    validate(ending)
    with pytest.raises(InvalidField) as info:
        validate(dataclasses.replace(ending, pts_us=ending.pts_us + 1))
    assert info.value.field == "pts_us"


def test_an_audio_chunk_at_the_end_of_int64_is_refused_when_decoded() -> None:
    """Issue #20, defect 6: a chunk at pts 2**63-1 fits the Arrow schema; it must be refused as soon as
    it is decoded, with the reason naming pts_us, not later when its end (pts + duration) overflows."""
    data = raw_message(AudioChunk, [{**row(AUDIO), "pts_us": INT64_MAX}])
    with pytest.raises(InvalidField) as info:
        decode(data, AudioChunk)
    assert info.value.reason == "invalid_field" and info.value.field == "pts_us"
    assert "pts_us" in str(info.value) and "MAX_TIME_US" in str(info.value)
    assert "does not fit" not in str(info.value)
    for cls, record, field in ((Frame, FRAME, "pts_us"), (Query, QUERY, "asked_at_us")):
        with pytest.raises(InvalidField) as info:
            decode_any(raw_message(cls, [{**row(record), field: INT64_MAX}]))
        assert info.value.field == field


def test_limits_are_configurable() -> None:
    wide = dataclasses.replace(JPEG_FRAME, width=4000)
    validate(wide)
    with pytest.raises(InvalidField, match="between 1 and 1920"):
        validate(wide, Limits(max_width=1920))
    data = encode(wide)
    with pytest.raises(InvalidField):
        decode(data, Frame, Limits(max_width=1920))
    long_question = dataclasses.replace(QUERY, text="x" * 100)
    with pytest.raises(InvalidField, match="more than 50"):
        encode(long_question, Limits(max_text_chars=50))
    long_answer = dataclasses.replace(ANSWER, text="y" * 5000)
    assert decode(encode(long_answer), Answer) == long_answer  # answers may exceed max_text_chars
    one_minute = dataclasses.replace(AUDIO, sample_rate=2)  # 32 frames at 2 Hz = 16 s
    validate(one_minute)
    with pytest.raises(InvalidField, match="max_audio_seconds"):
        validate(one_minute, Limits(max_audio_seconds=10))
    with pytest.raises(InvalidField, match="channels"):
        validate(AUDIO, Limits(max_channels=1))


def test_audio_duration_limit_is_inclusive() -> None:
    exactly = AudioChunk(
        stream_id="s",
        seq=0,
        pts_us=0,
        sample_rate=1,
        channels=1,
        sample_format="s16le",
        payload=bytes(2 * 60),
    )
    validate(exactly)
    with pytest.raises(InvalidField):
        validate(dataclasses.replace(exactly, payload=bytes(2 * 61)))


def test_validate_rejects_non_records() -> None:
    with pytest.raises(TypeError):
        validate(object())  # type: ignore[arg-type]


# ------------------------------------------------------------------ errors and dead letters


def test_errors_pickle_with_their_details() -> None:
    data = raw_message(Frame, [{**row(FRAME), "schema_version": 2}], schema=versioned_schema(Frame, b"2"))
    with pytest.raises(WrongVersion) as info:
        decode(data, Frame)
    clone = pickle.loads(pickle.dumps(info.value))
    assert type(clone) is WrongVersion
    assert (clone.reason, clone.found, clone.supported, str(clone)) == (
        "wrong_version",
        2,
        (1,),
        str(info.value),
    )
    field_error = pickle.loads(pickle.dumps(InvalidField("width must be ...", "width")))
    assert field_error.field == "width" and field_error.reason == "invalid_field"


def test_reason_codes_are_stable() -> None:
    from streamvqa import schemas

    assert {
        cls.__name__: cls.reason
        for cls in (
            schemas.OversizedMessage,
            schemas.MalformedMessage,
            schemas.TruncatedMessage,
            schemas.WrongRecordType,
            schemas.WrongVersion,
            schemas.SchemaMismatch,
            schemas.InvalidField,
        )
    } == {
        "OversizedMessage": "oversized",
        "MalformedMessage": "malformed",
        "TruncatedMessage": "truncated",
        "WrongRecordType": "wrong_type",
        "WrongVersion": "wrong_version",
        "SchemaMismatch": "schema_mismatch",
        "InvalidField": "invalid_field",
    }
    assert all(
        issubclass(getattr(schemas, n), SchemaError)
        for n in schemas.__all__
        if n.endswith(("Message", "Type", "Version", "Mismatch", "Field"))
    )


def test_make_dead_letter_from_a_decode_failure() -> None:
    payload = ENCODED[0][:-100] + bytes(2000)
    with pytest.raises(SchemaError) as info:
        decode(payload, Frame)
    letter = make_dead_letter(
        info.value,
        source_topic="frames",
        source_partition=1,
        source_offset=77,
        payload=payload,
        key=b"cam-1",
        failed_at_us=123,
    )
    assert letter.reason == info.value.reason
    assert letter.detail == str(info.value)
    assert letter.payload_excerpt == payload[:1024] and letter.payload_size == len(payload)
    assert letter.message_key() == b"cam-1"
    assert decode(encode(letter), DeadLetter) == letter


def test_make_dead_letter_from_any_exception() -> None:
    letter = make_dead_letter(
        RuntimeError("boom \ud800"),
        source_topic="answers",
        source_partition=0,
        source_offset=5,
        payload=None,
        limits=Limits(max_excerpt_bytes=16),
    )
    assert letter.reason == "unexpected_error" and "RuntimeError: boom" in letter.detail
    assert letter.payload_excerpt == b"" and letter.payload_size == 0 and letter.key is None
    assert letter.failed_at_us > 1_600_000_000_000_000
    assert decode_any(encode(letter)) == letter
