"""Read the one row of a flat record batch (ints, floats, strings, binaries) without pyarrow.

The hot path of ``decode`` for messages whose schema is already known good (frames, audio
chunks, notes, dead letters): pyarrow's reader, full validation and ``to_pylist`` cost about
three times as much as walking the few buffers of one row, and release the interpreter lock
several times per message. ``read_row`` returns the row as a dict, or ``None`` for anything it
does not vouch for (several rows, a null count that is not 0 or 1, a buffer outside the body,
offsets out of order, text that is not UTF-8, a layout it does not know): the caller then takes
the pyarrow path, which raises the exact error. It never reads outside ``data``.

IPC layout (Arrow columnar format): a record batch message is the continuation marker, the
metadata length, a flatbuffer ``Message`` whose header is a ``RecordBatch`` table (length,
nodes: one (length, null count) per field, buffers: (offset, length) per buffer, relative to
the body), then the body. Fixed-width fields have two buffers (validity, values); strings and
binaries three (validity, int32 offsets, data).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import pyarrow as pa

_U8, _U16, _I16, _I32, _U32, _I64 = (struct.Struct(f) for f in ("<B", "<H", "<h", "<i", "<I", "<q"))
_METADATA_V5 = 4  # MetadataVersion.V5, what pyarrow writes and reads
_RECORD_BATCH = 3  # MessageHeader.RecordBatch
_PAIR = struct.Struct("<ii")
_FIXED = {  # arrow type id -> struct
    pa.int8().id: struct.Struct("<b"),
    pa.int16().id: struct.Struct("<h"),
    pa.int32().id: struct.Struct("<i"),
    pa.int64().id: struct.Struct("<q"),
    pa.float32().id: struct.Struct("<f"),
    pa.float64().id: struct.Struct("<d"),
}
_STRING, _BINARY = pa.string().id, pa.binary().id


@dataclass(frozen=True, slots=True)
class FlatPlan:
    """How to read each field of one schema: (name, fixed-width struct or None, is text)."""

    fields: tuple[tuple[str, struct.Struct | None, bool], ...]
    buffers: int

    @classmethod
    def of(cls, schema: pa.Schema) -> FlatPlan | None:
        """The plan for ``schema``, or None if a field is not of a flat type read here."""
        fields: list[tuple[str, struct.Struct | None, bool]] = []
        buffers = 0
        for field in schema:
            type_id = field.type.id
            if type_id in _FIXED:
                fields.append((field.name, _FIXED[type_id], False))
                buffers += 2
            elif type_id in (_STRING, _BINARY):
                fields.append((field.name, None, type_id == _STRING))
                buffers += 3
            else:
                return None
        return cls(tuple(fields), buffers)


class _Unsure(Exception):
    pass


_CONTINUATION = b"\xff\xff\xff\xff"
_END_OF_STREAM = _CONTINUATION + b"\x00\x00\x00\x00"


def read_row(data: bytes, start: int, plan: FlatPlan) -> dict | None:
    """The row of the stream's one record batch message, at ``data[start:]``, which must be
    followed by the end-of-stream marker and nothing else; None if anything is not so."""
    try:
        return _read(data, start, plan)
    except (_Unsure, struct.error, UnicodeDecodeError, IndexError):
        return None


def _u(fmt: struct.Struct, buf: bytes, offset: int, end: int) -> int:
    if offset < 0 or offset + fmt.size > end:
        raise _Unsure
    return fmt.unpack_from(buf, offset)[0]


class _Table:
    """A flatbuffer table, checked as Arrow's flatbuffer verifier checks it (inside the
    metadata, aligned), so that a message the fast path reads is one pyarrow would too."""

    __slots__ = ("buf", "end", "meta", "pos", "size", "vsize", "vtable")

    def __init__(self, buf: bytes, meta: int, end: int, offset_at: int) -> None:
        if (offset_at - meta) % 4:
            raise _Unsure
        pos = offset_at + _u(_U32, buf, offset_at, end)
        if (pos - meta) % 4:
            raise _Unsure
        vtable = pos - _u(_I32, buf, pos, end)
        if vtable < meta or (vtable - meta) % 2:
            raise _Unsure
        vsize, size = _u(_U16, buf, vtable, end), _u(_U16, buf, vtable + 2, end)
        if vsize < 4 or vsize % 2 or vtable + vsize > end or size < 4 or pos + size > end:
            raise _Unsure
        self.buf, self.meta, self.end, self.pos, self.vtable, self.vsize, self.size = (
            buf,
            meta,
            end,
            pos,
            vtable,
            vsize,
            size,
        )

    def field(self, slot: int, width: int) -> int | None:
        """Where field ``slot`` (``width`` bytes) is; None: absent."""
        if 4 + 2 * slot + 2 > self.vsize:
            return None
        offset = _u(_U16, self.buf, self.vtable + 4 + 2 * slot, self.end)
        if not offset:
            return None
        at = self.pos + offset
        if offset + width > self.size or (at - self.meta) % width:
            raise _Unsure
        return at

    def scalar(self, slot: int, fmt: struct.Struct) -> int | None:
        at = self.field(slot, fmt.size)
        return None if at is None else fmt.unpack_from(self.buf, at)[0]

    def table(self, slot: int) -> _Table | None:
        at = self.field(slot, 4)
        return None if at is None else _Table(self.buf, self.meta, self.end, at)

    def pairs(self, slot: int, count: int) -> tuple[int, ...]:
        """A vector of ``count`` structs of two int64 (nodes or buffers), flattened."""
        at = self.field(slot, 4)
        if at is None:
            raise _Unsure
        vector = at + _u(_U32, self.buf, at, self.end)
        if (vector - self.meta) % 4 or _u(_U32, self.buf, vector, self.end) != count:
            raise _Unsure
        if (vector + 4 - self.meta) % 8 or vector + 4 + 16 * count > self.end:
            raise _Unsure
        return struct.unpack_from(f"<{2 * count}q", self.buf, vector + 4)


def _read(data: bytes, start: int, plan: FlatPlan) -> dict:
    if data[start : start + 4] != _CONTINUATION:
        raise _Unsure
    meta_len = _u(_I32, data, start + 4, len(data))
    meta = start + 8
    end = body = meta + meta_len  # flatbuffer reads stay inside the metadata; the body follows
    if meta_len <= 0 or end > len(data):
        raise _Unsure
    # Message: version (0), header_type (1), header (2), bodyLength (3), custom_metadata (4)
    message = _Table(data, meta, end, meta)
    if message.scalar(0, _I16) != _METADATA_V5 or message.scalar(1, _U8) != _RECORD_BATCH:
        raise _Unsure
    if message.field(4, 4) is not None:
        raise _Unsure  # custom metadata: pyarrow verifies it, this reader does not read it
    body_len = message.scalar(3, _I64)
    batch = message.table(2)
    if body_len is None or batch is None or body_len < 0 or data[body + body_len :] != _END_OF_STREAM:
        raise _Unsure
    # RecordBatch: length (0), nodes (1), buffers (2), compression (3), variadicBufferCounts (4)
    if batch.scalar(0, _I64) != 1:
        raise _Unsure  # several rows (or none): the pyarrow path says so
    if batch.field(3, 4) is not None or batch.field(4, 4) is not None:
        raise _Unsure
    nodes = batch.pairs(1, len(plan.fields))
    buffers = batch.pairs(2, plan.buffers)
    for i in range(0, len(buffers), 2):
        if buffers[i] < 0 or buffers[i] % 8 or buffers[i + 1] < 0 or buffers[i] + buffers[i + 1] > body_len:
            raise _Unsure  # pyarrow wants every buffer inside the body, 8-aligned

    row = {}
    b = 0
    for (name, fixed, text), i in zip(plan.fields, range(0, len(nodes), 2), strict=True):
        if nodes[i] != 1:
            raise _Unsure
        null_count = nodes[i + 1]
        valid_off, valid_len = buffers[b], buffers[b + 1]
        if valid_len:
            valid = data[body + valid_off] & 1
            if valid != (null_count == 0):
                raise _Unsure
        elif null_count:
            raise _Unsure
        if null_count not in (0, 1):
            raise _Unsure
        if fixed is not None:
            off, size = buffers[b + 2], buffers[b + 3]
            b += 4
            if size < fixed.size:
                raise _Unsure
            row[name] = None if null_count else fixed.unpack_from(data, body + off)[0]
            continue
        offsets_off, offsets_len, data_off, data_len = buffers[b + 2 : b + 6]
        b += 6
        if offsets_len < 8:
            raise _Unsure
        first, last = _PAIR.unpack_from(data, body + offsets_off)
        if not 0 <= first <= last <= data_len:
            raise _Unsure
        if null_count:
            row[name] = None
            continue
        value = data[body + data_off + first : body + data_off + last]
        row[name] = value.decode("utf-8") if text else value
    return row
