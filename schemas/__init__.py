"""streamvqa record schemas: Arrow schemas, record dataclasses, a validating codec.

    from streamvqa.schemas import Frame, decode, encode

    data = encode(frame)          # validates; one-row Arrow IPC stream (bytes)
    frame = decode(data, Frame)   # or decode_any(data) for mixed topics

Decoding raises only :class:`SchemaError` subclasses; ``err.reason`` is the
short code written to the dead-letter topic (see :func:`make_dead_letter`).
"""

from .codec import (
    DEFAULT_LIMITS,
    ID_PATTERN,
    Limits,
    decode,
    decode_any,
    encode,
    make_dead_letter,
    validate,
    validate_id,
)
from .errors import (
    InvalidField,
    MalformedMessage,
    OversizedMessage,
    SchemaError,
    SchemaMismatch,
    TruncatedMessage,
    WrongRecordType,
    WrongVersion,
)
from .records import (
    BLOCK_TIERS,
    CURRENT_VERSION,
    FRAME_CODECS,
    FRAME_TIERS,
    IMAGE_CODECS,
    MAX_TIME_US,
    RECORD_TYPES,
    SAMPLE_FORMATS,
    SUPPORTED_VERSIONS,
    Answer,
    AudioChunk,
    DeadLetter,
    EvidenceSpan,
    Frame,
    ManifestBlock,
    ManifestFrame,
    MemoryManifest,
    Query,
    Record,
    SourceOffset,
    SpeechNote,
    StageLatency,
    VisualNote,
)

__all__ = [
    "BLOCK_TIERS",
    "CURRENT_VERSION",
    "DEFAULT_LIMITS",
    "FRAME_CODECS",
    "FRAME_TIERS",
    "ID_PATTERN",
    "IMAGE_CODECS",
    "MAX_TIME_US",
    "RECORD_TYPES",
    "SAMPLE_FORMATS",
    "SUPPORTED_VERSIONS",
    "Answer",
    "AudioChunk",
    "DeadLetter",
    "EvidenceSpan",
    "Frame",
    "InvalidField",
    "Limits",
    "MalformedMessage",
    "ManifestBlock",
    "ManifestFrame",
    "MemoryManifest",
    "OversizedMessage",
    "Query",
    "Record",
    "SchemaError",
    "SchemaMismatch",
    "SourceOffset",
    "SpeechNote",
    "StageLatency",
    "VisualNote",
    "TruncatedMessage",
    "WrongRecordType",
    "WrongVersion",
    "decode",
    "decode_any",
    "encode",
    "make_dead_letter",
    "validate",
    "validate_id",
]
