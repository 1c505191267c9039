"""Tiered KV-cache block store: GPU -> CPU -> local disk -> object storage.

- :mod:`.block`: :class:`KVBlock` (per-layer keys/values, positions, time range, mean keys)
  and :class:`BlockSummary` (what retrieval scores), with the content hash.
- :mod:`.codec`: block <-> bytes (safetensors layout), verified decoding.
- :mod:`.keys`: :class:`BlockKey`, ``streams/<stream>/kv/<model>/<index>-<hash16>``.
- :mod:`.tier` and the tiers: :class:`MemoryTier` (``gpu_tier``/``cpu_tier``),
  :class:`DiskTier`, :class:`ObjectTier`.
- :mod:`.store`: :class:`TieredStore` (budgets, LRU, write-behind, prefetch, promotion).

See docs/kv-store.md.
"""

from .block import BlockSummary, KVBlock
from .codec import EncodedBlock, decode_block, decode_summary, encode_block, encode_summary, verify_block
from .disk_tier import DiskTier
from .errors import (
    BackpressureTimeout,
    BlockCorrupt,
    BlockMismatch,
    BlockNotFound,
    KVStoreError,
    StoreClosed,
    WriteBehindError,
)
from .keys import BlockKey, kv_prefix, model_id_from_slug, model_slug
from .memory_tier import MemoryTier, cpu_tier, gpu_tier
from .object_tier import ObjectTier
from .store import TieredStore, standard_store
from .tier import ByteTier, Tier

__all__ = [
    "BackpressureTimeout",
    "BlockCorrupt",
    "BlockKey",
    "BlockMismatch",
    "BlockNotFound",
    "BlockSummary",
    "ByteTier",
    "DiskTier",
    "EncodedBlock",
    "KVBlock",
    "KVStoreError",
    "MemoryTier",
    "ObjectTier",
    "StoreClosed",
    "Tier",
    "TieredStore",
    "WriteBehindError",
    "cpu_tier",
    "decode_block",
    "decode_summary",
    "encode_block",
    "encode_summary",
    "gpu_tier",
    "kv_prefix",
    "model_id_from_slug",
    "model_slug",
    "standard_store",
    "verify_block",
]
