"""Two-tier memory: the budget is never exceeded, eviction/merge/downgrade order, replayable events."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamvqa.operators.curvature import (
    HierarchicalMemory,
    MemoryPolicy,
    MemoryState,
    PoolCompressor,
    PruneCompressor,
    check_invariants,
    make_compressor,
    replay,
)

pytestmark = pytest.mark.numerics

GRID = (4, 4)  # 16 "patch" tokens per frame keeps payload tests small
D = 6


def memory(
    budget: int, clear_cap: int, fuzzy: str = "pool:2x2", overflow: str = "evict", keep_tokens: bool = False
):
    comp = make_compressor(fuzzy)
    policy = MemoryPolicy(
        budget=budget, clear_cap=clear_cap, clear_cost=16, fuzzy_cost=comp.n_tokens(GRID), overflow=overflow
    )
    return HierarchicalMemory(policy, comp, keep_tokens=keep_tokens), MemoryState()


def live(state: MemoryState) -> dict:
    return {e.seq: (e.tier, e.tokens, e.last_seq) for e in state.entries()}


@st.composite
def scenarios(draw):
    fuzzy = draw(st.sampled_from(["pool:2x2", "pool:1x1", "prune:3", "pool:4x4"]))
    fuzzy_cost = make_compressor(fuzzy).n_tokens(GRID)
    clear_cap = draw(st.integers(min_value=16, max_value=120))
    budget = draw(st.integers(min_value=clear_cap, max_value=clear_cap + 80))
    tiers = draw(st.lists(st.sampled_from(["clear", "fuzzy"]), min_size=1, max_size=60))
    return (
        fuzzy,
        fuzzy_cost,
        budget,
        clear_cap,
        tiers,
        draw(st.sampled_from(["evict", "merge"])),
        draw(st.booleans()),
    )


@settings(max_examples=200, deadline=None)
@given(scenarios())
def test_budget_never_exceeded_and_events_replay_the_memory(scenario) -> None:
    fuzzy, _, budget, clear_cap, tiers, overflow, keep_tokens = scenario
    mem, state = memory(budget, clear_cap, fuzzy, overflow, keep_tokens)
    rng = np.random.default_rng(len(tiers))
    events = []
    for seq, tier in enumerate(tiers):
        tokens = rng.standard_normal((16, D)).astype(np.float32) if keep_tokens else None
        before = state.total_tokens
        charged, evs = mem.admit(
            state, seq=seq, pts_us=seq * 1000, tier=tier, score=0.0, tokens=tokens, grid=GRID
        )
        check_invariants(state, mem.policy)  # budget, clear cap, bookkeeping, order, payload sizes
        assert evs[-1].kind == "admit" and evs[-1].seq == seq and evs[-1].tokens == charged
        assert state.total_tokens - before == sum(e.delta for e in evs)  # deltas explain every change
        events += evs
        assert replay(events) == live(state)
    assert sum(e.delta for e in events) == state.total_tokens
    # every frame is in exactly one resident entry, or left with an evicted one
    frames, lost = {}, 0
    for e in events:
        if e.kind == "admit":
            frames[e.seq] = 1
        elif e.kind == "merge":
            frames[e.into] += frames.pop(e.seq)
        elif e.kind == "evict":
            lost += frames.pop(e.seq)
    assert frames == {e.seq: e.frames for e in state.entries()}
    assert sum(frames.values()) + lost == len(tiers)


def test_clear_frame_over_the_cap_downgrades_the_oldest_clear_first() -> None:
    mem, state = memory(budget=200, clear_cap=48)
    for seq in range(3):
        mem.admit(state, seq=seq, pts_us=seq, tier="clear", score=1.0)
    assert [e.seq for e in state.clear] == [0, 1, 2]
    _, events = mem.admit(state, seq=3, pts_us=3, tier="clear", score=1.0)
    assert [(e.kind, e.seq) for e in events] == [("downgrade", 0), ("admit", 3)]
    assert events[0].delta == 4 - 16 and events[0].tier == "fuzzy"
    assert [e.seq for e in state.clear] == [1, 2, 3] and [e.seq for e in state.fuzzy] == [0]


def test_full_memory_evicts_the_oldest_fuzzy() -> None:
    mem, state = memory(budget=40, clear_cap=32)  # fuzzy frames cost 4
    mem.admit(state, seq=0, pts_us=0, tier="clear", score=1.0)
    for seq in range(1, 7):
        mem.admit(state, seq=seq, pts_us=seq, tier="fuzzy", score=0.0)
    assert state.total_tokens == 40
    _, events = mem.admit(state, seq=7, pts_us=7, tier="fuzzy", score=0.0)
    assert [(e.kind, e.seq) for e in events] == [("evict", 1), ("admit", 7)]
    _, events = mem.admit(state, seq=8, pts_us=8, tier="clear", score=1.0)
    # the clear tier has room (16 of 32): room in the total is made from the oldest fuzzy frames
    assert [(e.kind, e.seq) for e in events] == [
        ("evict", 2),
        ("evict", 3),
        ("evict", 4),
        ("evict", 5),
        ("admit", 8),
    ]
    check_invariants(state, mem.policy)


def test_all_clear_memory_downgrades_when_the_total_is_full() -> None:
    mem, state = memory(budget=32, clear_cap=32)
    mem.admit(state, seq=0, pts_us=0, tier="clear", score=1.0)
    mem.admit(state, seq=1, pts_us=1, tier="clear", score=1.0)
    _, events = mem.admit(state, seq=2, pts_us=2, tier="fuzzy", score=0.0)
    assert [(e.kind, e.seq) for e in events] == [("downgrade", 0), ("admit", 2)]
    check_invariants(state, mem.policy)


def test_merge_folds_the_smallest_neighbours_never_the_newest_nor_across_a_clear_frame() -> None:
    mem, state = memory(budget=16 + 5 * 4, clear_cap=16, overflow="merge")
    mem.admit(state, seq=0, pts_us=0, tier="fuzzy", score=0.0)
    mem.admit(state, seq=1, pts_us=1, tier="fuzzy", score=0.0)
    mem.admit(state, seq=2, pts_us=2, tier="clear", score=1.0)  # a key frame between 1 and 3
    for seq in (3, 4, 5):
        mem.admit(state, seq=seq, pts_us=seq, tier="fuzzy", score=0.0)
    assert state.total_tokens == 36
    _, events = mem.admit(state, seq=6, pts_us=6, tier="fuzzy", score=0.0)
    # pairs (0,1) and (3,4) both span 2 frames: the oldest merges; (1,3) would cross frame 2
    assert [(e.kind, e.seq, e.into) for e in events] == [("merge", 1, 0), ("admit", 6, None)]
    _, events = mem.admit(state, seq=7, pts_us=7, tier="fuzzy", score=0.0)
    assert [(e.kind, e.seq, e.into) for e in events] == [("merge", 4, 3), ("admit", 7, None)]
    _, events = mem.admit(state, seq=8, pts_us=8, tier="fuzzy", score=0.0)
    assert [(e.kind, e.seq, e.into) for e in events] == [("merge", 6, 5), ("admit", 8, None)]
    assert [(e.seq, e.last_seq, e.frames) for e in state.fuzzy] == [
        (0, 1, 2),
        (3, 4, 2),
        (5, 6, 2),
        (7, 7, 1),
        (8, 8, 1),
    ]
    check_invariants(state, mem.policy)


def test_merged_payload_is_the_frame_weighted_mean_for_pooling() -> None:
    mem, state = memory(budget=16, clear_cap=16, overflow="merge", keep_tokens=True)
    tokens = [np.full((16, D), float(v), np.float32) for v in (1, 4, 10, 20)]
    for seq, tok in enumerate(tokens):
        mem.admit(state, seq=seq, pts_us=seq, tier="fuzzy", score=0.0, tokens=tok, grid=GRID)
    _, events = mem.admit(state, seq=4, pts_us=4, tier="fuzzy", score=0.0, tokens=tokens[0], grid=GRID)
    merge = events[0]
    assert merge.kind == "merge" and merge.into == 0
    np.testing.assert_allclose(state.payloads[0].tokens, 2.5)  # (1 + 4) / 2
    assert merge.payload is state.payloads[0]
    # a third frame folded into the 2-frame entry weighs 1/3
    comp = PoolCompressor(2, 2)
    merged = comp.merge(
        state.payloads[0], 2, comp.compress(np.full((16, D), 10, np.float32), GRID, np.float32), 1
    )
    np.testing.assert_allclose(merged.tokens, (2.5 * 2 + 10) / 3)


def test_payloads_follow_tiers_and_downgrade_compresses() -> None:
    mem, state = memory(budget=100, clear_cap=16, keep_tokens=True)
    tok = np.arange(16 * D, dtype=np.float32).reshape(16, D)
    mem.admit(state, seq=0, pts_us=0, tier="clear", score=1.0, tokens=tok, grid=GRID)
    np.testing.assert_array_equal(state.payloads[0].tokens, tok)
    assert state.payloads[0].tokens is not tok  # the memory owns a copy
    _, events = mem.admit(state, seq=1, pts_us=1, tier="clear", score=1.0, tokens=tok, grid=GRID)
    assert events[0].kind == "downgrade" and len(events[0].payload) == 4
    expected = tok.reshape(2, 2, 2, 2, D).mean(axis=(1, 3)).reshape(4, D)
    np.testing.assert_allclose(state.payloads[0].tokens, expected)
    np.testing.assert_allclose(state.payloads[0].positions, [[1, 1], [1, 3], [3, 1], [3, 3]])
    with pytest.raises(ValueError, match="patch tokens"):
        mem.admit(state, seq=2, pts_us=2, tier="fuzzy", score=0.0)
    with pytest.raises(ValueError, match="grid changed"):
        mem.admit(state, seq=2, pts_us=2, tier="fuzzy", score=0.0, tokens=np.zeros((16, D)), grid=(2, 8))


def test_compressors() -> None:
    tok = 1.0 + 0.05 * np.random.default_rng(0).standard_normal((16, D)).astype(np.float32)
    tok[5] = np.array([1, -1, 1, -1, 1, -1], np.float32)  # orthogonal to the others: the most distinct
    pruned = PruneCompressor(3).compress(tok, GRID, np.float16)
    assert pruned.tokens.dtype == np.float16 and len(pruned) == 3
    assert [1.5, 1.5] in pruned.positions.tolist()  # token 5 sits at row 1, col 1 (centre 1.5, 1.5)
    uneven = PoolCompressor(3, 3).compress(np.ones((25, D), np.float32), (5, 5), np.float32)
    assert len(uneven) == 9 and np.allclose(uneven.tokens, 1.0)
    merged = PruneCompressor(3).merge(pruned, 1, PruneCompressor(3).compress(tok * 0.5, GRID, np.float16), 1)
    assert len(merged) == 3
    for bad in ("pool:0x2", "prune:0", "median:3"):
        with pytest.raises(ValueError):
            make_compressor(bad)


def test_policy_validation() -> None:
    with pytest.raises(ValueError, match="cannot hold one clear frame"):
        MemoryPolicy(budget=100, clear_cap=10, clear_cost=16, fuzzy_cost=4)
    with pytest.raises(ValueError, match="fuzzy tokens"):
        MemoryPolicy(budget=100, clear_cap=50, clear_cost=16, fuzzy_cost=32)
    with pytest.raises(ValueError, match="overflow"):
        MemoryPolicy(budget=100, clear_cap=50, clear_cost=16, fuzzy_cost=4, overflow="drop")
