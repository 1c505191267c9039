"""Record types carried on the streamvqa Kafka topics and stored in the object store.

Each record is a frozen, slotted dataclass whose field names match its Arrow
schema one to one. Times are int64 microseconds (``*_us``) so they stay exact, and lie in
``[0, MAX_TIME_US]``.
Lists are tuples (records are immutable and hashable); nested list items are
small frozen dataclasses. Construct records by keyword.

Every record class exposes:

* ``SCHEMA``: the ``pa.Schema`` of its one-row Arrow message, with schema
  metadata ``b"streamvqa.type"`` (the record name) and ``b"streamvqa.version"``;
* ``VERSION``: the schema version this code writes (and the only one it reads);
* ``ITEMS``: the item dataclass of each ``list<struct>`` field;
* ``message_key()``: the Kafka message key (bytes) or ``None``.

Construction does not validate; :func:`streamvqa.schemas.validate` does, and
``encode``/``decode`` always call it.
"""

import dataclasses
from typing import ClassVar

import pyarrow as pa

__all__ = [
    "BLOCK_TIERS",
    "CURRENT_VERSION",
    "FRAME_CODECS",
    "FRAME_TIERS",
    "IMAGE_CODECS",
    "MAX_TIME_US",
    "RECORD_TYPES",
    "SAMPLE_FORMATS",
    "SUPPORTED_VERSIONS",
    "TYPE_KEY",
    "VERSION_KEY",
    "Answer",
    "AudioChunk",
    "DeadLetter",
    "EvidenceSpan",
    "Frame",
    "ManifestBlock",
    "ManifestFrame",
    "MemoryManifest",
    "Query",
    "Record",
    "SourceOffset",
    "SpeechNote",
    "StageLatency",
    "VisualNote",
]

CURRENT_VERSION = 1
SUPPORTED_VERSIONS: tuple[int, ...] = (1,)
TYPE_KEY = b"streamvqa.type"
VERSION_KEY = b"streamvqa.version"

#: The latest time any ``*_us`` field may hold (inclusive; the earliest is 0): 2**62 µs, about
#: 146,000 years of stream time or after the Unix epoch. Half the int64 range, so a time plus a
#: duration or an offset derived from records (an audio chunk's end, a note's wall-clock offset)
#: stays far inside int64. Validation refuses a record with a time beyond it, naming the field.
MAX_TIME_US = 2**62

FRAME_CODECS = frozenset({"jpeg", "png", "rgb24"})
IMAGE_CODECS = frozenset({"jpeg", "png"})
#: PCM sample format -> bytes per sample.
SAMPLE_FORMATS: dict[str, int] = {"s16le": 2, "f32le": 4}
FRAME_TIERS = frozenset({"clear", "fuzzy", "evicted"})
BLOCK_TIERS = frozenset({"gpu", "cpu", "disk", "object"})


def _req(name: str, type_: pa.DataType) -> pa.Field:
    return pa.field(name, type_, nullable=False)


def _opt(name: str, type_: pa.DataType) -> pa.Field:
    return pa.field(name, type_, nullable=True)


def _list_of(type_: pa.DataType) -> pa.DataType:
    return pa.list_(pa.field("item", type_, nullable=False))


def _schema(name: str, *fields: pa.Field) -> pa.Schema:
    return pa.schema(
        [_req("schema_version", pa.int16()), *fields],
        metadata={TYPE_KEY: name.encode(), VERSION_KEY: str(CURRENT_VERSION).encode()},
    )


# --------------------------------------------------------------------------- items


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class EvidenceSpan:
    """A time range of the stream that supports an answer."""

    start_us: int
    end_us: int
    score: float = 0.0


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class StageLatency:
    """Time one pipeline stage spent on a query."""

    stage: str
    ms: float


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ManifestFrame:
    """One frame known to a stream's memory."""

    seq: int
    pts_us: int
    tier: str  # one of FRAME_TIERS
    tokens: int
    score: float
    content_hash: str


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ManifestBlock:
    """One block of KV cache and where it lives."""

    block_index: int
    start_us: int
    end_us: int
    tier: str  # one of BLOCK_TIERS
    nbytes: int
    key: str  # object-store key ("" while the block was never written out)
    content_hash: str


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SourceOffset:
    """The next input offset of one topic partition covered by a snapshot."""

    topic: str
    partition: int
    next_offset: int


_EVIDENCE = pa.struct([_req("start_us", pa.int64()), _req("end_us", pa.int64()), _req("score", pa.float64())])
_LATENCY = pa.struct([_req("stage", pa.string()), _req("ms", pa.float64())])
_MANIFEST_FRAME = pa.struct(
    [
        _req("seq", pa.int64()),
        _req("pts_us", pa.int64()),
        _req("tier", pa.string()),
        _req("tokens", pa.int32()),
        _req("score", pa.float64()),
        _req("content_hash", pa.string()),
    ]
)
_MANIFEST_BLOCK = pa.struct(
    [
        _req("block_index", pa.int64()),
        _req("start_us", pa.int64()),
        _req("end_us", pa.int64()),
        _req("tier", pa.string()),
        _req("nbytes", pa.int64()),
        _req("key", pa.string()),
        _req("content_hash", pa.string()),
    ]
)
_SOURCE_OFFSET = pa.struct(
    [_req("topic", pa.string()), _req("partition", pa.int32()), _req("next_offset", pa.int64())]
)

# ------------------------------------------------------------------------- records


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Frame:
    """One video frame. Key: ``stream_id``."""

    SCHEMA: ClassVar[pa.Schema] = _schema(
        "Frame",
        _req("stream_id", pa.string()),
        _req("seq", pa.int64()),
        _req("pts_us", pa.int64()),
        _req("codec", pa.string()),
        _req("width", pa.int32()),
        _req("height", pa.int32()),
        _req("payload", pa.binary()),
    )
    VERSION: ClassVar[int] = CURRENT_VERSION
    ITEMS: ClassVar[dict[str, type]] = {}

    stream_id: str
    seq: int
    pts_us: int
    codec: str  # one of FRAME_CODECS
    width: int
    height: int
    payload: bytes
    schema_version: int = CURRENT_VERSION

    def message_key(self) -> bytes | None:
        return self.stream_id.encode()


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class AudioChunk:
    """A chunk of interleaved PCM audio. Key: ``stream_id``."""

    SCHEMA: ClassVar[pa.Schema] = _schema(
        "AudioChunk",
        _req("stream_id", pa.string()),
        _req("seq", pa.int64()),
        _req("pts_us", pa.int64()),
        _req("sample_rate", pa.int32()),
        _req("channels", pa.int16()),
        _req("sample_format", pa.string()),
        _req("payload", pa.binary()),
    )
    VERSION: ClassVar[int] = CURRENT_VERSION
    ITEMS: ClassVar[dict[str, type]] = {}

    stream_id: str
    seq: int
    pts_us: int
    sample_rate: int
    channels: int
    sample_format: str  # one of SAMPLE_FORMATS
    payload: bytes
    schema_version: int = CURRENT_VERSION

    def message_key(self) -> bytes | None:
        return self.stream_id.encode()


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Query:
    """A question about a stream. Key: ``stream_id`` (keeps a stream's questions in
    order with its frames)."""

    SCHEMA: ClassVar[pa.Schema] = _schema(
        "Query",
        _req("query_id", pa.string()),
        _req("stream_id", pa.string()),
        _req("text", pa.string()),
        _req("asked_at_us", pa.int64()),
        _opt("options", _list_of(pa.string())),
        _opt("image", pa.binary()),
        _opt("image_codec", pa.string()),
    )
    VERSION: ClassVar[int] = CURRENT_VERSION
    ITEMS: ClassVar[dict[str, type]] = {}

    query_id: str
    stream_id: str
    text: str
    asked_at_us: int
    options: tuple[str, ...] | None = None  # multiple-choice options
    image: bytes | None = None  # an example image ("when did this appear?")
    image_codec: str | None = None  # one of IMAGE_CODECS, set iff image is
    schema_version: int = CURRENT_VERSION

    def message_key(self) -> bytes | None:
        return self.stream_id.encode()


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Answer:
    """The answer to a query. Key: ``query_id`` (a retried write is recognisable)."""

    SCHEMA: ClassVar[pa.Schema] = _schema(
        "Answer",
        _req("query_id", pa.string()),
        _req("stream_id", pa.string()),
        _req("text", pa.string()),
        _req("evidence", _list_of(_EVIDENCE)),
        _req("latency", _list_of(_LATENCY)),
        _req("model_id", pa.string()),
        _req("answered_at_us", pa.int64()),
    )
    VERSION: ClassVar[int] = CURRENT_VERSION
    ITEMS: ClassVar[dict[str, type]] = {"evidence": EvidenceSpan, "latency": StageLatency}

    query_id: str
    stream_id: str
    text: str
    model_id: str
    answered_at_us: int
    evidence: tuple[EvidenceSpan, ...] = ()
    latency: tuple[StageLatency, ...] = ()  # in pipeline order
    schema_version: int = CURRENT_VERSION

    def message_key(self) -> bytes | None:
        return self.query_id.encode()


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class DeadLetter:
    """A message that could not be processed. ``key`` keeps the source message's key
    (``message_key()`` returns it); the pipelines publish the letter under the Kafka key
    ``<topic>/<partition>/<offset>``, unique per source message, so a replayed letter is
    recognised as already written."""

    SCHEMA: ClassVar[pa.Schema] = _schema(
        "DeadLetter",
        _req("source_topic", pa.string()),
        _req("source_partition", pa.int32()),
        _req("source_offset", pa.int64()),
        _opt("key", pa.binary()),
        _req("reason", pa.string()),
        _req("detail", pa.string()),
        _req("payload_excerpt", pa.binary()),
        _req("payload_size", pa.int64()),
        _req("failed_at_us", pa.int64()),
    )
    VERSION: ClassVar[int] = CURRENT_VERSION
    ITEMS: ClassVar[dict[str, type]] = {}

    source_topic: str
    source_partition: int
    source_offset: int
    reason: str  # a SchemaError.reason or another short code
    detail: str
    payload_excerpt: bytes  # the first bytes of the payload
    payload_size: int
    failed_at_us: int
    key: bytes | None = None
    schema_version: int = CURRENT_VERSION

    def message_key(self) -> bytes | None:
        return self.key


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class MemoryManifest:
    """A snapshot of one stream's memory (object store). Key: ``stream_id``."""

    SCHEMA: ClassVar[pa.Schema] = _schema(
        "MemoryManifest",
        _req("stream_id", pa.string()),
        _req("generation", pa.int64()),
        _req("updated_at_us", pa.int64()),
        _req("token_budget", pa.int64()),
        _req("total_tokens", pa.int64()),
        _req("frames", _list_of(_MANIFEST_FRAME)),
        _req("kv_blocks", _list_of(_MANIFEST_BLOCK)),
        _req("source_offsets", _list_of(_SOURCE_OFFSET)),
    )
    VERSION: ClassVar[int] = CURRENT_VERSION
    ITEMS: ClassVar[dict[str, type]] = {
        "frames": ManifestFrame,
        "kv_blocks": ManifestBlock,
        "source_offsets": SourceOffset,
    }

    stream_id: str
    generation: int  # snapshot number, increases monotonically
    updated_at_us: int
    token_budget: int
    total_tokens: int
    frames: tuple[ManifestFrame, ...] = ()
    kv_blocks: tuple[ManifestBlock, ...] = ()
    source_offsets: tuple[SourceOffset, ...] = ()
    schema_version: int = CURRENT_VERSION

    def message_key(self) -> bytes | None:
        return self.stream_id.encode()


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class VisualNote:
    """What the frame stage saw in one frame, for the stream's memory (the internal
    ``memory`` topic). Key: ``stream_id``.

    ``wall_us`` is the source frame's Kafka timestamp (the producer's wall clock at its
    presentation time): the memory stage's frame watermark. ``feature`` is the pooled
    visual feature (retrieval for "when did this appear?"); ``keyframe_key`` the object
    key of a clear frame's JPEG ("" for fuzzy frames)."""

    SCHEMA: ClassVar[pa.Schema] = _schema(
        "VisualNote",
        _req("stream_id", pa.string()),
        _req("seq", pa.int64()),
        _req("pts_us", pa.int64()),
        _req("wall_us", pa.int64()),
        _req("tier", pa.string()),
        _req("reason", pa.string()),
        _opt("score", pa.float64()),
        _opt("threshold", pa.float64()),
        _req("tokens", pa.int32()),
        _req("memory_tokens", pa.int64()),
        _req("cached_fraction", pa.float64()),
        _req("feature", _list_of(pa.float32())),
        _req("keyframe_key", pa.string()),
        _req("content_hash", pa.string()),
        _req("encode_ms", pa.float64()),
    )
    VERSION: ClassVar[int] = CURRENT_VERSION
    ITEMS: ClassVar[dict[str, type]] = {}

    stream_id: str
    seq: int
    pts_us: int
    wall_us: int
    tier: str  # "clear" or "fuzzy"
    reason: str  # why (CurveStream: first, above, below, warmup)
    tokens: int  # visual tokens kept for this frame after pruning
    memory_tokens: int  # the stream's visual memory after this frame
    cached_fraction: float  # share of ViT work the STC cache skipped for this frame
    feature: tuple[float, ...]
    keyframe_key: str
    content_hash: str
    encode_ms: float
    score: float | None = None  # curvature score (None while undefined)
    threshold: float | None = None  # K-sigma threshold (None during warm-up)
    schema_version: int = CURRENT_VERSION

    def message_key(self) -> bytes | None:
        return self.stream_id.encode()


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SpeechNote:
    """What was said in ``[start_us, end_us)`` of a stream (the internal ``memory`` topic).
    Key: ``stream_id``. A blank ``text`` is a progress mark: the audio has been heard up to
    ``end_us`` and every utterance that ended by then has been noted. ``open_since_us`` (marks
    only): an utterance is still going on since then (its transcript comes when it ends); None:
    silence. Marks move the memory stage's audio watermark.
    ``wall_us`` is the Kafka timestamp of the audio chunk that completed it."""

    SCHEMA: ClassVar[pa.Schema] = _schema(
        "SpeechNote",
        _req("stream_id", pa.string()),
        _req("seq", pa.int64()),
        _req("start_us", pa.int64()),
        _req("end_us", pa.int64()),
        _req("wall_us", pa.int64()),
        _req("text", pa.string()),
        _req("avg_logprob", pa.float64()),
        _req("asr_ms", pa.float64()),
        _opt("open_since_us", pa.int64()),
    )
    VERSION: ClassVar[int] = CURRENT_VERSION
    ITEMS: ClassVar[dict[str, type]] = {}

    stream_id: str
    seq: int  # the audio chunk that completed it
    start_us: int
    end_us: int
    wall_us: int
    text: str
    avg_logprob: float = 0.0
    asr_ms: float = 0.0
    open_since_us: int | None = None
    schema_version: int = CURRENT_VERSION

    def message_key(self) -> bytes | None:
        return self.stream_id.encode()


Record = Frame | AudioChunk | Query | Answer | DeadLetter | MemoryManifest | VisualNote | SpeechNote

#: Record name (the ``streamvqa.type`` schema metadata) -> record class.
RECORD_TYPES: dict[str, type[Record]] = {
    cls.__name__: cls
    for cls in (Frame, AudioChunk, Query, Answer, DeadLetter, MemoryManifest, VisualNote, SpeechNote)
}


def _check_consistency() -> None:
    """Dataclass fields and Arrow schemas must name the same fields."""
    for name, cls in RECORD_TYPES.items():
        names = {f.name for f in dataclasses.fields(cls)}
        if names != set(cls.SCHEMA.names) or cls.SCHEMA.metadata[TYPE_KEY] != name.encode():
            raise RuntimeError(f"{name}: dataclass and Arrow schema disagree")
        for list_field, item_cls in cls.ITEMS.items():
            struct = cls.SCHEMA.field(list_field).type.value_type
            item_names = {f.name for f in dataclasses.fields(item_cls)}
            if item_names != {struct.field(i).name for i in range(struct.num_fields)}:
                raise RuntimeError(f"{name}.{list_field}: item dataclass and struct disagree")


_check_consistency()
