"""One interface for every tier: put / get / contains / delete / keys, with byte accounting.

A tier holds each block in its native form: a memory tier holds a :class:`KVBlock`
(tensors on its device), a byte tier (disk, object store) holds the encoded block
and its summary sidecar. ``prepare`` converts a block to that form *before* it is
stored, so the store can reserve exactly ``footprint`` bytes of the tier's budget
first and never account an estimate.

Every read checks what it returns against the key it was asked for (content hash,
stream, model, index): a tier raises :class:`BlockNotFound`, :class:`BlockCorrupt`
or :class:`BlockMismatch`, never wrong data.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator

from .block import BlockSummary, KVBlock
from .codec import EncodedBlock, decode_block, decode_summary, encode_block, encode_summary, verify_block
from .errors import BlockMismatch, BlockNotFound
from .keys import SUMMARY_SUFFIX, BlockKey, kv_prefix

Item = KVBlock | EncodedBlock


class Tier(ABC):
    """A place blocks can live. Implementations are thread-safe."""

    name: str
    persistent: bool  # does it outlive the process?

    @abstractmethod
    def prepare(self, item: Item) -> Item:
        """``item`` in the form this tier stores (may copy to a device or encode)."""

    @abstractmethod
    def footprint(self, item: Item) -> int:
        """Bytes ``put(prepare(item))`` will account."""

    @abstractmethod
    def put(self, key: BlockKey, item: Item) -> int:
        """Store ``item`` under ``key`` (replacing any copy); returns the bytes accounted."""

    @abstractmethod
    def get(self, key: BlockKey) -> KVBlock:
        """The block, verified against ``key``."""

    @abstractmethod
    def get_summary(self, key: BlockKey) -> BlockSummary:
        """The block's summary (metadata and mean keys) without fetching the block when possible."""

    @abstractmethod
    def contains(self, key: BlockKey) -> bool: ...

    @abstractmethod
    def delete(self, key: BlockKey) -> int:
        """Remove the block; returns the bytes freed (0 when it was not there)."""

    @abstractmethod
    def keys(self, stream_id: str | None = None, model_id: str | None = None) -> Iterator[BlockKey]:
        """Keys held, optionally of one stream (and model)."""

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Bytes the tier accounts for right now."""

    def scan(self) -> list[tuple[BlockKey, int]]:
        """``(key, bytes)`` of what the tier already holds, least recently written first."""
        return []

    def get_encoded(self, key: BlockKey) -> EncodedBlock:
        """The block as bytes (byte tiers return what they hold, verified)."""
        block = self.get(key)
        return encode_block(block)

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (nothing by default)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class ByteTier(Tier):
    """A tier that stores encoded bytes under paths: the block and its ``.mean`` summary."""

    persistent = True

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._nbytes = 0

    # primitives ----------------------------------------------------------------
    @abstractmethod
    def _write(self, path: str, data: bytes) -> int:
        """Write atomically (readers see the old object or the new one); returns the bytes replaced."""

    @abstractmethod
    def _read(self, path: str) -> bytes:
        """The bytes under ``path``; raises BlockNotFound."""

    @abstractmethod
    def _exists(self, path: str) -> bool: ...

    @abstractmethod
    def _remove(self, path: str) -> int:
        """Remove ``path``; returns its size (0 when missing)."""

    @abstractmethod
    def _list(self, prefix: str) -> Iterator[tuple[str, int]]:
        """``(path, size)`` of everything under ``prefix``."""

    # the interface ---------------------------------------------------------------
    def _where(self, path: str) -> str:
        return f"{self.name}:{path}"

    def prepare(self, item: Item) -> EncodedBlock:
        return item if isinstance(item, EncodedBlock) else encode_block(item)

    def footprint(self, item: Item) -> int:
        return self.prepare(item).nbytes

    def put(self, key: BlockKey, item: Item) -> int:
        encoded = self.prepare(item)
        if encoded.key != key:
            raise BlockMismatch(f"{self._where(key.path)}: refusing to store block {encoded.key} under {key}")
        # Block first, summary second: a summary never exists without its complete block.
        replaced = self._write(key.path, encoded.data)
        replaced += self._write(key.summary_path, encoded.summary)
        with self._lock:
            self._nbytes += encoded.nbytes - replaced
        return encoded.nbytes

    def get(self, key: BlockKey) -> KVBlock:
        return decode_block(self._read(key.path), key, where=self._where(key.path))

    def get_encoded(self, key: BlockKey) -> EncodedBlock:
        data = self._read(key.path)
        verify_block(data, key, where=self._where(key.path))
        try:
            summary = self._read(key.summary_path)
            decode_summary(summary, key, where=self._where(key.summary_path))
        except BlockNotFound:  # a crash between the two writes: rebuild it from the block
            summary = encode_summary(decode_block(data, key, where=self._where(key.path)).summary())
        return EncodedBlock(key, data, summary)

    def get_summary(self, key: BlockKey) -> BlockSummary:
        try:
            return decode_summary(self._read(key.summary_path), key, where=self._where(key.summary_path))
        except BlockNotFound:
            if not self._exists(key.path):
                raise
            return self.get(key).summary()

    def contains(self, key: BlockKey) -> bool:
        return self._exists(key.path)

    def delete(self, key: BlockKey) -> int:
        # Summary first: a summary never outlives its block.
        freed = self._remove(key.summary_path) + self._remove(key.path)
        with self._lock:
            self._nbytes = max(0, self._nbytes - freed)  # the object tier may delete older runs' blocks
        return freed

    def keys(self, stream_id: str | None = None, model_id: str | None = None) -> Iterator[BlockKey]:
        if stream_id is None and model_id is not None:
            raise ValueError("give a stream id with a model id")
        prefix = "streams/" if stream_id is None else kv_prefix(stream_id, model_id)
        for path, _ in self._list(prefix):
            if path.endswith(SUMMARY_SUFFIX):
                continue
            try:
                yield BlockKey.parse(path)
            except ValueError:
                continue  # not a KV block (another kind of object under the stream)

    def scan(self) -> list[tuple[BlockKey, int]]:
        sizes: dict[str, int] = {}
        for path, size in self._list("streams/"):
            sizes[path] = size
        out = []
        for path, size in sizes.items():
            if path.endswith(SUMMARY_SUFFIX):
                continue
            try:
                key = BlockKey.parse(path)
            except ValueError:
                continue
            out.append((key, size + sizes.get(key.summary_path, 0)))
        return out

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._nbytes
