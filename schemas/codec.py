"""Encode, decode and validate streamvqa records.

Wire format: each Kafka message value (and each manifest object) is one
record as a one-row Arrow ``RecordBatch`` written in the Arrow IPC *stream*
format: a schema message, one record-batch message, the end-of-stream marker.
The schema carries ``streamvqa.type`` and ``streamvqa.version`` metadata.

Decoding never raises anything but :class:`SchemaError` subclasses, whatever
the bytes: the size limit is checked before parsing, the IPC framing is walked
by hand first (so a stream cut short is reported as ``truncated`` and
compressed bodies, which could expand without bound, are refused), pyarrow then
parses it and every array is fully validated before any value is read, and
finally the record's values are validated like :func:`validate` does before
:func:`encode`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import struct
import time
from collections.abc import Callable
from typing import Any, TypeVar, cast

import numpy as np
import pyarrow as pa

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
from .flat_row import FlatPlan, read_row
from .records import (
    BLOCK_TIERS,
    FRAME_CODECS,
    FRAME_TIERS,
    IMAGE_CODECS,
    MAX_TIME_US,
    RECORD_TYPES,
    SAMPLE_FORMATS,
    SUPPORTED_VERSIONS,
    TYPE_KEY,
    VERSION_KEY,
    Answer,
    AudioChunk,
    DeadLetter,
    Frame,
    MemoryManifest,
    Query,
    Record,
    SpeechNote,
    VisualNote,
)

__all__ = [
    "DEFAULT_LIMITS",
    "ID_PATTERN",
    "Limits",
    "decode",
    "decode_any",
    "encode",
    "make_dead_letter",
    "validate",
    "validate_id",
]

_MiB = 1024 * 1024


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """Bounds enforced when validating, encoding and decoding records."""

    max_message_bytes: int = 16 * _MiB  # checked before any parsing
    max_payload_bytes: int = 16 * _MiB - 64 * 1024  # frame/audio/query-image payloads
    max_width: int = 8192
    max_height: int = 8192
    max_text_chars: int = 4096  # query text
    max_answer_chars: int = 65536  # answer text
    max_options: int = 26
    max_option_chars: int = 512
    max_sample_rate: int = 192_000
    max_channels: int = 8
    max_audio_seconds: float = 60.0  # per chunk
    max_list_items: int = 4096  # answer evidence / latency entries
    max_manifest_entries: int = 1_000_000  # per manifest list
    max_excerpt_bytes: int = 1024  # dead-letter payload excerpt
    max_detail_chars: int = 4096  # dead-letter detail
    max_feature_dim: int = 8192  # visual note pooled feature

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ValueError(f"Limits.{f.name} must be a positive number, got {value!r}")


DEFAULT_LIMITS = Limits()

# ------------------------------------------------------------------------ encoding


def encode(record: Record, limits: Limits | None = None) -> bytes:
    """Validate ``record`` and serialise it as a one-row Arrow IPC stream.

    Raises :class:`InvalidField`/:class:`WrongVersion` for a bad record and
    :class:`OversizedMessage` if the result exceeds ``limits.max_message_bytes``.
    """
    limits = limits or DEFAULT_LIMITS
    validate(record, limits)
    cls = type(record)
    batch = pa.RecordBatch.from_pylist([_to_row(record)], schema=cls.SCHEMA)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, cls.SCHEMA) as writer:
        writer.write_batch(batch)
    data = sink.getvalue().to_pybytes()
    if len(data) > limits.max_message_bytes:
        raise OversizedMessage(
            f"encoded {cls.__name__} is {len(data)} bytes, "
            f"more than max_message_bytes={limits.max_message_bytes}"
        )
    return data


def _to_row(value: Any) -> Any:
    """Record/item dataclasses -> dicts, tuples -> lists (what from_pylist takes)."""
    if dataclasses.is_dataclass(value):
        return {f.name: _to_row(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [_to_row(v) for v in value]
    return value


def _from_row(cls: type[Record], row: dict[str, Any]) -> Record:
    """The inverse of :func:`_to_row` for one decoded row (values not yet validated)."""
    kwargs = {}
    for name, item_cls in _row_fields(cls):  # type: ignore[arg-type]  # mypy: a union of classes is not Hashable
        value = row[name]
        if isinstance(value, list):
            value = tuple(item_cls(**v) if item_cls is not None and isinstance(v, dict) else v for v in value)
        kwargs[name] = value
    return cls(**kwargs)


@functools.cache
def _row_fields(cls: type[Record]) -> tuple[tuple[str, type | None], ...]:
    return tuple((f.name, cls.ITEMS.get(f.name)) for f in dataclasses.fields(cls))


# ------------------------------------------------------------------------ decoding


_R = TypeVar("_R", bound=Record)


def decode(data: bytes, record_type: type[_R], limits: Limits | None = None) -> _R:
    """Decode one ``record_type`` message; raises only :class:`SchemaError` subclasses."""
    if record_type not in RECORD_TYPES.values():
        raise TypeError(f"not a streamvqa record type: {record_type!r}")
    # the cast: _record_class refuses a message of any other type (WrongRecordType); the ignore:
    # mypy does not take type[_R] for type[Record] when _R is bound to a union
    return cast(_R, _decode(data, record_type, limits or DEFAULT_LIMITS))  # type: ignore[arg-type]


def decode_any(data: bytes, limits: Limits | None = None) -> Record:
    """Decode a message of any record type, chosen by its ``streamvqa.type`` metadata."""
    return _decode(data, None, limits or DEFAULT_LIMITS)


def _decode(data: Any, expected: type[Record] | None, limits: Limits) -> Record:
    try:
        return _decode_unchecked(data, expected, limits)
    except SchemaError:
        raise
    except Exception as exc:  # the decoder's promise: nothing but SchemaError escapes
        raise MalformedMessage(f"cannot decode message: {type(exc).__name__}: {exc}") from exc


def _decode_unchecked(data: Any, expected: type[Record] | None, limits: Limits) -> Record:
    if data is None:
        raise MalformedMessage("message has no value (null)")
    try:
        if not isinstance(data, bytes):
            data = bytes(memoryview(data))
    except TypeError:
        raise MalformedMessage(f"message must be bytes, got {type(data).__name__}") from None
    if len(data) > limits.max_message_bytes:
        raise OversizedMessage(
            f"message is {len(data)} bytes, more than max_message_bytes={limits.max_message_bytes}"
        )
    known = _known_schema(data, expected)
    if known is not None and (plan := known[2]) is not None:
        # the schema message is byte for byte a flat one that passed every check: read its one
        # batch without pyarrow (anything the reader does not vouch for takes the path below)
        cls, version, _ = known
        row = read_row(data, 8 + int.from_bytes(data[4:8], "little", signed=True), plan)
        if row is not None:
            return _record(cls, version, row, limits)
    _check_framing(data, limits)

    try:
        reader = pa.ipc.open_stream(pa.py_buffer(data))
        schema = reader.schema
        _ = schema.names  # field names must be UTF-8; fail here rather than mid-comparison
    except UnicodeDecodeError as exc:
        raise MalformedMessage(f"corrupt Arrow IPC schema: a field name is not UTF-8: {exc}") from exc
    except Exception as exc:
        raise MalformedMessage(f"corrupt Arrow IPC schema message: {exc}") from exc
    cls, version = _checked_schema(data, schema, expected)

    try:
        batches = list(reader)
        for batch in batches:
            # Full validation (offsets, UTF-8, lengths) before any value is read: without
            # it, corrupt offsets make to_pylist read out of bounds and crash the process.
            batch.validate(full=True)
    except Exception as exc:
        raise MalformedMessage(f"corrupt Arrow IPC record batch: {exc}") from exc
    rows = sum(b.num_rows for b in batches)
    if rows != 1:
        raise InvalidField(
            f"a {cls.__name__} message must hold exactly one row, found {rows} "
            f"in {len(batches)} record batch(es)"
        )
    batch = next(b for b in batches if b.num_rows)
    row = {name: column.to_pylist()[0] for name, column in zip(schema.names, batch.columns, strict=True)}
    return _record(cls, version, row, limits)


def _record(cls: type[Record], version: int, row: dict[str, Any], limits: Limits) -> Record:
    if row["schema_version"] != version:
        raise WrongVersion(
            f"{cls.__name__} column schema_version is {row['schema_version']!r} but the schema "
            f"metadata says {version}; supported versions: {_versions()}",
            "schema_version",
            found=row["schema_version"],
            supported=SUPPORTED_VERSIONS,
        )
    record = _from_row(cls, row)
    validate(record, limits)
    return record


# Schemas that passed the checks, keyed by the exact bytes of their IPC schema message:
# every message of a topic carries the same schema, so the checks run once per schema.
_GOOD_SCHEMAS: dict[tuple[bytes, type[Record] | None], tuple[type[Record], int, FlatPlan | None]] = {}
_GOOD_SCHEMAS_MAX = 256


def _known_schema(
    data: bytes, expected: type[Record] | None
) -> tuple[type[Record], int, FlatPlan | None] | None:
    """The checked (class, version, flat plan) if ``data`` starts with a schema message that passed."""
    if len(data) < 8:
        return None
    length = int.from_bytes(data[4:8], "little", signed=True)
    if length <= 0:
        return None
    return _GOOD_SCHEMAS.get((data[: 8 + length], expected))


def _checked_schema(
    data: bytes, schema: pa.Schema, expected: type[Record] | None
) -> tuple[type[Record], int]:
    # _check_framing has verified the first message: continuation, int32 metadata length,
    # metadata, and (for a schema message) no body.
    schema_bytes = data[: 8 + int.from_bytes(data[4:8], "little", signed=True)]
    key = (schema_bytes, expected)
    hit = _GOOD_SCHEMAS.get(key)
    if hit is not None:
        return hit[:2]
    cls = _record_class(schema, expected)
    version = _check_version(schema, cls)
    _check_schema(schema, cls)
    if len(_GOOD_SCHEMAS) >= _GOOD_SCHEMAS_MAX:
        _GOOD_SCHEMAS.clear()
    _GOOD_SCHEMAS[key] = (cls, version, FlatPlan.of(schema))
    return cls, version


def _record_class(schema: pa.Schema, expected: type[Record] | None) -> type[Record]:
    metadata = schema.metadata or {}
    raw = metadata.get(TYPE_KEY)
    if raw is None:
        raise SchemaMismatch(
            "schema has no streamvqa.type metadata: not a streamvqa record "
            f"(expected {expected.__name__ if expected else 'a streamvqa record'})"
        )
    name = raw.decode("utf-8", "replace")
    if expected is not None:
        if name != expected.__name__:
            raise WrongRecordType(
                f"expected a {expected.__name__} message, found {_show(name)}",
                expected=expected.__name__,
                found=name,
            )
        return expected
    cls = RECORD_TYPES.get(name)
    if cls is None:
        raise WrongRecordType(
            f"unknown record type {_show(name)}; known types: {', '.join(RECORD_TYPES)}",
            found=name,
        )
    return cls


def _versions() -> str:
    return ", ".join(map(str, SUPPORTED_VERSIONS))


def _check_version(schema: pa.Schema, cls: type[Record]) -> int:
    raw = (schema.metadata or {}).get(VERSION_KEY)
    if raw is None:
        raise WrongVersion(
            f"{cls.__name__} schema has no streamvqa.version metadata; supported versions: {_versions()}",
            supported=SUPPORTED_VERSIONS,
        )
    text = raw.decode("utf-8", "replace")
    version = int(text) if re.fullmatch(r"[0-9]{1,9}", text) else None
    if version not in SUPPORTED_VERSIONS:
        raise WrongVersion(
            f"{cls.__name__} message has schema version {_show(text)}; supported versions: {_versions()}",
            found=version if version is not None else text,
            supported=SUPPORTED_VERSIONS,
        )
    return version


def _describe(field: pa.Field) -> str:
    return f"{field.type}{'' if field.nullable else ' not null'}"


def _check_schema(schema: pa.Schema, cls: type[Record]) -> None:
    """Fields must match the expected schema by name, type and nullability (any order)."""
    expected = cls.SCHEMA
    found_names = schema.names
    problems: list[tuple[str, str]] = []
    for name in sorted({n for n in found_names if found_names.count(n) > 1}):
        problems.append((name, f"field {name!r} appears more than once"))
    for name in expected.names:
        if name not in found_names:
            problems.append((name, f"missing field {name!r} ({_describe(expected.field(name))})"))
    for name in found_names:
        if name not in expected.names:
            problems.append((name, f"unexpected field {_show(name)}"))
        elif found_names.count(name) == 1:
            want, got = expected.field(name), schema.field(name)
            if not got.equals(want):
                problems.append((name, f"field {name!r} is {_describe(got)}, expected {_describe(want)}"))
    if problems:
        raise SchemaMismatch(
            f"{cls.__name__} schema mismatch: " + "; ".join(p for _, p in problems),
            problems[0][0],
        )


# IPC framing. Each message: 0xFFFFFFFF, int32 metadata length, a flatbuffer
# `Message` (its header type and body length are read here), the body.
# A zero metadata length is the end-of-stream marker.
_CONTINUATION = b"\xff\xff\xff\xff"
_HEADER_SCHEMA = 1
_HEADER_RECORD_BATCH = 3
_HEADER_NAMES = {0: "none", 1: "schema", 2: "dictionary batch", 3: "record batch", 4: "tensor"}


def _check_framing(data: bytes, limits: Limits) -> None:
    """Walk the IPC stream's messages without parsing them.

    A stream that runs out before its end-of-stream marker is truncated; bytes
    that cannot start or continue a stream are malformed.
    """
    n = len(data)
    if n == 0:
        raise TruncatedMessage("message is empty (0 bytes)")
    pos = 0
    index = 0
    while True:
        head = data[pos : pos + 8]
        if not _CONTINUATION.startswith(head[:4]):
            raise MalformedMessage(
                f"not an Arrow IPC stream: expected the continuation marker FFFFFFFF at byte "
                f"{pos}, found {head[:4].hex().upper()}"
            )
        if len(head) < 8:
            raise TruncatedMessage(
                f"message ends after {n} bytes, inside the header of IPC message #{index} "
                "(no end-of-stream marker)"
            )
        (meta_len,) = struct.unpack_from("<i", data, pos + 4)
        if meta_len == 0:
            if pos + 8 != n:
                raise MalformedMessage(
                    f"{n - pos - 8} unexpected bytes after the end-of-stream marker at byte {pos}"
                )
            return
        if meta_len < 0 or meta_len > limits.max_message_bytes:
            raise MalformedMessage(f"IPC message #{index} has invalid metadata length {meta_len}")
        meta_start = pos + 8
        if meta_start + meta_len > n:
            raise TruncatedMessage(
                f"message ends after {n} bytes, inside the metadata of IPC message #{index} "
                f"({meta_len} bytes from byte {meta_start})"
            )
        header_type, body_len, compressed = _parse_message_meta(
            data[meta_start : meta_start + meta_len], index
        )
        wanted = _HEADER_SCHEMA if index == 0 else _HEADER_RECORD_BATCH
        if header_type != wanted:
            raise MalformedMessage(
                f"IPC message #{index} is a {_HEADER_NAMES.get(header_type, header_type)} "
                f"message, expected a {_HEADER_NAMES[wanted]} message"
            )
        if compressed:
            raise MalformedMessage(f"IPC message #{index} has a compressed body; not accepted")
        if body_len < 0 or body_len > limits.max_message_bytes:
            raise MalformedMessage(f"IPC message #{index} has invalid body length {body_len}")
        pos = meta_start + meta_len + body_len
        if pos > n:
            raise TruncatedMessage(
                f"message ends after {n} bytes, inside the body of IPC message #{index} "
                f"({body_len} bytes from byte {meta_start + meta_len})"
            )
        index += 1


_U8, _U16, _I32, _U32, _I64 = (struct.Struct(f) for f in ("<B", "<H", "<i", "<I", "<q"))


def _parse_message_meta(buf: bytes, index: int) -> tuple[int, int, bool]:
    """(header type, body length, compressed) of a flatbuffer ``Message`` table."""
    size = len(buf)

    def read(fmt: struct.Struct, offset: int) -> int:
        if offset < 0 or offset + fmt.size > size:
            raise MalformedMessage(f"IPC message #{index} has corrupt metadata (offset {offset})")
        return fmt.unpack_from(buf, offset)[0]

    def vtable(table: int) -> tuple[int, int]:
        start = table - read(_I32, table)
        return start, read(_U16, start)

    def field_pos(table: int, table_vtable: tuple[int, int], slot: int) -> int | None:
        start, vtable_size = table_vtable
        if 4 + 2 * slot + 2 > vtable_size:
            return None
        offset = read(_U16, start + 4 + 2 * slot)
        return table + offset if offset else None

    message = read(_U32, 0)
    message_vtable = vtable(message)
    # Message: version (slot 0), header_type (1), header (2), bodyLength (3).
    pos = field_pos(message, message_vtable, 1)
    header_type = read(_U8, pos) if pos is not None else 0
    pos = field_pos(message, message_vtable, 3)
    body_len = read(_I64, pos) if pos is not None else 0
    compressed = False
    if header_type == _HEADER_RECORD_BATCH:
        pos = field_pos(message, message_vtable, 2)
        if pos is None:
            raise MalformedMessage(f"IPC message #{index} has no record batch header")
        batch = pos + read(_U32, pos)
        # RecordBatch: length (0), nodes (1), buffers (2), compression (3).
        compressed = field_pos(batch, vtable(batch), 3) is not None
    return header_type, body_len, compressed


# ---------------------------------------------------------------------- validation

ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")  # latency stage names
_MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,255}")
_REASON = re.compile(r"[a-z][a-z0-9_]{0,63}")
_HASH = re.compile(r"[A-Za-z0-9][A-Za-z0-9:._-]{0,255}")
_OBJECT_KEY = re.compile(r"[A-Za-z0-9._=:@+-]+(/[A-Za-z0-9._=:@+-]+)*")
_JPEG_SOI, _JPEG_EOI = b"\xff\xd8", b"\xff\xd9"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"


def validate(record: Record, limits: Limits | None = None) -> None:
    """Check every field of ``record``; raises :class:`InvalidField` (or
    :class:`WrongVersion`) naming the first offending field. ``encode`` and
    ``decode`` call this."""
    cls = type(record)
    if RECORD_TYPES.get(cls.__name__) is not cls:
        raise TypeError(f"not a streamvqa record: {type(record).__name__}")
    limits = limits or DEFAULT_LIMITS
    version = record.schema_version
    if version not in SUPPORTED_VERSIONS:
        raise WrongVersion(
            f"{cls.__name__}.schema_version is {version!r}; supported versions: {_versions()}",
            "schema_version",
            found=version,
            supported=SUPPORTED_VERSIONS,
        )
    for spec in _field_specs(cls):  # type: ignore[arg-type]  # mypy: a union of classes is not Hashable
        _check_value(getattr(record, spec.name), spec, spec.name)
    _VALIDATORS[cls](record, limits)


@dataclasses.dataclass(frozen=True, slots=True)
class _Spec:
    """What one Arrow field takes, worked out once per record class (``validate`` runs per message)."""

    name: str
    kind: str  # "int", "float", "str", "bytes", "list"
    nullable: bool
    type_name: str
    bound: int = 0  # ints: values lie in [-bound, bound)
    item: _Spec | None = None  # lists of plain values
    item_cls: type | None = None  # lists of item records...
    item_fields: tuple[_Spec, ...] = ()  # ...and their fields


def _spec(field: pa.Field, item_cls: type | None = None) -> _Spec:
    t = field.type
    common = {"name": field.name, "nullable": field.nullable, "type_name": str(t)}
    if pa.types.is_integer(t):
        return _Spec(kind="int", bound=1 << (t.bit_width - 1), **common)
    if pa.types.is_floating(t):
        return _Spec(kind="float", **common)
    if pa.types.is_string(t):
        return _Spec(kind="str", **common)
    if pa.types.is_binary(t):
        return _Spec(kind="bytes", **common)
    if pa.types.is_list(t):
        item_field = t.value_field
        if item_cls is None:
            return _Spec(kind="list", item=_spec(item_field), **common)
        return _Spec(
            kind="list", item_cls=item_cls, item_fields=tuple(_spec(sub) for sub in item_field.type), **common
        )
    raise TypeError(f"unsupported Arrow type {t} for {field.name}")  # pragma: no cover


@functools.cache
def _field_specs(cls: type[Record]) -> tuple[_Spec, ...]:
    return tuple(_spec(f, cls.ITEMS.get(f.name)) for f in cls.SCHEMA)


def _check_value(value: Any, spec: _Spec, path: str) -> None:
    """Python type and range of one value against its Arrow field."""
    if value is None:
        if spec.nullable:
            return
        raise InvalidField(f"{path} is required but is missing (null)", path)
    kind = spec.kind
    if kind == "int":
        if not isinstance(value, int) or isinstance(value, bool):
            raise InvalidField(f"{path} must be an int, got {type(value).__name__}", path)
        if not -spec.bound <= value < spec.bound:
            raise InvalidField(f"{path}={value} does not fit in {spec.type_name}", path)
    elif kind == "float":
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise InvalidField(f"{path} must be a float, got {type(value).__name__}", path)
    elif kind == "str":
        if not isinstance(value, str):
            raise InvalidField(f"{path} must be a str, got {type(value).__name__}", path)
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise InvalidField(f"{path} is not valid Unicode text: {exc.reason}", path) from None
    elif kind == "bytes":
        if not isinstance(value, bytes):
            raise InvalidField(f"{path} must be bytes, got {type(value).__name__}", path)
    else:
        if not isinstance(value, tuple):
            raise InvalidField(f"{path} must be a tuple, got {type(value).__name__}", path)
        item_cls = spec.item_cls
        item_spec = cast(_Spec, spec.item)  # what _spec sets for a list of plain values (no item_cls)
        for i, item in enumerate(value):
            item_path = f"{path}[{i}]"
            if item_cls is None:
                _check_value(item, item_spec, item_path)
                continue
            if not isinstance(item, item_cls):
                raise InvalidField(
                    f"{item_path} must be a {item_cls.__name__}, got {type(item).__name__}",
                    item_path,
                )
            for sub in spec.item_fields:
                _check_value(getattr(item, sub.name), sub, f"{item_path}.{sub.name}")


def _show(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _id(value: str, field: str) -> None:
    if not ID_PATTERN.fullmatch(value) or ".." in value:
        raise InvalidField(
            f"{field} {_show(value)} is not a valid id: 1-128 characters from [A-Za-z0-9._-], "
            "starting with a letter or digit, without '..'",
            field,
        )


def validate_id(value: object, field: str = "stream_id") -> str:
    """``value`` if it is a valid id (a stream or query id, by the rule records are validated
    with), else :class:`InvalidField` naming ``field``. For ids that come from outside (the
    command line) before anything is built from them."""
    if not isinstance(value, str):
        raise InvalidField(f"{field} must be a str, got {type(value).__name__}", field)
    _id(value, field)
    return value


def _time(value: int, field: str) -> None:
    """A time (µs): in ``[0, MAX_TIME_US]``."""
    _between(value, field, 0)
    if value > MAX_TIME_US:
        raise InvalidField(
            f"{field}={value} is after MAX_TIME_US={MAX_TIME_US} (2**62 µs, about 146,000 years): "
            "not a plausible time",
            field,
        )


def _pattern(value: str, field: str, pattern: re.Pattern[str], what: str) -> None:
    if not pattern.fullmatch(value):
        raise InvalidField(f"{field} {_show(value)} is not a valid {what}", field)


def _between(value: float, field: str, low: float, high: float | None = None) -> None:
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise InvalidField(f"{field} must be {bound}, got {value}", field)


def _finite(value: float, field: str) -> None:
    if not math.isfinite(value):
        raise InvalidField(f"{field} must be a finite number, got {value}", field)


def _choice(value: str, field: str, allowed: frozenset[str] | dict[str, int]) -> None:
    if value not in allowed:
        raise InvalidField(f"{field} {_show(value)} is not one of {', '.join(sorted(allowed))}", field)


def _text(value: str, field: str, max_chars: int, *, allow_blank: bool = False) -> None:
    if not allow_blank and not value.strip():
        raise InvalidField(f"{field} must not be empty or only whitespace", field)
    if len(value) > max_chars:
        raise InvalidField(f"{field} is {len(value)} characters, more than {max_chars}", field)


def _count(items: tuple[Any, ...], field: str, limit: int) -> None:
    if len(items) > limit:
        raise InvalidField(f"{field} has {len(items)} entries, more than {limit}", field)


def _span(start_us: int, end_us: int, path: str) -> None:
    _time(start_us, f"{path}.start_us")
    if start_us > end_us:
        raise InvalidField(
            f"{path}.end_us ({end_us}) is before {path}.start_us ({start_us})", f"{path}.end_us"
        )
    _time(end_us, f"{path}.end_us")


def _payload(payload: bytes, field: str, limits: Limits) -> None:
    if not payload:
        raise InvalidField(f"{field} is empty", field)
    if len(payload) > limits.max_payload_bytes:
        raise InvalidField(
            f"{field} is {len(payload)} bytes, more than max_payload_bytes={limits.max_payload_bytes}",
            field,
        )


def _image(codec: str, payload: bytes, field: str) -> None:
    """Cheap container checks that catch truncated or mislabelled images."""
    if codec == "jpeg":
        if not payload.startswith(_JPEG_SOI):
            raise InvalidField(f"{field} is not a JPEG: no SOI marker FFD8 at the start", field)
        if len(payload) < 4 or not payload.endswith(_JPEG_EOI):
            raise InvalidField(
                f"{field} is a truncated or corrupt JPEG: no EOI marker FFD9 at the end", field
            )
    elif codec == "png":
        if not payload.startswith(_PNG_SIGNATURE):
            raise InvalidField(f"{field} is not a PNG: no PNG signature at the start", field)
        if not payload.endswith(_PNG_IEND):
            raise InvalidField(f"{field} is a truncated or corrupt PNG: no IEND chunk at the end", field)


def _validate_frame(r: Frame, limits: Limits) -> None:
    _id(r.stream_id, "stream_id")
    _between(r.seq, "seq", 0)
    _time(r.pts_us, "pts_us")
    _choice(r.codec, "codec", FRAME_CODECS)
    _between(r.width, "width", 1, limits.max_width)
    _between(r.height, "height", 1, limits.max_height)
    _payload(r.payload, "payload", limits)
    if r.codec == "rgb24":
        want = r.width * r.height * 3
        if len(r.payload) != want:
            raise InvalidField(
                f"payload is {len(r.payload)} bytes but an rgb24 frame of "
                f"{r.width}x{r.height} needs width*height*3 = {want}",
                "payload",
            )
    else:
        _image(r.codec, r.payload, "payload")


def _validate_audio(r: AudioChunk, limits: Limits) -> None:
    _id(r.stream_id, "stream_id")
    _between(r.seq, "seq", 0)
    _time(r.pts_us, "pts_us")
    _between(r.sample_rate, "sample_rate", 1, limits.max_sample_rate)
    _between(r.channels, "channels", 1, limits.max_channels)
    _choice(r.sample_format, "sample_format", SAMPLE_FORMATS)
    _payload(r.payload, "payload", limits)
    frame_bytes = r.channels * SAMPLE_FORMATS[r.sample_format]
    if len(r.payload) % frame_bytes:
        raise InvalidField(
            f"payload is {len(r.payload)} bytes, not a multiple of channels*bytes_per_sample "
            f"= {frame_bytes} ({r.channels} x {r.sample_format})",
            "payload",
        )
    seconds = len(r.payload) // frame_bytes / r.sample_rate
    if seconds > limits.max_audio_seconds:
        raise InvalidField(
            f"payload holds {seconds:.3f} s of audio, more than max_audio_seconds={limits.max_audio_seconds}",
            "payload",
        )
    n_samples = len(r.payload) // frame_bytes
    duration_us = -(-n_samples * 1_000_000 // r.sample_rate)  # rounded up
    if r.pts_us + duration_us > MAX_TIME_US:
        raise InvalidField(
            f"pts_us={r.pts_us} plus the chunk's {duration_us} µs of audio ends after "
            f"MAX_TIME_US={MAX_TIME_US} (2**62 µs): not a plausible time",
            "pts_us",
        )
    if r.sample_format == "f32le":
        samples = np.frombuffer(r.payload, dtype="<f4")
        bad = np.flatnonzero(~np.isfinite(samples))
        if bad.size:
            raise InvalidField(
                f"payload holds {bad.size} non-finite f32le sample(s), the first "
                f"({samples[bad[0]]}) at sample {bad[0]}",
                "payload",
            )


def _validate_query(r: Query, limits: Limits) -> None:
    _id(r.query_id, "query_id")
    _id(r.stream_id, "stream_id")
    _text(r.text, "text", limits.max_text_chars)
    _time(r.asked_at_us, "asked_at_us")
    if r.options is not None:
        if not r.options:
            raise InvalidField("options is empty; use None for an open question", "options")
        _count(r.options, "options", limits.max_options)
        for i, option in enumerate(r.options):
            _text(option, f"options[{i}]", limits.max_option_chars)
        if len(set(r.options)) != len(r.options):
            raise InvalidField("options holds the same option more than once", "options")
    if (r.image is None) != (r.image_codec is None):
        missing = "image_codec" if r.image_codec is None else "image"
        raise InvalidField(f"image and image_codec go together; {missing} is missing", missing)
    if r.image is not None and r.image_codec is not None:  # both or neither (checked above)
        _choice(r.image_codec, "image_codec", IMAGE_CODECS)
        _payload(r.image, "image", limits)
        _image(r.image_codec, r.image, "image")


def _validate_answer(r: Answer, limits: Limits) -> None:
    _id(r.query_id, "query_id")
    _id(r.stream_id, "stream_id")
    _text(r.text, "text", limits.max_answer_chars, allow_blank=True)
    _pattern(r.model_id, "model_id", _MODEL_ID, "model id")
    _time(r.answered_at_us, "answered_at_us")
    _count(r.evidence, "evidence", limits.max_list_items)
    for i, span in enumerate(r.evidence):
        _span(span.start_us, span.end_us, f"evidence[{i}]")
        _finite(span.score, f"evidence[{i}].score")
    _count(r.latency, "latency", limits.max_list_items)
    for i, stage in enumerate(r.latency):
        _pattern(stage.stage, f"latency[{i}].stage", _NAME, "stage name")
        _finite(stage.ms, f"latency[{i}].ms")
        _between(stage.ms, f"latency[{i}].ms", 0)


def _validate_dead_letter(r: DeadLetter, limits: Limits) -> None:
    _topic(r.source_topic, "source_topic")
    _between(r.source_partition, "source_partition", -1)  # -1: unknown
    _between(r.source_offset, "source_offset", -1)  # -1: unknown
    _pattern(r.reason, "reason", _REASON, "reason code (lower_snake_case, <= 64 chars)")
    _text(r.detail, "detail", limits.max_detail_chars, allow_blank=True)
    if len(r.payload_excerpt) > limits.max_excerpt_bytes:
        raise InvalidField(
            f"payload_excerpt is {len(r.payload_excerpt)} bytes, more than max_excerpt_bytes="
            f"{limits.max_excerpt_bytes}",
            "payload_excerpt",
        )
    _between(r.payload_size, "payload_size", len(r.payload_excerpt))
    _time(r.failed_at_us, "failed_at_us")


def _topic(value: str, field: str) -> None:
    if not _TOPIC.fullmatch(value) or value in {".", ".."}:
        raise InvalidField(f"{field} {_show(value)} is not a valid Kafka topic name", field)


def _validate_manifest(r: MemoryManifest, limits: Limits) -> None:
    _id(r.stream_id, "stream_id")
    _between(r.generation, "generation", 0)
    _time(r.updated_at_us, "updated_at_us")
    _between(r.token_budget, "token_budget", 0)
    _between(r.total_tokens, "total_tokens", 0)
    for name in ("frames", "kv_blocks", "source_offsets"):
        _count(getattr(r, name), name, limits.max_manifest_entries)
    for i, f in enumerate(r.frames):
        path = f"frames[{i}]"
        _between(f.seq, f"{path}.seq", 0)
        _time(f.pts_us, f"{path}.pts_us")
        _choice(f.tier, f"{path}.tier", FRAME_TIERS)
        _between(f.tokens, f"{path}.tokens", 0)
        _finite(f.score, f"{path}.score")
        _pattern(f.content_hash, f"{path}.content_hash", _HASH, "content hash")
    for i, b in enumerate(r.kv_blocks):
        path = f"kv_blocks[{i}]"
        _between(b.block_index, f"{path}.block_index", 0)
        _span(b.start_us, b.end_us, path)
        _choice(b.tier, f"{path}.tier", BLOCK_TIERS)
        _between(b.nbytes, f"{path}.nbytes", 0)
        if b.key and (
            len(b.key) > 1024
            or not _OBJECT_KEY.fullmatch(b.key)
            or any(part in {".", ".."} for part in b.key.split("/"))
        ):
            raise InvalidField(
                f"{path}.key {_show(b.key)} is not a valid object key (relative, '/'-separated, "
                "no empty, '.' or '..' segments, <= 1024 characters)",
                f"{path}.key",
            )
        _pattern(b.content_hash, f"{path}.content_hash", _HASH, "content hash")
    for i, s in enumerate(r.source_offsets):
        path = f"source_offsets[{i}]"
        _topic(s.topic, f"{path}.topic")
        _between(s.partition, f"{path}.partition", 0)
        _between(s.next_offset, f"{path}.next_offset", 0)


def _validate_visual_note(r: VisualNote, limits: Limits) -> None:
    _id(r.stream_id, "stream_id")
    _between(r.seq, "seq", 0)
    _time(r.pts_us, "pts_us")
    _time(r.wall_us, "wall_us")
    _choice(r.tier, "tier", _NOTE_TIERS)
    _pattern(r.reason, "reason", _NAME, "reason")
    for name in ("score", "threshold"):
        if getattr(r, name) is not None:
            _finite(getattr(r, name), name)
    _between(r.tokens, "tokens", 0)
    _between(r.memory_tokens, "memory_tokens", 0)
    _finite(r.cached_fraction, "cached_fraction")
    if not 0.0 <= r.cached_fraction <= 1.0:
        raise InvalidField(f"cached_fraction={r.cached_fraction} is not in [0, 1]", "cached_fraction")
    _count(r.feature, "feature", limits.max_feature_dim)
    for i, value in enumerate(r.feature):
        _finite(value, f"feature[{i}]")
    if r.keyframe_key and not _OBJECT_KEY.fullmatch(r.keyframe_key):
        raise InvalidField(f"keyframe_key {_show(r.keyframe_key)} is not a valid object key", "keyframe_key")
    _pattern(r.content_hash, "content_hash", _HASH, "content hash")
    _finite(r.encode_ms, "encode_ms")
    _between(r.encode_ms, "encode_ms", 0)


def _validate_speech_note(r: SpeechNote, limits: Limits) -> None:
    _id(r.stream_id, "stream_id")
    _between(r.seq, "seq", 0)
    _time(r.start_us, "start_us")
    _span(r.start_us, r.end_us, "span")
    _time(r.wall_us, "wall_us")
    _text(r.text, "text", limits.max_answer_chars, allow_blank=True)
    _finite(r.avg_logprob, "avg_logprob")
    _finite(r.asr_ms, "asr_ms")
    _between(r.asr_ms, "asr_ms", 0)
    if r.open_since_us is not None:
        if r.text:
            raise InvalidField("open_since_us is for progress marks (blank text) only", "open_since_us")
        _span(r.open_since_us, r.end_us, "open_since_us")


_NOTE_TIERS = frozenset({"clear", "fuzzy"})

_VALIDATORS: dict[type[Record], Callable[[Any, Limits], None]] = {
    Frame: _validate_frame,
    AudioChunk: _validate_audio,
    Query: _validate_query,
    Answer: _validate_answer,
    DeadLetter: _validate_dead_letter,
    MemoryManifest: _validate_manifest,
    VisualNote: _validate_visual_note,
    SpeechNote: _validate_speech_note,
}

# --------------------------------------------------------------------- dead letters


def make_dead_letter(
    error: BaseException,
    *,
    source_topic: str,
    source_partition: int,
    source_offset: int,
    payload: bytes | None,
    key: bytes | None = None,
    failed_at_us: int | None = None,
    limits: Limits | None = None,
) -> DeadLetter:
    """A :class:`DeadLetter` for a message that failed with ``error``.

    ``reason`` is the error's ``reason`` code for a :class:`SchemaError`, else
    ``"unexpected_error"``; the payload is cut to ``limits.max_excerpt_bytes``.
    """
    limits = limits or DEFAULT_LIMITS
    if isinstance(error, SchemaError):
        reason, detail = error.reason, str(error)
    else:
        reason, detail = "unexpected_error", f"{type(error).__name__}: {error}"
    detail = detail.encode("utf-8", "replace").decode("utf-8")[: limits.max_detail_chars]
    payload = bytes(payload or b"")
    return DeadLetter(
        source_topic=source_topic,
        source_partition=source_partition,
        source_offset=source_offset,
        key=None if key is None else bytes(key),
        reason=reason,
        detail=detail,
        payload_excerpt=payload[: limits.max_excerpt_bytes],
        payload_size=len(payload),
        failed_at_us=time.time_ns() // 1000 if failed_at_us is None else failed_at_us,
    )
