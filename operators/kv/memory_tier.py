"""Memory tiers: blocks as tensors on a device ("gpu": CUDA when there is one) or in host
memory ("cpu": pinned when CUDA is present, so copies to the GPU run at full speed)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import torch

from .block import BlockSummary, KVBlock
from .codec import EncodedBlock, decode_block
from .errors import BlockMismatch, BlockNotFound
from .keys import BlockKey
from .tier import Item, Tier


class MemoryTier(Tier):
    """Blocks held as tensors on ``device``. Accounts ``KVBlock.nbytes`` per block."""

    persistent = False

    def __init__(self, name: str, device: torch.device | str, *, pin_memory: bool = False) -> None:
        self.name = name
        self.device = torch.device(device)
        if pin_memory and (self.device.type != "cpu" or not torch.cuda.is_available()):
            raise ValueError("pinned memory needs a CPU tier and CUDA")
        self.pin_memory = bool(pin_memory)
        self._blocks: dict[BlockKey, KVBlock] = {}
        self._nbytes = 0
        self._lock = threading.Lock()

    def prepare(self, item: Item) -> KVBlock:
        block = decode_block(item.data, item.key) if isinstance(item, EncodedBlock) else item
        return block.to(self.device, pin_memory=self.pin_memory)

    def footprint(self, item: Item) -> int:
        return item.nbytes if isinstance(item, KVBlock) else self.prepare(item).nbytes

    def put(self, key: BlockKey, item: Item) -> int:
        block = self.prepare(item)
        if block.key() != key:
            raise BlockMismatch(f"{self.name}: refusing to store block {block.key()} under {key}")
        with self._lock:
            old = self._blocks.get(key)
            self._blocks[key] = block
            self._nbytes += block.nbytes - (old.nbytes if old is not None else 0)
        return block.nbytes

    def get(self, key: BlockKey) -> KVBlock:
        with self._lock:
            block = self._blocks.get(key)
        if block is None:
            raise BlockNotFound(f"{self.name}: no block {key}")
        if block.key() != key:  # cannot happen through put(); checked all the same
            raise BlockMismatch(f"{self.name}: holds {block.key()} under {key}")
        return block

    def get_summary(self, key: BlockKey) -> BlockSummary:
        return self.get(key).summary()

    def contains(self, key: BlockKey) -> bool:
        with self._lock:
            return key in self._blocks

    def delete(self, key: BlockKey) -> int:
        with self._lock:
            block = self._blocks.pop(key, None)
            if block is None:
                return 0
            self._nbytes -= block.nbytes
            return block.nbytes

    def keys(self, stream_id: str | None = None, model_id: str | None = None) -> Iterator[BlockKey]:
        with self._lock:
            keys = list(self._blocks)
        for key in keys:
            if (stream_id is None or key.stream_id == stream_id) and (
                model_id is None or key.model_id == model_id
            ):
                yield key

    def scan(self) -> list[tuple[BlockKey, int]]:
        with self._lock:
            return [(key, block.nbytes) for key, block in self._blocks.items()]

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._nbytes

    def __len__(self) -> int:
        with self._lock:
            return len(self._blocks)


def gpu_tier(name: str = "gpu", device: torch.device | str | None = None) -> MemoryTier:
    """The device tier: CUDA when available, else host memory (so everything runs without a GPU)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return MemoryTier(name, device)


def cpu_tier(name: str = "cpu", pin_memory: bool | None = None) -> MemoryTier:
    """The host tier, pinned when CUDA is available (unless told otherwise)."""
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    return MemoryTier(name, "cpu", pin_memory=pin_memory)
