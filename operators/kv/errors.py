"""Typed errors of the KV block store. Every "do not use these bytes" case is a BlockCorrupt."""

from __future__ import annotations


class KVStoreError(Exception):
    """Base of every error the KV block store raises."""


class BlockNotFound(KVStoreError, KeyError):
    """No tier holds a block under that key."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable
        return str(self.args[0]) if self.args else "block not found"


class BlockCorrupt(KVStoreError, ValueError):
    """Stored bytes are not a valid block: truncated, bit-flipped, foreign format, bad checksum."""


class BlockMismatch(BlockCorrupt):
    """A valid block that does not belong to the key it was read under (other stream, model,
    index or content hash): a swapped or crafted object. Never returned."""


class WriteBehindError(KVStoreError):
    """A background write (demotion, prefetch, sync) failed; the block stayed where it was."""


class BackpressureTimeout(KVStoreError, TimeoutError):
    """A tier stayed full longer than the store's backpressure timeout."""


class StoreClosed(KVStoreError):
    """The store was closed."""
