"""The one codec of operator and stage state: versioned, deterministic, no pickle.

``pack(kind, version, obj)`` -> bytes; ``unpack(data, kind, version)`` -> obj. ``obj`` is built of
dicts (str keys), lists/tuples, str, int, float (NaN and infinities included), bool, None,
``bytes``, numpy arrays and torch tensors (any dtype, bfloat16 included; unpacked on the CPU).
Floats go through JSON ``repr`` and arrays through their raw little-endian bytes, so a round trip
is exact and the same value always gives the same bytes (content-addressed keys rely on it).
Tuples come back as lists.

Layout::

    b"SVQ2" | header length (uint32 LE) | header JSON (utf-8) | buffers
    header = {"kind": str, "version": int, "body": <obj with buffer references>}

Every snapshot names what it is (``kind``, e.g. ``"frame-stage"``) and the layout version its
writer used. A reader accepts only its own kind and version: a blob of another kind, a newer or
older version, or of a format from before this codec raises :class:`StateFormatError` (or its
subclass :class:`UnsupportedStateVersion`) with a message that says which, never a crash
further in.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
import torch

MAGIC = b"SVQ2"
_ND, _TS, _BY = "__nd__", "__ts__", "__by__"
_RESERVED = {_ND, _TS, _BY}
_ALLOWED_DTYPES = {"<f8", "<f4", "<f2", "<i8", "<i4", "<i2", "|u1", "|i1", "|b1", "<u2", "<u4", "<u8"}
_TORCH_DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
# tags of the formats each stage wrote before this codec: named in the error, not parsed
_PRE_CODEC = (
    b"streamvqa.",
    b"STCC",
    b"STCP",
    b"SVQ1",
    b"SVQKV",
)


class StateFormatError(ValueError):
    """The bytes are not a state blob of the kind asked for (corrupt, foreign or truncated)."""


class UnsupportedStateVersion(StateFormatError):
    """A state blob of the right kind written by another layout version (an older snapshot)."""


def pack(kind: str, version: int, obj: object) -> bytes:
    """``obj`` as the bytes of a ``kind`` state at layout ``version`` (see the module doc)."""
    buffers: list[bytes] = []
    offset = 0

    def buffer(raw: bytes) -> int:
        nonlocal offset
        start = offset
        buffers.append(raw)
        offset += len(raw)
        return start

    def enc(o: object) -> object:
        if isinstance(o, torch.Tensor):
            t = o.detach().cpu().contiguous()
            dtype = str(t.dtype).removeprefix("torch.")
            if dtype not in _TORCH_DTYPES:
                raise TypeError(f"cannot pack a tensor of {t.dtype}")
            raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
            return {_TS: [dtype, list(t.shape), buffer(raw), len(raw)]}
        if isinstance(o, np.ndarray):
            a = np.ascontiguousarray(o)
            a = a.astype(a.dtype.newbyteorder("<"), copy=False)
            raw = a.tobytes()
            return {_ND: [a.dtype.str, list(a.shape), buffer(raw), len(raw)]}
        if isinstance(o, (bytes, bytearray, memoryview)):
            raw = bytes(o)
            return {_BY: [buffer(raw), len(raw)]}
        if isinstance(o, dict):
            if _RESERVED & set(o):
                raise ValueError(f"dict keys {sorted(_RESERVED)} are reserved")
            return {str(k): enc(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [enc(v) for v in o]
        if isinstance(o, (np.floating, np.integer, np.bool_)):
            return o.item()
        if o is None or isinstance(o, (str, int, float, bool)):
            return o
        raise TypeError(f"cannot pack {type(o).__name__}")

    body = enc(obj)
    header = json.dumps(
        {"kind": kind, "version": int(version), "body": body},
        separators=(",", ":"),
        sort_keys=True,
        allow_nan=True,
    ).encode()
    return b"".join([MAGIC, struct.pack("<I", len(header)), header, *buffers])


def kind_of(data: bytes) -> tuple[str, int]:
    """(kind, version) of a state blob, read from its header only."""
    header, _ = _header(bytes(data))
    return header["kind"], header["version"]


def unpack(data: bytes, kind: str, version: int) -> Any:
    """The value a ``pack(kind, version, ...)`` wrote; :class:`StateFormatError` otherwise."""
    data = bytes(data)
    header, body = _header(data)
    if header["kind"] != kind:
        raise StateFormatError(f"a {header['kind']!r} state where a {kind!r} state was expected")
    if header["version"] != version:
        raise UnsupportedStateVersion(
            f"a {kind!r} state of layout version {header['version']}; this build reads version "
            f"{version} only (a snapshot from {'a newer' if header['version'] > version else 'an older'} "
            "release: start the stream's state afresh, or run the release that wrote it)"
        )

    def span(start: Any, size: Any) -> memoryview:
        if not isinstance(start, int) or not isinstance(size, int) or start < 0 or start + size > len(body):
            raise StateFormatError(f"corrupt buffer reference in a {kind!r} state")
        return body[start : start + size]

    def dec(o: object) -> object:
        if isinstance(o, dict):
            if _TS in o:
                dtype, shape, start, size = o[_TS]
                if dtype not in _TORCH_DTYPES:
                    raise StateFormatError(f"corrupt tensor in a {kind!r} state")
                raw = span(start, size)
                t = (
                    torch.frombuffer(bytearray(raw), dtype=torch.uint8)
                    if size
                    else torch.empty(0, dtype=torch.uint8)
                )
                t = t.view(_TORCH_DTYPES[dtype])
                if t.numel() != int(np.prod(shape, dtype=np.int64)):
                    raise StateFormatError(f"a tensor's size does not match its shape in a {kind!r} state")
                return t.reshape(shape)
            if _ND in o:
                dtype, shape, start, size = o[_ND]
                if dtype not in _ALLOWED_DTYPES:
                    raise StateFormatError(f"corrupt array in a {kind!r} state")
                a = np.frombuffer(span(start, size), dtype=np.dtype(dtype))
                if a.size != int(np.prod(shape, dtype=np.int64)):
                    raise StateFormatError(f"an array's size does not match its shape in a {kind!r} state")
                return a.reshape(shape).copy()
            if _BY in o:
                return bytes(span(*o[_BY]))
            return {k: dec(v) for k, v in o.items()}
        if isinstance(o, list):
            return [dec(v) for v in o]
        return o

    return dec(header["body"])


def _header(data: bytes) -> tuple[dict, memoryview]:
    if len(data) < 8 or data[:4] != MAGIC:
        if data.startswith(_PRE_CODEC):
            raise UnsupportedStateVersion(
                "a state written before the versioned state codec (an older release's snapshot): "
                "start the stream's state afresh, or run the release that wrote it"
            )
        raise StateFormatError("not a streamvqa state blob (bad magic)")
    (hlen,) = struct.unpack("<I", data[4:8])
    if 8 + hlen > len(data):
        raise StateFormatError("truncated state blob (header)")
    try:
        header = json.loads(data[8 : 8 + hlen])
    except ValueError as exc:
        raise StateFormatError(f"corrupt state header: {exc}") from None
    if (
        not isinstance(header, dict)
        or not isinstance(header.get("kind"), str)
        or not isinstance(header.get("version"), int)
        or "body" not in header
    ):
        raise StateFormatError("corrupt state header (no kind, version or body)")
    return header, memoryview(data)[8 + hlen :]


__all__ = ["MAGIC", "StateFormatError", "UnsupportedStateVersion", "kind_of", "pack", "unpack"]
