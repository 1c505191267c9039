"""The KV block value type and its content hash.

A :class:`KVBlock` is one slice of a stream's KV cache (one frame, or N tokens) for
every layer: keys ``(layers, kv_heads, tokens, head_dim)`` and values
``(layers, kv_heads, tokens, v_head_dim)`` in one dtype (float32, float16,
bfloat16, float64 or float8), the token positions, the time range it covers and
the per-layer mean key ``(layers, kv_heads, head_dim)`` in float32, the ReKV block
representative (the retrieval stage expands GQA heads as it needs).

Its content hash is SHA-256 over a canonical header (every metadata field, the
dtype and shape of every tensor) followed by the raw tensor bytes in name order.
It does not depend on the serialised layout, it changes when any bit of any
tensor or any field changes, and its first 16 hex digits are in the block's key.

Blocks are immutable values: the store hands out the tensors it holds, so treat
them as read-only. Construction copies a tensor only when it is a view into a
larger storage (a slice of a live cache), so a block never pins more memory than
its :attr:`KVBlock.nbytes` and the store's byte accounting is exact.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import cast

import torch

from streamvqa.storage.keys import stream_prefix

from .keys import BlockKey, validate_model_id

BLOCK_FORMAT = "streamvqa.kv.block/1"
SUMMARY_FORMAT = "streamvqa.kv.summary/1"

# torch dtype <-> safetensors dtype name (the serialised form uses these names).
DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.int64: "I64",
}
DTYPES_BY_NAME = {name: dtype for dtype, name in DTYPE_NAMES.items()}
KV_DTYPES = frozenset(
    {torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2}
)
MAX_ATTRS_BYTES = 16 * 1024
_ATTR_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a tensor, without a copy when it is a compact CPU tensor."""
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    tensor = tensor.contiguous()
    # the ignore: numpy declares ndarray.__buffer__ for Python 3.12+ only
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]


def content_digest(
    fields: Mapping[str, str], tensors: Mapping[str, tuple[str, Sequence[int], bytes | memoryview]]
) -> str:
    """SHA-256 hex of a canonical header plus tensor bytes.

    ``tensors`` maps a name to ``(safetensors dtype name, shape, bytes-like)``; the codec
    feeds it raw slices of serialised bytes and a block feeds it its tensors, so both
    sides compute the same value without materialising anything.
    """
    header = {
        "fields": dict(fields),
        "tensors": {name: [dtype, [int(d) for d in shape]] for name, (dtype, shape, _) in tensors.items()},
    }
    h = hashlib.sha256(json.dumps(header, sort_keys=True, separators=(",", ":")).encode())
    h.update(b"\n")
    for name in sorted(tensors):
        h.update(tensors[name][2])
    return h.hexdigest()


def _compact(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` if it owns exactly its bytes, else a compact copy (never pins a larger cache)."""
    tensor = tensor.detach()
    if (
        tensor.is_contiguous()
        and tensor.storage_offset() == 0
        and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    ):
        return tensor
    return tensor.contiguous().clone()


def _check_int(name: str, value: object, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def _check_attrs(attrs: Mapping[str, str]) -> dict[str, str]:
    out = {}
    for key, value in attrs.items():
        if not isinstance(key, str) or not _ATTR_KEY_RE.match(key) or not isinstance(value, str):
            raise ValueError(f"attrs must map names ([A-Za-z0-9._-], <= 64) to str, got {key!r}: {value!r}")
        out[key] = value
    if len(json.dumps(out, sort_keys=True).encode()) > MAX_ATTRS_BYTES:
        raise ValueError(f"attrs larger than {MAX_ATTRS_BYTES} bytes")
    return out


@dataclass(frozen=True, eq=False)
class KVBlock:
    """Keys and values of every layer for one run of tokens of one stream."""

    model_id: str
    stream_id: str
    block_index: int
    start_us: int
    end_us: int
    positions: torch.Tensor  # (tokens,) int64: the positions the tokens had when encoded
    keys: torch.Tensor  # (layers, kv_heads, tokens, head_dim)
    values: torch.Tensor  # (layers, kv_heads, tokens, v_head_dim)
    mean_keys: torch.Tensor | None = None  # (layers, kv_heads, head_dim) float32; computed when None
    attrs: Mapping[str, str] = field(default_factory=dict)  # free-form, hashed (e.g. {"rope": "pre"})
    _digest: str | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        validate_model_id(self.model_id)
        stream_prefix(self.stream_id)
        _check_int("block_index", self.block_index)
        _check_int("start_us", self.start_us)
        _check_int("end_us", self.end_us)
        if self.end_us < self.start_us:
            raise ValueError(f"end_us {self.end_us} < start_us {self.start_us}")
        keys, values = self.keys, self.values
        if not isinstance(keys, torch.Tensor) or not isinstance(values, torch.Tensor):
            raise TypeError("keys and values must be torch tensors")
        if keys.dim() != 4 or values.dim() != 4:
            raise ValueError(
                f"keys and values must be (layers, kv_heads, tokens, head_dim), got {tuple(keys.shape)} "
                f"and {tuple(values.shape)}"
            )
        if keys.shape[:3] != values.shape[:3]:
            raise ValueError(
                f"keys {tuple(keys.shape)} and values {tuple(values.shape)} disagree on layers/heads/tokens"
            )
        if min(keys.shape) < 1 or min(values.shape) < 1:
            raise ValueError(f"empty block: keys {tuple(keys.shape)}, values {tuple(values.shape)}")
        if keys.dtype not in KV_DTYPES or values.dtype != keys.dtype:
            raise ValueError(
                f"keys/values dtype must be one of {sorted(map(str, KV_DTYPES))} and equal, got {keys.dtype}/{values.dtype}"
            )
        if keys.device != values.device:
            raise ValueError(f"keys on {keys.device}, values on {values.device}")
        positions = self.positions
        if not isinstance(positions, torch.Tensor):
            positions = torch.as_tensor(list(positions), dtype=torch.int64)
        if positions.dtype != torch.int64 or positions.shape != (keys.shape[2],):
            raise ValueError(
                f"positions must be int64 of shape ({keys.shape[2]},), got {positions.dtype} {tuple(positions.shape)}"
            )
        mean_keys = self.mean_keys
        if mean_keys is None:
            mean_keys = keys.float().mean(dim=2)
        expected = (keys.shape[0], keys.shape[1], keys.shape[3])
        if (
            not isinstance(mean_keys, torch.Tensor)
            or mean_keys.dtype != torch.float32
            or tuple(mean_keys.shape) != expected
        ):
            raise ValueError(f"mean_keys must be float32 of shape {expected}")
        object.__setattr__(self, "keys", _compact(keys))
        object.__setattr__(self, "values", _compact(values))
        object.__setattr__(self, "positions", _compact(positions.to(keys.device)))
        object.__setattr__(self, "mean_keys", _compact(mean_keys.to(keys.device)))
        object.__setattr__(self, "attrs", _check_attrs(self.attrs))

    @classmethod
    def from_layers(
        cls,
        layer_keys: Sequence[torch.Tensor],
        layer_values: Sequence[torch.Tensor],
        **meta,
    ) -> KVBlock:
        """A block from per-layer ``(kv_heads, tokens, head_dim)`` tensors (one copy: the stack)."""
        if len(layer_keys) != len(layer_values) or not layer_keys:
            raise ValueError("need the same, non-zero number of key and value layers")
        return cls(keys=torch.stack(list(layer_keys)), values=torch.stack(list(layer_values)), **meta)

    # -- shape ---------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.keys.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.keys.shape[1]

    @property
    def num_tokens(self) -> int:
        return self.keys.shape[2]

    @property
    def head_dim(self) -> int:
        return self.keys.shape[3]

    @property
    def dtype(self) -> torch.dtype:
        return self.keys.dtype

    @property
    def device(self) -> torch.device:
        return self.keys.device

    @property
    def nbytes(self) -> int:
        """Bytes of tensor memory the block holds (what a memory tier accounts for it)."""
        return sum(
            t.numel() * t.element_size()
            for t in (self.keys, self.values, cast(torch.Tensor, self.mean_keys), self.positions)
        )

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(keys, values)`` of one layer, each ``(kv_heads, tokens, dim)``."""
        return self.keys[index], self.values[index]

    # -- identity ------------------------------------------------------------
    def fields(self) -> dict[str, str]:
        """The hashed metadata fields (the serialised header carries exactly these)."""
        return {
            "format": BLOCK_FORMAT,
            "model_id": self.model_id,
            "stream_id": self.stream_id,
            "block_index": str(self.block_index),
            "start_us": str(self.start_us),
            "end_us": str(self.end_us),
            "attrs": json.dumps(self.attrs, sort_keys=True, separators=(",", ":")),
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "keys": self.keys,
            "values": self.values,
            "mean_keys": cast(torch.Tensor, self.mean_keys),  # set by __post_init__
            "positions": self.positions,
        }

    def content_hash(self) -> str:
        """SHA-256 hex of the block's content (cached; copies device tensors to the host once)."""
        if self._digest is None:
            described = {
                name: (DTYPE_NAMES[t.dtype], tuple(t.shape), tensor_bytes(t))
                for name, t in self.tensors().items()
            }
            object.__setattr__(self, "_digest", content_digest(self.fields(), described))
        return self._digest  # type: ignore[return-value]

    def key(self) -> BlockKey:
        return BlockKey(self.stream_id, self.model_id, self.block_index, self.content_hash()[:16])

    def summary(self) -> BlockSummary:
        """The small part retrieval scores (no copy: shares ``mean_keys``)."""
        positions = self.positions
        return BlockSummary(
            key=self.key(),
            start_us=self.start_us,
            end_us=self.end_us,
            num_tokens=self.num_tokens,
            first_position=int(positions[0]),
            last_position=int(positions[-1]),
            mean_keys=cast(torch.Tensor, self.mean_keys),  # set by __post_init__
            attrs=dict(self.attrs),
            block_hash=self.content_hash(),
        )

    # -- movement ------------------------------------------------------------
    def to(self, device: torch.device | str, *, pin_memory: bool = False) -> KVBlock:
        """The same block on ``device`` (this block when nothing has to move)."""
        device = torch.device(device)
        tensors = self.tensors()
        same = all(t.device == device for t in tensors.values())
        if same and (not pin_memory or all(t.is_pinned() for t in tensors.values())):
            return self
        if device.type == "cpu" and pin_memory:
            moved = {}
            for name, t in tensors.items():
                target = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
                target.copy_(t)
                moved[name] = target
        else:
            moved = {name: t.to(device) for name, t in tensors.items()}
        block = KVBlock(
            model_id=self.model_id,
            stream_id=self.stream_id,
            block_index=self.block_index,
            start_us=self.start_us,
            end_us=self.end_us,
            positions=moved["positions"],
            keys=moved["keys"],
            values=moved["values"],
            mean_keys=moved["mean_keys"],
            attrs=self.attrs,
        )
        object.__setattr__(block, "_digest", self._digest)  # same content
        return block

    def equal(self, other: KVBlock) -> bool:
        """Bit-exact equality of every field and tensor (NaNs compare by their bits)."""
        if self.fields() != other.fields():
            return False
        mine, theirs = self.tensors(), other.tensors()
        return all(
            mine[n].dtype == theirs[n].dtype
            and mine[n].shape == theirs[n].shape
            and bytes(tensor_bytes(mine[n])) == bytes(tensor_bytes(theirs[n]))
            for n in mine
        )


@dataclass(frozen=True, eq=False)
class BlockSummary:
    """What retrieval needs to score a block without fetching it."""

    key: BlockKey
    start_us: int
    end_us: int
    num_tokens: int
    first_position: int
    last_position: int
    mean_keys: torch.Tensor  # (layers, kv_heads, head_dim) float32
    attrs: Mapping[str, str]
    block_hash: str  # the block's full content hash

    @property
    def block_index(self) -> int:
        return self.key.block_index

    def fields(self) -> dict[str, str]:
        return {
            "format": SUMMARY_FORMAT,
            "model_id": self.key.model_id,
            "stream_id": self.key.stream_id,
            "block_index": str(self.key.block_index),
            "start_us": str(self.start_us),
            "end_us": str(self.end_us),
            "num_tokens": str(self.num_tokens),
            "first_position": str(self.first_position),
            "last_position": str(self.last_position),
            "attrs": json.dumps(dict(self.attrs), sort_keys=True, separators=(",", ":")),
            "block_hash": self.block_hash,
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"mean_keys": self.mean_keys}
