"""Deterministic bytes for operator state: a JSON header plus raw little-endian array buffers.

``pack(obj)`` accepts dicts (str keys), lists/tuples, str, int, float (NaN and
infinities included), bool, None and numpy arrays; ``unpack`` returns the same
structure (tuples come back as lists, arrays as read-only-safe copies). Floats
go through ``repr`` and arrays through their raw bytes, so a round trip is
exact. No pickle: a state blob from another process or version cannot run code,
and a foreign or corrupt blob raises :class:`StateFormatError`.

Layout: ``MAGIC (4) | header length (uint32 LE) | header JSON (utf-8) | buffers``.
"""

from __future__ import annotations

import json
import struct

import numpy as np

MAGIC = b"SVQ1"
_ND = "__nd__"
_ALLOWED_DTYPES = {"<f8", "<f4", "<f2", "<i8", "<i4", "<i2", "|u1", "|i1", "|b1"}


class StateFormatError(ValueError):
    """The bytes are not a state blob this codec wrote."""


def pack(obj: object) -> bytes:
    buffers: list[bytes] = []
    offset = 0

    def enc(o: object) -> object:
        nonlocal offset
        if isinstance(o, np.ndarray):
            a = np.ascontiguousarray(o)
            a = a.astype(a.dtype.newbyteorder("<"), copy=False)
            raw = a.tobytes()
            spec = {_ND: [a.dtype.str, list(a.shape), offset, len(raw)]}
            buffers.append(raw)
            offset += len(raw)
            return spec
        if isinstance(o, dict):
            if _ND in o:
                raise ValueError(f"dict key {_ND!r} is reserved")
            return {str(k): enc(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [enc(v) for v in o]
        if isinstance(o, (np.floating, np.integer, np.bool_)):
            return o.item()
        if o is None or isinstance(o, (str, int, float, bool)):
            return o
        raise TypeError(f"cannot pack {type(o).__name__}")

    header = json.dumps(enc(obj), separators=(",", ":"), sort_keys=True, allow_nan=True).encode()
    return b"".join([MAGIC, struct.pack("<I", len(header)), header, *buffers])


def unpack(data: bytes) -> object:
    data = bytes(data)
    if len(data) < 8 or data[:4] != MAGIC:
        raise StateFormatError("not a streamvqa state blob (bad magic)")
    (hlen,) = struct.unpack("<I", data[4:8])
    if 8 + hlen > len(data):
        raise StateFormatError("truncated state blob (header)")
    try:
        header = json.loads(data[8 : 8 + hlen])
    except ValueError as exc:
        raise StateFormatError(f"corrupt state header: {exc}") from None
    body = memoryview(data)[8 + hlen :]

    def dec(o: object) -> object:
        if isinstance(o, dict):
            if _ND in o:
                dtype, shape, start, size = o[_ND]
                if dtype not in _ALLOWED_DTYPES or start < 0 or start + size > len(body):
                    raise StateFormatError("corrupt array in state blob")
                a = np.frombuffer(body[start : start + size], dtype=np.dtype(dtype))
                if a.size != int(np.prod(shape, dtype=np.int64)):
                    raise StateFormatError("array size does not match its shape")
                return a.reshape(shape).copy()
            return {k: dec(v) for k, v in o.items()}
        if isinstance(o, list):
            return [dec(v) for v in o]
        return o

    return dec(header)
