"""The tiered KV block store: tiers, budgets, LRU, write-behind, prefetch, integrity.

Object-tier tests run against the real embedded SeaweedFS (``stack`` marker).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from streamvqa import connect
from streamvqa.operators.kv import (
    BackpressureTimeout,
    BlockCorrupt,
    BlockKey,
    BlockMismatch,
    BlockNotFound,
    DiskTier,
    KVBlock,
    MemoryTier,
    ObjectTier,
    StoreClosed,
    TieredStore,
    WriteBehindError,
    encode_block,
    standard_store,
)

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn]


def make_block(
    index: int,
    *,
    stream: str = "cam-1",
    dtype: torch.dtype = torch.float16,
    tokens: int = 16,
    layers: int = 2,
    heads: int = 2,
    dim: int = 8,
    seed: int = 0,
) -> KVBlock:
    g = torch.Generator().manual_seed(index * 7919 + seed)
    return KVBlock(
        model_id=MODEL,
        stream_id=stream,
        block_index=index,
        start_us=index * 1_000_000,
        end_us=index * 1_000_000 + 999_999,
        positions=torch.arange(index * tokens, (index + 1) * tokens),
        keys=torch.randn(layers, heads, tokens, dim, generator=g).to(dtype),
        values=torch.randn(layers, heads, tokens, dim, generator=g).to(dtype),
    )


def new_stream() -> str:
    return f"kvtest-{uuid.uuid4().hex[:12]}"


BLOCK_BYTES = make_block(0).nbytes


def memory_chain(gpu_blocks: int, cpu_blocks: int) -> list:
    return [
        (MemoryTier("gpu", "cpu"), gpu_blocks * BLOCK_BYTES),
        (MemoryTier("cpu", "cpu"), cpu_blocks * BLOCK_BYTES),
    ]


def check_budgets(store: TieredStore) -> None:
    for i, budget in enumerate(store.budgets[:-1]):
        assert store.accounted(i) <= budget
        assert store.tiers[i].nbytes <= budget
        assert store.peak(i) <= budget


@pytest.fixture()
def object_store(stack_settings, endpoints):
    return connect.object_store(stack_settings, endpoints)


# -- every tier on its own -------------------------------------------------------------
def _tier_round_trip(tier, stream: str) -> None:
    blocks = [make_block(i, stream=stream, dtype=dtype) for i, dtype in enumerate(DTYPES)]
    accounted = 0
    for block in blocks:
        accounted += tier.put(block.key(), block)
    assert tier.nbytes == accounted
    for block in blocks:
        key = block.key()
        assert tier.contains(key)
        back = tier.get(key)
        assert back.dtype == block.dtype and back.equal(block)
        summary = tier.get_summary(key)
        assert torch.equal(summary.mean_keys.cpu(), block.mean_keys) and summary.key == key
    assert sorted(tier.keys(stream)) == sorted(b.key() for b in blocks)
    assert sorted(tier.keys(stream, MODEL)) == sorted(b.key() for b in blocks)
    assert list(tier.keys(stream, "another/model")) == []
    for block in blocks:
        assert tier.delete(block.key()) > 0
        assert not tier.contains(block.key())
        with pytest.raises(BlockNotFound):
            tier.get(block.key())
    assert tier.delete(blocks[0].key()) == 0
    assert tier.nbytes == 0


def test_memory_tier_round_trip() -> None:
    _tier_round_trip(MemoryTier("gpu", "cpu"), "cam-1")


def test_disk_tier_round_trip(tmp_path: Path) -> None:
    _tier_round_trip(DiskTier(tmp_path / "kv", fsync=True), "cam-1")


@pytest.mark.stack
def test_object_tier_round_trip(object_store) -> None:
    _tier_round_trip(ObjectTier(object_store), new_stream())


def test_a_tier_refuses_a_block_under_someone_elses_key(tmp_path: Path) -> None:
    block = make_block(1, stream="stream-a")
    other = make_block(1, stream="stream-b").key()
    for tier in (MemoryTier("gpu", "cpu"), DiskTier(tmp_path)):
        with pytest.raises(BlockMismatch):
            tier.put(other, block)


def test_disk_tier_detects_corruption_and_truncation(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path)
    block = make_block(3)
    key = block.key()
    tier.put(key, block)
    path = tmp_path / key.path
    good = path.read_bytes()
    corrupt = bytearray(good)
    corrupt[-5] ^= 0x40
    path.write_bytes(bytes(corrupt))
    with pytest.raises(BlockCorrupt, match="content hash mismatch"):
        tier.get(key)
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(BlockCorrupt, match="truncated"):
        tier.get(key)
    path.write_bytes(good)
    assert tier.get(key).equal(block)


def test_disk_tier_refuses_a_block_of_stream_a_placed_under_stream_b(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path)
    block = make_block(3, stream="stream-a")
    key_a = block.key()
    tier.put(key_a, block)
    key_b = BlockKey("stream-b", key_a.model_id, key_a.block_index, key_a.hash16)  # crafted
    with pytest.raises(BlockNotFound):
        tier.get(key_b)
    (tmp_path / key_b.path).parent.mkdir(parents=True)
    shutil.copy(tmp_path / key_a.path, tmp_path / key_b.path)  # swapped file
    shutil.copy(tmp_path / key_a.summary_path, tmp_path / key_b.summary_path)
    with pytest.raises(BlockMismatch, match="stream-a"):
        tier.get(key_b)
    with pytest.raises(BlockMismatch):
        tier.get_summary(key_b)


def test_disk_tier_cleans_interrupted_writes_and_counts_what_it_finds(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path)
    block = make_block(1)
    size = tier.put(block.key(), block)
    leftover = (tmp_path / block.key().path).parent / ".0000000009-abc.1234.tmp"
    leftover.write_bytes(b"half a block")
    reopened = DiskTier(tmp_path)
    assert not leftover.exists()
    assert reopened.nbytes == size
    assert [k for k, _ in reopened.scan()] == [block.key()]


def test_summary_is_read_without_the_block_and_rebuilt_when_missing(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path)
    block = make_block(2)
    key = block.key()
    tier.put(key, block)
    (tmp_path / key.path).rename(tmp_path / "elsewhere")
    assert torch.equal(tier.get_summary(key).mean_keys, block.mean_keys)  # only the sidecar was read
    (tmp_path / "elsewhere").rename(tmp_path / key.path)
    (tmp_path / key.summary_path).unlink()  # a crash between the two writes
    assert torch.equal(tier.get_summary(key).mean_keys, block.mean_keys)
    assert tier.get_encoded(key).summary  # rebuilt


@pytest.mark.stack
def test_object_tier_detects_corruption_swaps_and_missing_objects(object_store) -> None:
    tier = ObjectTier(object_store)
    stream_a, stream_b = new_stream(), new_stream()
    block = make_block(5, stream=stream_a, dtype=torch.bfloat16)
    key = block.key()
    tier.put(key, block)
    good = object_store.get(key.path)
    corrupt = bytearray(good)
    corrupt[len(corrupt) // 2] ^= 0x01
    object_store.put(key.path, bytes(corrupt))
    with pytest.raises(BlockCorrupt):
        tier.get(key)
    object_store.put(key.path, good[:-1])
    with pytest.raises(BlockCorrupt, match="truncated"):
        tier.get(key)
    object_store.put(key.path, good)
    assert tier.get(key).equal(block)
    crafted = BlockKey(stream_b, key.model_id, key.block_index, key.hash16)
    with pytest.raises(BlockNotFound):
        tier.get(crafted)
    object_store.put(crafted.path, good)  # stream A's object under stream B's key
    object_store.put(crafted.summary_path, object_store.get(key.summary_path))
    with pytest.raises(BlockMismatch, match=stream_a):
        tier.get(crafted)
    with pytest.raises(BlockMismatch):
        tier.get_summary(crafted)
    object_store.delete(key.path)  # summary stays: it is still served without the block
    assert torch.equal(tier.get_summary(key).mean_keys, block.mean_keys)
    with pytest.raises(BlockNotFound):
        tier.get(key)
    tier.delete(crafted)
    tier.delete(key)
    assert list(object_store.list(f"streams/{stream_a}/")) == []


# -- the tiered store -----------------------------------------------------------------
def test_last_tier_must_be_unbounded_and_budgets_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="last tier"):
        TieredStore([(MemoryTier("gpu", "cpu"), 10)])
    with pytest.raises(ValueError, match="budget"):
        TieredStore([(MemoryTier("gpu", "cpu"), 0), (DiskTier(tmp_path), None)])
    with pytest.raises(ValueError, match="unique"):
        TieredStore([(MemoryTier("x", "cpu"), 10), (MemoryTier("x", "cpu"), None)])


def test_a_single_unbounded_tier_is_a_store(tmp_path: Path) -> None:
    for tier in (DiskTier(tmp_path), MemoryTier("cpu", "cpu")):
        with TieredStore([(tier, None)]) as store:
            keys = [store.put(make_block(i)) for i in range(3)]
            store.sync()
            assert [store.get(k).block_index for k in keys] == [0, 1, 2] and store.keys() == keys


def test_lru_picks_the_least_recently_used_block(tmp_path: Path) -> None:
    with TieredStore([*memory_chain(3, 3)[:1], (DiskTier(tmp_path), None)], high_watermark=1.0) as store:
        keys = [store.put(make_block(i)) for i in range(3)]
        store.get(keys[0], promote=False)  # 0 is now the most recent
        keys.append(store.put(make_block(3)))
        store.flush()
        assert [store.where(k) for k in keys] == [["gpu"], ["disk"], ["gpu"], ["gpu"]]
        assert store.put(make_block(2)) == keys[2]  # already held (content-addressed): only touched
        keys.append(store.put(make_block(4)))
        store.flush()
        assert store.where(keys[0]) == ["disk"] and store.where(keys[2]) == ["gpu"]
        assert store.stats()["gpu"]["puts"] == 5
        check_budgets(store)


@pytest.mark.stack
def test_demotion_chain_gpu_cpu_disk_object(tmp_path: Path, object_store) -> None:
    stream = new_stream()
    blocks = [make_block(i, stream=stream) for i in range(7)]
    disk_sizes = [encode_block(b).nbytes for b in blocks]
    disk_budget = 2 * max(disk_sizes) + min(disk_sizes) // 2  # room for exactly two blocks
    store = TieredStore(
        [*memory_chain(2, 2), (DiskTier(tmp_path), disk_budget), (ObjectTier(object_store), None)],
        high_watermark=1.0,
    )
    keys = [store.put(b) for b in blocks]
    store.flush()
    assert [store.where(k) for k in keys] == [
        ["object"],
        ["disk"],
        ["disk"],
        ["cpu"],
        ["cpu"],
        ["gpu"],
        ["gpu"],
    ]
    check_budgets(store)
    for key, block in zip(keys, blocks, strict=True):
        assert store.get(key, promote=False).equal(block)
    stats = store.stats()
    assert stats["object"]["hits"] == 1 and stats["disk"]["hits"] == 2 and stats["gpu"]["hits"] == 2
    assert store.keys(stream) == keys
    store.close()


def test_get_promotes_to_the_top_tier_and_memory_tiers_stay_exclusive(tmp_path: Path) -> None:
    store = TieredStore([*memory_chain(2, 2), (DiskTier(tmp_path), None)], high_watermark=1.0)
    keys = [store.put(make_block(i)) for i in range(6)]
    store.flush()
    assert store.where(keys[0]) == ["disk"] and store.where(keys[2]) == ["cpu"]
    block = store.get(keys[0])  # from disk
    store.flush()
    assert store.where(keys[0]) == ["gpu", "disk"]  # the persistent copy stays
    assert block.equal(make_block(0)) and block is store.tiers[0].get(keys[0])
    store.get(keys[3])  # from cpu: moves, no second memory copy
    store.flush()
    assert store.where(keys[3]) == ["gpu"]
    assert store.get(keys[1], promote=False).equal(make_block(1))
    store.flush()
    assert store.where(keys[1]) == ["disk"]
    check_budgets(store)
    store.close()


def test_promotion_off_by_default_when_configured(tmp_path: Path) -> None:
    with TieredStore([*memory_chain(1, 1), (DiskTier(tmp_path), None)], promote=False) as store:
        keys = [store.put(make_block(i)) for i in range(4)]
        store.flush()
        assert store.where(keys[0]) == ["disk"]
        assert store.get(keys[0]).equal(make_block(0))
        assert store.where(keys[0]) == ["disk"]


def test_prefetch_loads_blocks_into_the_top_tier(tmp_path: Path) -> None:
    with TieredStore([*memory_chain(4, 4), (DiskTier(tmp_path), None)], high_watermark=1.0) as store:
        keys = [store.put(make_block(i)) for i in range(10)]
        store.flush()
        assert store.where(keys[0]) == ["disk"] and store.where(keys[1]) == ["disk"]
        for future in store.prefetch(keys[:2]):
            future.result(timeout=30)
        assert store.where(keys[0])[0] == "gpu" and store.where(keys[1])[0] == "gpu"
        hits_before = store.stats()["gpu"]["hits"]
        assert store.get(keys[0]).equal(make_block(0))
        assert store.stats()["gpu"]["hits"] == hits_before + 1
        missing = make_block(99, seed=5).key()
        with pytest.raises(BlockNotFound):
            store.prefetch([missing])[0].result(timeout=30)
        store.flush()  # a failed prefetch is a hint that did not work, not a failed write
        check_budgets(store)


def test_get_many_returns_blocks_in_order(tmp_path: Path) -> None:
    with TieredStore([*memory_chain(2, 2), (DiskTier(tmp_path), None)]) as store:
        keys = [store.put(make_block(i)) for i in range(8)]
        random.Random(1).shuffle(keys)
        blocks = store.get_many(keys)
        assert [b.key() for b in blocks] == keys
        assert all(b.equal(make_block(b.block_index)) for b in blocks)


def test_get_summary_comes_from_the_fastest_copy_without_promotion(tmp_path: Path) -> None:
    with TieredStore([*memory_chain(1, 1), (DiskTier(tmp_path), None)], high_watermark=1.0) as store:
        keys = [store.put(make_block(i)) for i in range(4)]
        store.flush()
        for i, key in enumerate(keys):
            summary = store.get_summary(key)
            assert torch.equal(summary.mean_keys, make_block(i).mean_keys)
            assert (summary.start_us, summary.block_index) == (i * 1_000_000, i)
        assert store.where(keys[0]) == ["disk"]


def test_delete_removes_every_copy(tmp_path: Path) -> None:
    with TieredStore([*memory_chain(2, 2), (DiskTier(tmp_path), None)]) as store:
        keys = [store.put(make_block(i)) for i in range(6)]
        store.get(keys[0])  # now in gpu and on disk
        store.flush()
        for key in keys:
            store.delete(key)
            assert not store.contains(key) and store.where(key) == []
            with pytest.raises(BlockNotFound):
                store.get(key)
        store.flush()
        assert store.keys() == [] and store.accounted(0) == 0 and store.accounted(1) == 0


def test_keys_summaries_and_delete_stream_see_one_stream_across_tiers(tmp_path: Path) -> None:
    with TieredStore([*memory_chain(2, 2), (DiskTier(tmp_path), None)]) as store:
        a = [store.put(make_block(i, stream="stream-a")) for i in range(5)]
        b = [store.put(make_block(i, stream="stream-b")) for i in range(3)]
        store.flush()
        assert store.keys("stream-a") == a and store.keys("stream-b") == b
        assert store.keys("stream-a", MODEL) == a and store.keys("stream-a", "other") == []
        summaries = store.summaries("stream-a")
        assert [s.key for s in summaries] == a
        assert all(
            torch.equal(s.mean_keys, make_block(i, stream="stream-a").mean_keys)
            for i, s in enumerate(summaries)
        )
        assert store.delete_stream("stream-a") == 5
        assert store.keys("stream-a") == [] and store.keys("stream-b") == b


def test_a_block_of_stream_a_is_never_returned_for_stream_b(tmp_path: Path) -> None:
    with TieredStore([*memory_chain(1, 1), (DiskTier(tmp_path), None)], high_watermark=1.0) as store:
        keys = [store.put(make_block(i, stream="stream-a")) for i in range(4)]
        store.flush()
        for key in keys:  # in every tier: gpu, cpu, disk
            crafted = BlockKey("stream-b", key.model_id, key.block_index, key.hash16)
            with pytest.raises(BlockNotFound):
                store.get(crafted)
        on_disk = keys[0]
        crafted = BlockKey("stream-b", on_disk.model_id, on_disk.block_index, on_disk.hash16)
        (tmp_path / crafted.path).parent.mkdir(parents=True)
        shutil.copy(tmp_path / on_disk.path, tmp_path / crafted.path)
        for promote in (False, True):
            with pytest.raises(BlockMismatch):
                store.get(crafted, promote=promote)
        assert store.get(on_disk).stream_id == "stream-a"


def test_a_corrupt_copy_is_dropped_and_a_good_copy_served(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path / "disk")
    durable = DiskTier(tmp_path / "durable", name="durable")
    block = make_block(1)
    store = TieredStore([(disk, 10 * BLOCK_BYTES), (durable, None)], write_through=True)
    key = store.put(block)
    assert store.where(key) == ["disk", "durable"]
    path = tmp_path / "disk" / key.path
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    assert store.get(key, promote=False).equal(block)  # served from the good copy
    assert store.stats()["disk"]["corrupt"] == 1 and store.where(key) == ["durable"]
    other = durable.root / key.path
    data = bytearray(other.read_bytes())
    data[-3] ^= 0xFF
    other.write_bytes(bytes(data))
    with pytest.raises(BlockCorrupt):
        store.get(key)
    assert other.exists()  # the last tier's copy is evidence: reported, never deleted
    store.close()


@pytest.mark.stack
def test_store_refuses_corrupt_and_swapped_objects(tmp_path: Path, object_store) -> None:
    stream_a, stream_b = new_stream(), new_stream()
    with TieredStore([*memory_chain(1, 1), (ObjectTier(object_store), None)], high_watermark=1.0) as store:
        keys = [store.put(make_block(i, stream=stream_a)) for i in range(4)]
        store.flush()
        key = keys[0]
        assert store.where(key) == ["object"]
        good = object_store.get(key.path)
        bad = bytearray(good)
        bad[-1] ^= 0x01
        object_store.put(key.path, bytes(bad))
        with pytest.raises(BlockCorrupt):
            store.get(key)
        object_store.delete(key.path)
        with pytest.raises(BlockNotFound):
            store.get(key)
        crafted = BlockKey(stream_b, key.model_id, key.block_index, key.hash16)
        object_store.put(crafted.path, good)
        with pytest.raises(BlockMismatch):
            store.get(crafted)
        store.delete(crafted)


@pytest.mark.stack
def test_write_behind_finishes_on_close_and_survives_a_restart(tmp_path: Path, object_store) -> None:
    stream = new_stream()
    blocks = [make_block(i, stream=stream, dtype=torch.bfloat16) for i in range(12)]
    disk_budget = 3 * encode_block(blocks[0]).nbytes

    def open_store() -> TieredStore:
        return TieredStore(
            [*memory_chain(2, 2), (DiskTier(tmp_path), disk_budget), (ObjectTier(object_store), None)],
            demote_workers=[1, 2, 4],
        )

    store = open_store()
    keys = [store.put(b) for b in blocks]
    in_memory = [k for k in keys if set(store.where(k)) <= {"gpu", "cpu"}]
    store.close()  # no flush before: close must finish the pending writes
    with pytest.raises(StoreClosed):
        store.put(blocks[0])
    store = open_store()  # a new process would see the same: the disk tier is adopted
    survived = [k for k in keys if store.contains(k)]
    assert set(survived) | set(in_memory) == set(keys)  # only memory-resident blocks were dropped
    for key in survived:
        assert store.get(key, promote=False).equal(blocks[key.block_index])
    assert store.stats()["disk"]["blocks"] >= 1
    check_budgets(store)
    store.close()


@pytest.mark.stack
def test_close_with_sync_and_write_through_make_everything_durable(tmp_path: Path, object_store) -> None:
    stream = new_stream()
    store = TieredStore([*memory_chain(2, 2), (ObjectTier(object_store), None)])
    keys = [store.put(make_block(i, stream=stream)) for i in range(5)]
    store.close(sync=True)
    tier = ObjectTier(object_store)
    assert all(tier.get(k).equal(make_block(k.block_index, stream=stream)) for k in keys)

    stream = new_stream()
    store = TieredStore([*memory_chain(2, 2), (ObjectTier(object_store), None)], write_through=True)
    for i in range(5):
        key = store.put(make_block(i, stream=stream))
        assert tier.contains(key)  # durable as soon as put() returns
    store.flush()
    assert store.stats()["object"]["demoted_in"] == 0  # demotion did not upload them again
    store.close()


def test_sync_copies_chosen_blocks_to_the_last_tier(tmp_path: Path) -> None:
    durable = DiskTier(tmp_path)
    with TieredStore([*memory_chain(4, 4), (durable, None)]) as store:
        keys = [store.put(make_block(i)) for i in range(3)]
        store.sync(keys[:2])
        assert durable.contains(keys[0]) and durable.contains(keys[1]) and not durable.contains(keys[2])
        assert store.where(keys[0]) == ["gpu", "disk"]


# -- backpressure, failures, concurrency ------------------------------------------------
class GatedDisk(DiskTier):
    """A disk whose writes wait for a gate (a stalled or slow device)."""

    def __init__(self, root: Path, gate: threading.Event) -> None:
        super().__init__(root)
        self.gate = gate

    def _write(self, path: str, data: bytes) -> int:
        self.gate.wait()
        return super()._write(path, data)


class FailingDisk(DiskTier):
    def _write(self, path: str, data: bytes) -> int:
        raise OSError(28, "No space left on device")


def test_put_waits_while_write_behind_cannot_keep_up(tmp_path: Path) -> None:
    gate = threading.Event()
    store = TieredStore([*memory_chain(2, 2), (GatedDisk(tmp_path, gate), None)])
    done: list[BlockKey] = []
    writer = threading.Thread(target=lambda: [done.append(store.put(make_block(i))) for i in range(8)])
    writer.start()
    try:
        deadline = time.monotonic() + 20
        while len(done) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.5)
        assert writer.is_alive() and len(done) == 4  # gpu and cpu full; the 5th put waits
        check_budgets(store)
    finally:
        gate.set()
    writer.join(30)
    assert not writer.is_alive() and len(done) == 8
    store.flush()
    assert all(store.get(k, promote=False).equal(make_block(k.block_index)) for k in done)
    check_budgets(store)
    store.close()


def test_backpressure_gives_up_after_its_timeout_and_loses_nothing(tmp_path: Path) -> None:
    gate = threading.Event()
    store = TieredStore([*memory_chain(1, 1), (GatedDisk(tmp_path, gate), None)], backpressure_timeout_s=0.5)
    try:
        store.put(make_block(0))
        store.put(make_block(1))
        with pytest.raises(BackpressureTimeout):
            store.put(make_block(2))
        with pytest.raises(BackpressureTimeout):
            store.flush(timeout_s=0.2)  # the demotion to the stalled disk is still waiting
    finally:
        gate.set()
    store.flush()  # the stall delayed the background writes, it did not fail them
    assert store.put(make_block(2))
    store.flush()
    assert [store.get(make_block(i).key(), promote=False).block_index for i in range(3)] == [0, 1, 2]
    store.close()


def test_failed_write_behind_is_reported_and_loses_nothing(tmp_path: Path) -> None:
    store = TieredStore([*memory_chain(2, 2), (FailingDisk(tmp_path), None)], backpressure_timeout_s=30)
    stored = []
    with pytest.raises(WriteBehindError, match="No space left"):
        for i in range(10):
            stored.append(store.put(make_block(i)))
    assert len(stored) >= 4
    with pytest.raises(WriteBehindError):
        store.flush()
    for key in stored:  # still in memory, readable
        assert store.get(key, promote=False).equal(make_block(key.block_index))
    check_budgets(store)
    try:
        store.close()
    except WriteBehindError:
        pass


def test_concurrent_puts_gets_and_deletes(tmp_path: Path) -> None:
    store = TieredStore([*memory_chain(3, 5), (DiskTier(tmp_path), None)], fetch_workers=3)
    errors: list[BaseException] = []
    stop = threading.Event()

    def sampler() -> None:
        while not stop.is_set():
            try:
                check_budgets(store)
            except BaseException as err:
                errors.append(err)
                return
            time.sleep(0.001)

    def worker(w: int) -> None:
        rng = random.Random(w)
        mine: list[BlockKey] = []
        try:
            for i in range(40):
                mine.append(store.put(make_block(i, stream=f"s{w}")))
                store.put(make_block(i, stream="shared"))  # the same blocks from every thread
                key = rng.choice(mine)
                assert store.get(key, promote=rng.random() < 0.7).equal(
                    make_block(key.block_index, stream=f"s{w}")
                )
                if rng.random() < 0.2:
                    store.prefetch([rng.choice(mine)])
                if rng.random() < 0.1:
                    victim = mine.pop(rng.randrange(len(mine)))
                    store.delete(victim)
                    with pytest.raises(BlockNotFound):
                        store.get(victim)
            for key in mine:
                assert store.get(key).equal(make_block(key.block_index, stream=f"s{w}"))
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
    watcher = threading.Thread(target=sampler)
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    stop.set()
    watcher.join()
    assert not errors, errors[0]
    store.flush()
    assert len(store.keys("shared")) == 40
    for i in range(40):
        assert store.get(make_block(i, stream="shared").key()).equal(make_block(i, stream="shared"))
    stats = store.stats()
    for name in ("gpu", "cpu"):  # nothing reserved or leaked once everything settled
        assert stats[name]["accounted"] == stats[name]["resident"]
    check_budgets(store)
    store.close()


class StoreMachine(RuleBasedStateMachine):
    """Random operations on a small store; budgets hold and every block reads back bit-exact."""

    def __init__(self) -> None:
        super().__init__()
        self.root = tempfile.mkdtemp(prefix="kv-machine-")
        self.store = TieredStore(
            [*memory_chain(3, 4), (DiskTier(self.root), None)],
            high_watermark=0.75,
            demote_workers=[1, 2],
        )
        self.model: dict[BlockKey, tuple[int, int]] = {}  # key -> (index, tokens)
        self.deleted: set[BlockKey] = set()

    @rule(index=st.integers(0, 30), tokens=st.sampled_from([4, 16, 40]))
    def put(self, index: int, tokens: int) -> None:
        key = self.store.put(make_block(index, tokens=tokens))
        self.model[key] = (index, tokens)
        self.deleted.discard(key)

    @precondition(lambda self: self.model)
    @rule(data=st.data(), promote=st.booleans())
    def get(self, data, promote: bool) -> None:
        key = data.draw(st.sampled_from(sorted(self.model)))
        index, tokens = self.model[key]
        assert self.store.get(key, promote=promote).equal(make_block(index, tokens=tokens))

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def summary(self, data) -> None:
        key = data.draw(st.sampled_from(sorted(self.model)))
        index, tokens = self.model[key]
        assert torch.equal(
            self.store.get_summary(key).mean_keys.cpu(), make_block(index, tokens=tokens).mean_keys
        )

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def delete(self, data) -> None:
        key = data.draw(st.sampled_from(sorted(self.model)))
        self.store.delete(key)
        del self.model[key]
        self.deleted.add(key)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def prefetch(self, data) -> None:
        keys = data.draw(st.lists(st.sampled_from(sorted(self.model)), max_size=3))
        self.store.prefetch(keys)

    @rule()
    def flush(self) -> None:
        self.store.flush()
        stats = self.store.stats()
        for name in ("gpu", "cpu"):
            assert stats[name]["accounted"] == stats[name]["resident"]
            assert stats[name]["blocks"] == len(
                self.store.tiers[self.store.budgets.index(stats[name]["budget"])]
            )

    @invariant()
    def budgets_hold(self) -> None:
        check_budgets(self.store)

    @invariant()
    def deleted_blocks_are_gone(self) -> None:
        for key in self.deleted:
            assert not self.store.contains(key)

    def teardown(self) -> None:
        try:
            self.store.flush()
            assert sorted(self.store.keys()) == sorted(self.model)
        finally:
            self.store.close()
            shutil.rmtree(self.root, ignore_errors=True)


StoreMachine.TestCase.settings = settings(
    max_examples=25, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_store_state_machine = StoreMachine.TestCase


# -- memory stays flat --------------------------------------------------------------------
def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.slow
def test_memory_stays_flat_over_a_long_stream(tmp_path: Path) -> None:
    """2,000 blocks of 256 KiB (500 MiB) through 4 + 8 MiB of memory tiers onto disk."""
    mib = 1 << 20
    keys_template = torch.randn(8, 2, 64, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    values_template = torch.randn(8, 2, 64, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)

    def block(i: int) -> KVBlock:  # 128 KiB of keys + 128 KiB of values, each block different
        keys = keys_template.clone()
        keys.view(torch.int16).view(-1)[:4] = torch.tensor([i, i >> 15, 7, 9], dtype=torch.int16)
        return KVBlock(
            MODEL,
            "long-stream",
            i,
            i * 500_000,
            i * 500_000 + 499_999,
            torch.arange(64) + 64 * i,
            keys,
            values_template.clone(),
        )

    assert block(0).keys.nbytes + block(0).values.nbytes == 256 * 1024
    budgets = [4 * mib, 8 * mib]
    root = tmp_path / "disk"
    store = TieredStore(
        [
            (MemoryTier("gpu", "cpu"), budgets[0]),
            (MemoryTier("cpu", "cpu"), budgets[1]),
            (DiskTier(root), None),
        ]
    )
    peaks = [0, 0]
    resident_peaks = [0, 0]
    stop = threading.Event()

    def sampler() -> None:  # independent of the store's own peak bookkeeping
        while not stop.is_set():
            for i in range(2):
                peaks[i] = max(peaks[i], store.accounted(i))
                resident_peaks[i] = max(resident_peaks[i], store.tiers[i].nbytes)
            time.sleep(0.0005)

    watcher = threading.Thread(target=sampler)
    watcher.start()
    rss: list[int] = []
    try:
        for i in range(2000):
            store.put(block(i))
            if i == 200:
                store.flush()
                baseline = _rss_bytes()
            if i > 200 and i % 50 == 0:
                rss.append(_rss_bytes())
        store.flush()
        rss.append(_rss_bytes())
    finally:
        stop.set()
        watcher.join()
    try:
        for i in range(2):
            assert peaks[i] <= budgets[i] and resident_peaks[i] <= budgets[i] and store.peak(i) <= budgets[i]
            assert store.peak(i) > budgets[i] // 2  # the tiers were used, not bypassed
        assert store.tiers[2].nbytes > 2000 * 256 * 1024  # everything else went to disk
        growth = max(rss) - baseline
        assert growth < 48 * mib, f"RSS grew by {growth / mib:.1f} MiB over 1,800 blocks (450 MiB)"
        for i in (0, 999, 1999):
            assert store.get(block(i).key(), promote=False).equal(block(i))
    finally:
        store.close()
        shutil.rmtree(root, ignore_errors=True)


# -- crash -------------------------------------------------------------------------------
_CHILD = r"""
import sys, time, torch
from streamvqa.operators.kv import DiskTier, KVBlock, MemoryTier, TieredStore
root, write_through = sys.argv[1], sys.argv[2] == "1"
stop_after = 100000 if write_through else 60  # write-behind: stop, so the newest blocks sit in memory
block_bytes = 2 * (2 * 2 * 64 * 32 * 2) + 2 * 2 * 32 * 4 + 64 * 8
store = TieredStore([(MemoryTier("gpu", "cpu"), 6 * block_bytes), (MemoryTier("cpu", "cpu"), 6 * block_bytes),
                     (DiskTier(root, fsync=True), None)], write_through=write_through)
for i in range(stop_after):
    g = torch.Generator().manual_seed(i)
    b = KVBlock("m", "crash", i, i, i, torch.arange(64), torch.randn(2, 2, 64, 32, generator=g).half(),
                torch.randn(2, 2, 64, 32, generator=g).half())
    print(store.put(b).path, flush=True)
time.sleep(600)  # killed here
"""


@pytest.mark.slow
@pytest.mark.parametrize("write_through", [True, False], ids=["write-through", "write-behind"])
def test_after_a_kill_every_stored_block_is_complete_and_verifiable(
    tmp_path: Path, write_through: bool
) -> None:
    root = tmp_path / "durable"
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(root), "1" if write_through else "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    acknowledged = []
    try:
        for line in child.stdout:  # type: ignore[union-attr]
            acknowledged.append(BlockKey.parse(line.strip()))
            if len(acknowledged) == 60:
                break
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert len(acknowledged) == 60
    tier = DiskTier(root)  # cleans interrupted writes
    on_disk = list(tier.keys())
    for key in on_disk:
        assert tier.get(key).block_index == key.block_index  # complete and verified
    if write_through:
        assert set(acknowledged) <= set(on_disk)
    else:
        assert not set(acknowledged) <= set(on_disk)  # the blocks still in memory are lost
        assert on_disk  # the demoted ones are not


def test_standard_store_builds_the_usual_chain(tmp_path: Path) -> None:
    with standard_store(gpu_bytes=4 * BLOCK_BYTES, cpu_bytes=4 * BLOCK_BYTES, disk_dir=tmp_path) as store:
        assert [t.name for t in store.tiers] == ["gpu", "cpu", "disk"] and store.budgets[-1] is None
        key = store.put(make_block(0))
        assert store.get(key).equal(make_block(0))
    with pytest.raises(ValueError, match="disk_bytes"):
        standard_store(gpu_bytes=1, cpu_bytes=1, disk_dir=tmp_path, object_store=object())
