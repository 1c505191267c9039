"""Block <-> bytes, separate from storage. The bytes are a standard safetensors file.

Layout (safetensors): ``u64 LE header length | JSON header | tensor data``. The header's
``__metadata__`` holds the block's fields (:meth:`KVBlock.fields`) plus ``checksum``,
the content hash (:func:`.block.content_digest`); the tensors are ``keys``,
``values``, ``mean_keys`` and ``positions`` with their dtype kept (bfloat16 stays
``BF16``), so any safetensors reader (``safetensors.safe_open``) opens a stored
block, and a round trip is bit-exact. A summary (the ``.mean`` sidecar) is the same
format with only ``mean_keys`` and the summary fields.

Writing and reading are implemented here (one copy each way), so the store does not
depend on the ``safetensors`` package at run time; the tests check compatibility
with it. Decoding trusts nothing: the header is bounded and validated, the tensor
extents must tile the data exactly, the checksum is recomputed over the header
fields and the raw bytes, and the block must match the key it was read under.
Any failure raises :class:`BlockCorrupt` (:class:`BlockMismatch` for a valid block
under the wrong key); nothing partially decoded is ever returned.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from .block import (
    BLOCK_FORMAT,
    DTYPE_NAMES,
    DTYPES_BY_NAME,
    SUMMARY_FORMAT,
    BlockSummary,
    KVBlock,
    content_digest,
    tensor_bytes,
)
from .errors import BlockCorrupt, BlockMismatch
from .keys import BlockKey

MAX_HEADER_BYTES = 1 << 20
_BLOCK_TENSORS = frozenset({"keys", "values", "mean_keys", "positions"})
_BLOCK_FIELDS = frozenset({"format", "model_id", "stream_id", "block_index", "start_us", "end_us", "attrs"})
_SUMMARY_TENSORS = frozenset({"mean_keys"})
_SUMMARY_FIELDS = _BLOCK_FIELDS | {"num_tokens", "first_position", "last_position", "block_hash"}
_ITEMSIZE = {name: torch.empty(0, dtype=dtype).element_size() for name, dtype in DTYPES_BY_NAME.items()}


@dataclass(frozen=True)
class EncodedBlock:
    """A block serialised for a byte tier: the block file and its summary sidecar."""

    key: BlockKey
    data: bytes
    summary: bytes

    @property
    def nbytes(self) -> int:
        return len(self.data) + len(self.summary)


# -- writing -------------------------------------------------------------------
def _serialise(metadata: Mapping[str, str], tensors: Mapping[str, torch.Tensor]) -> bytes:
    # Widest dtype first: with the header padded to 8 bytes every tensor starts aligned.
    order = sorted(tensors, key=lambda name: (-tensors[name].element_size(), name))
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    buffers = []
    offset = 0
    for name in order:
        raw = tensor_bytes(tensors[name])
        header[name] = {
            "dtype": DTYPE_NAMES[tensors[name].dtype],
            "shape": list(tensors[name].shape),
            "data_offsets": [offset, offset + raw.nbytes],
        }
        buffers.append(raw)
        offset += raw.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return b"".join([struct.pack("<Q", len(text)), text, *buffers])  # one copy of the tensor bytes


def encode_summary(summary: BlockSummary) -> bytes:
    described = {
        name: (DTYPE_NAMES[t.dtype], tuple(t.shape), tensor_bytes(t)) for name, t in summary.tensors().items()
    }
    fields = summary.fields()
    return _serialise({**fields, "checksum": content_digest(fields, described)}, summary.tensors())


def encode_block(block: KVBlock) -> EncodedBlock:
    """The block's bytes and its summary's bytes (device tensors are copied to the host once)."""
    host = block.to("cpu")
    data = _serialise({**host.fields(), "checksum": host.content_hash()}, host.tensors())
    return EncodedBlock(host.key(), data, encode_summary(host.summary()))


# -- reading -------------------------------------------------------------------
@dataclass(frozen=True)
class _Parsed:
    fields: dict[str, str]
    checksum: str
    entries: dict[str, tuple[str, tuple[int, ...], memoryview]]  # name -> (dtype name, shape, raw bytes)


def _fail(where: str, message: str) -> BlockCorrupt:
    return BlockCorrupt(f"{where}: {message}")


def _parse(data: bytes, fmt: str, names: frozenset[str], field_names: frozenset[str], where: str) -> _Parsed:
    view = memoryview(data)
    if view.nbytes < 8:
        raise _fail(where, f"truncated: {view.nbytes} bytes, not even the 8-byte header length")
    (header_len,) = struct.unpack("<Q", view[:8])
    if header_len > MAX_HEADER_BYTES:
        raise _fail(where, f"header length {header_len} is over {MAX_HEADER_BYTES} (not a block, or corrupt)")
    if 8 + header_len > view.nbytes:
        raise _fail(where, f"truncated: header of {header_len} bytes, only {view.nbytes - 8} present")
    try:
        header = json.loads(bytes(view[8 : 8 + header_len]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise _fail(where, f"unreadable header ({err})") from None
    if not isinstance(header, dict):
        raise _fail(where, "header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _fail(where, "header has no string metadata")
    if metadata.get("format") != fmt:
        raise _fail(where, f"format is {metadata.get('format')!r}, expected {fmt!r}")
    checksum = metadata.pop("checksum", None)
    if not isinstance(checksum, str) or len(checksum) != 64:
        raise _fail(where, "header has no checksum")
    if set(metadata) != field_names:
        raise _fail(where, f"header fields {sorted(metadata)} differ from {sorted(field_names)}")
    if set(header) != names:
        raise _fail(where, f"tensors {sorted(header)} differ from {sorted(names)}")
    body = view[8 + header_len :]
    extents = []
    entries = {}
    for name, spec in header.items():
        try:
            dtype = spec["dtype"]
            shape = tuple(spec["shape"])
            begin, end = spec["data_offsets"]
            if dtype not in _ITEMSIZE or not all(isinstance(d, int) and d >= 0 for d in shape):
                raise ValueError("bad dtype or shape")
            if not (isinstance(begin, int) and isinstance(end, int)):
                raise ValueError("bad offsets")
        except (KeyError, TypeError, ValueError) as err:
            raise _fail(where, f"bad tensor entry {name!r} ({err})") from None
        if end - begin != math.prod(shape) * _ITEMSIZE[dtype] or begin < 0:
            raise _fail(where, f"tensor {name!r} extent [{begin}, {end}) does not match {dtype}{list(shape)}")
        extents.append((begin, end))
        entries[name] = (dtype, shape, body[begin:end])
    position = 0
    for begin, end in sorted(extents):
        if begin != position:
            raise _fail(where, "tensor extents overlap or leave holes")
        position = end
    if position > body.nbytes:
        raise _fail(where, f"truncated: tensor data needs {position} bytes, only {body.nbytes} present")
    if position != body.nbytes:
        raise _fail(where, f"{body.nbytes - position} unexpected trailing bytes")
    actual = content_digest(metadata, entries)
    if actual != checksum:
        raise _fail(
            where,
            f"content hash mismatch (computed {actual[:16]}, header says {checksum[:16]}): corrupt bytes",
        )
    return _Parsed(metadata, checksum, entries)


def _check_key(where: str, fields: Mapping[str, str], content_hash: str, expected: BlockKey | None) -> None:
    if expected is None:
        return
    found = (fields["stream_id"], fields["model_id"], fields["block_index"], content_hash[:16])
    wanted = (expected.stream_id, expected.model_id, str(expected.block_index), expected.hash16)
    if found != wanted:
        raise BlockMismatch(
            f"{where}: holds block {found[2]} of stream {found[0]!r}, model {found[1]!r}, hash {found[3]}; "
            f"refusing it for stream {wanted[0]!r}, model {wanted[1]!r}, block {wanted[2]}, hash {wanted[3]}"
        )


def _tensor(entry: tuple[str, tuple[int, ...], memoryview]) -> torch.Tensor:
    dtype_name, shape, raw = entry
    array = np.frombuffer(raw, dtype=np.uint8).copy()  # the one copy: owned, aligned, writable
    return torch.from_numpy(array).view(DTYPES_BY_NAME[dtype_name]).reshape(shape)


def _int(where: str, fields: Mapping[str, str], name: str) -> int:
    try:
        return int(fields[name])
    except ValueError:
        raise _fail(where, f"field {name}={fields[name]!r} is not an int") from None


def verify_block(data: bytes, expected: BlockKey | None = None, *, where: str = "KV block") -> str:
    """Check ``data`` is a valid block (of ``expected``) without building tensors; returns its hash."""
    parsed = _parse(data, BLOCK_FORMAT, _BLOCK_TENSORS, _BLOCK_FIELDS, where)
    _check_key(where, parsed.fields, parsed.checksum, expected)
    return parsed.checksum


def decode_block(data: bytes, expected: BlockKey | None = None, *, where: str = "KV block") -> KVBlock:
    """The block in ``data`` (CPU tensors); BlockCorrupt/BlockMismatch when it is not valid."""
    parsed = _parse(data, BLOCK_FORMAT, _BLOCK_TENSORS, _BLOCK_FIELDS, where)
    _check_key(where, parsed.fields, parsed.checksum, expected)
    f = parsed.fields
    try:
        block = KVBlock(
            model_id=f["model_id"],
            stream_id=f["stream_id"],
            block_index=_int(where, f, "block_index"),
            start_us=_int(where, f, "start_us"),
            end_us=_int(where, f, "end_us"),
            positions=_tensor(parsed.entries["positions"]),
            keys=_tensor(parsed.entries["keys"]),
            values=_tensor(parsed.entries["values"]),
            mean_keys=_tensor(parsed.entries["mean_keys"]),
            attrs=json.loads(f["attrs"]),
        )
    except (ValueError, TypeError, AttributeError) as err:
        if isinstance(err, BlockCorrupt):
            raise
        raise _fail(where, f"invalid block ({err})") from None
    object.__setattr__(block, "_digest", parsed.checksum)
    return block


def decode_summary(
    data: bytes, expected: BlockKey | None = None, *, where: str = "KV block summary"
) -> BlockSummary:
    parsed = _parse(data, SUMMARY_FORMAT, _SUMMARY_TENSORS, _SUMMARY_FIELDS, where)
    f = parsed.fields
    _check_key(where, f, f["block_hash"], expected)
    try:
        mean_keys = _tensor(parsed.entries["mean_keys"])
        if mean_keys.dtype != torch.float32 or mean_keys.dim() != 3:
            raise ValueError("mean_keys must be 3-d float32")
        return BlockSummary(
            key=BlockKey(f["stream_id"], f["model_id"], _int(where, f, "block_index"), f["block_hash"][:16]),
            start_us=_int(where, f, "start_us"),
            end_us=_int(where, f, "end_us"),
            num_tokens=_int(where, f, "num_tokens"),
            first_position=_int(where, f, "first_position"),
            last_position=_int(where, f, "last_position"),
            mean_keys=mean_keys,
            attrs=json.loads(f["attrs"]),
            block_hash=f["block_hash"],
        )
    except (ValueError, TypeError) as err:
        if isinstance(err, BlockCorrupt):
            raise
        raise _fail(where, f"invalid summary ({err})") from None
