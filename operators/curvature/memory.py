"""Two-tier visual memory under a strict token budget: clear (full tokens) and fuzzy (compressed).

Budget rules, applied when a frame is admitted (``budget`` B tokens in all, of
which at most ``clear_cap`` = floor(clear_share * B) in clear memory):

1. A clear frame that does not fit under the clear cap first downgrades the
   oldest clear entries to fuzzy (their tokens are compressed, not lost).
2. While the total would exceed B, fuzzy tokens are freed:
   ``overflow="evict"`` drops the oldest fuzzy entry; ``overflow="merge"``
   folds two neighbouring fuzzy entries into one (token payloads averaged,
   weighted by the frames each covers): the pair with the smallest combined
   span, oldest first on ties, never the newest entry and never across a clear
   entry. Spans stay about equal and within detected scenes, so the fuzzy tier
   becomes an even summary of the whole stream instead of a recent window
   (when no pair may merge, the oldest fuzzy entry is evicted).
   Only a memory holding clear entries alone downgrades its oldest clear
   entry here.

So the total never exceeds B (the config guarantees that one clear frame fits)
and old key frames give way to new ones. Every change is a :class:`MemoryEvent`;
:func:`replay` rebuilds the memory from them.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from itertools import chain, pairwise
from operator import attrgetter
from typing import Literal

import numpy as np

from .compress import Compressor, TokenBlock, full_block
from .records import MemoryEvent, Tier

Overflow = Literal["evict", "merge"]


@dataclass(slots=True)
class Entry:
    """One resident memory entry: one frame, or a span of frames after merges."""

    seq: int
    last_seq: int
    pts_us: int
    last_pts_us: int
    tier: Tier
    tokens: int
    score: float
    frames: int = 1
    content_hash: str = ""


@dataclass(frozen=True)
class MemoryPolicy:
    budget: int
    clear_cap: int
    clear_cost: int  # tokens of a clear frame (all patch tokens)
    fuzzy_cost: int  # tokens of a fuzzy frame (compressed)
    overflow: Overflow = "evict"

    def __post_init__(self) -> None:
        if self.overflow not in ("evict", "merge"):
            raise ValueError(f"overflow must be 'evict' or 'merge', got {self.overflow!r}")
        if not 0 < self.fuzzy_cost <= self.clear_cost:
            raise ValueError(f"need 0 < fuzzy tokens ({self.fuzzy_cost}) <= clear tokens ({self.clear_cost})")
        if self.clear_cap < self.clear_cost:
            raise ValueError(
                f"the clear share of the budget ({self.clear_cap} tokens) cannot hold one clear frame "
                f"({self.clear_cost} tokens): raise the budget or clear_share"
            )
        if self.clear_cap > self.budget:
            raise ValueError("clear_cap cannot exceed the budget")


@dataclass
class MemoryState:
    clear: list[Entry] = field(default_factory=list)  # oldest first
    fuzzy: list[Entry] = field(default_factory=list)  # oldest first (by seq)
    clear_tokens: int = 0
    fuzzy_tokens: int = 0
    payloads: dict[int, TokenBlock] = field(default_factory=dict)  # seq -> tokens (keep_tokens only)
    grid: tuple[int, int] | None = None
    counts: dict[str, int] = field(
        default_factory=lambda: {"admit": 0, "downgrade": 0, "evict": 0, "merge": 0}
    )

    @property
    def total_tokens(self) -> int:
        return self.clear_tokens + self.fuzzy_tokens

    def entries(self) -> list[Entry]:
        """All resident entries in time order."""
        return sorted(self.clear + self.fuzzy, key=lambda e: e.seq)

    def to_dict(self) -> dict:
        return {
            "clear": _columns(self.clear),
            "fuzzy": _columns(self.fuzzy),
            "clear_tokens": self.clear_tokens,
            "fuzzy_tokens": self.fuzzy_tokens,
            "payloads": [[seq, p.tokens, p.positions] for seq, p in sorted(self.payloads.items())],
            "grid": list(self.grid) if self.grid else None,
            "counts": dict(self.counts),
        }

    @classmethod
    def from_dict(cls, d: dict) -> MemoryState:
        return cls(
            clear=_entries(d["clear"], "clear"),
            fuzzy=_entries(d["fuzzy"], "fuzzy"),
            clear_tokens=int(d["clear_tokens"]),
            fuzzy_tokens=int(d["fuzzy_tokens"]),
            payloads={int(seq): TokenBlock(tokens, positions) for seq, tokens, positions in d["payloads"]},
            grid=tuple(d["grid"]) if d["grid"] else None,
            counts={k: int(v) for k, v in d["counts"].items()},
        )


_INT_FIELDS = ("seq", "last_seq", "pts_us", "last_pts_us", "tokens", "frames")
_get_ints = attrgetter(*_INT_FIELDS)
_get_score = attrgetter("score")


def _columns(entries: list[Entry]) -> dict:
    """Column arrays of one tier (a state blob stays compact and fast to write)."""
    n = len(entries) * len(_INT_FIELDS)
    ints = np.fromiter(chain.from_iterable(map(_get_ints, entries)), dtype=np.int64, count=n)
    ints = ints.reshape(-1, len(_INT_FIELDS))
    return {
        "ints": ints,
        "score": np.fromiter(map(_get_score, entries), dtype=np.float64, count=len(entries)),
        "hash": [e.content_hash for e in entries] if any(e.content_hash for e in entries) else None,
    }


def _entries(cols: dict, tier: Tier) -> list[Entry]:
    ints, scores = cols["ints"].tolist(), cols["score"].tolist()
    hashes = cols["hash"] or [""] * len(ints)
    return [
        Entry(i[0], i[1], i[2], i[3], tier, i[4], sc, i[5], h)
        for i, sc, h in zip(ints, scores, hashes, strict=True)
    ]


def _seq_key(e: Entry) -> int:
    return e.seq


class HierarchicalMemory:
    """The budget policy over a :class:`MemoryState` (the state is passed in and updated in place)."""

    def __init__(
        self,
        policy: MemoryPolicy,
        compressor: Compressor,
        keep_tokens: bool = False,
        payload_dtype: str = "float32",
    ) -> None:
        self.policy = policy
        self.compressor = compressor
        self.keep_tokens = keep_tokens
        self.dtype = np.dtype(payload_dtype)

    # -- payloads -------------------------------------------------------------------------------
    def validate(
        self, state: MemoryState, tokens: np.ndarray | None, grid: tuple[int, int] | None
    ) -> tuple[int, int] | None:
        """Check a frame's payload against this memory without changing anything; returns its grid."""
        if not self.keep_tokens:
            return None
        if tokens is None:
            raise ValueError("this memory keeps token payloads: the frame needs its patch tokens")
        if grid is None:
            raise ValueError("frames with tokens need their patch grid")
        grid = (int(grid[0]), int(grid[1]))
        if state.grid is None:
            if (
                self.compressor.n_tokens(grid) != self.policy.fuzzy_cost
                or grid[0] * grid[1] != self.policy.clear_cost
            ):
                raise ValueError(f"a {grid[0]}x{grid[1]} grid does not match the configured token costs")
        elif state.grid != grid:
            raise ValueError(f"patch grid changed from {state.grid} to {grid}")
        shape = np.shape(tokens)
        if len(shape) != 2 or shape[0] != grid[0] * grid[1]:
            raise ValueError(f"expected ({grid[0] * grid[1]}, D) tokens, got {shape}")
        return grid

    def _downgrade_payload(self, state: MemoryState, seq: int) -> TokenBlock | None:
        if not self.keep_tokens:
            return None
        full = state.payloads[seq]
        assert state.grid is not None  # set by the admit that stored the payload
        block = self.compressor.compress(full.tokens, state.grid, self.dtype)
        state.payloads[seq] = block
        return block

    # -- budget moves ---------------------------------------------------------------------------
    def _downgrade_oldest_clear(self, state: MemoryState, step: int, events: list[MemoryEvent]) -> None:
        p = self.policy
        e = state.clear.pop(0)
        state.clear_tokens -= e.tokens
        e.tier, e.tokens = "fuzzy", p.fuzzy_cost
        bisect.insort(state.fuzzy, e, key=_seq_key)
        state.fuzzy_tokens += p.fuzzy_cost
        state.counts["downgrade"] += 1
        payload = self._downgrade_payload(state, e.seq)
        events.append(
            MemoryEvent(
                step, "downgrade", e.seq, "fuzzy", p.fuzzy_cost, p.fuzzy_cost - p.clear_cost, payload=payload
            )
        )

    def _merge_pair(self, state: MemoryState) -> int | None:
        """Index i of the fuzzy pair (i, i+1) to merge, or None if no pair may merge.

        The pair with the smallest combined span in frames, the oldest on ties, among all pairs
        but the one holding the newest entry and never across a clear entry (a key frame bounds
        the spans on both sides of it until it is downgraded). Spans thus stay about equal over
        the stream: the fuzzy tier degrades into an even summary of the whole past.
        """
        fuzzy = state.fuzzy
        n = len(fuzzy)
        counts = np.fromiter((e.frames for e in fuzzy), dtype=np.int64, count=n)
        cost = (counts[:-2] + counts[1:-1]).astype(np.float64)
        if state.clear:
            clear = np.fromiter((e.seq for e in state.clear), dtype=np.int64, count=len(state.clear))
            ends = np.fromiter((e.last_seq for e in fuzzy[: n - 2]), dtype=np.int64, count=n - 2)
            starts = np.fromiter((e.seq for e in fuzzy[1 : n - 1]), dtype=np.int64, count=n - 2)
            between = np.searchsorted(clear, starts) - np.searchsorted(clear, ends)
            cost[between > 0] = np.inf
        i = int(np.argmin(cost))
        return None if not np.isfinite(cost[i]) else i

    def _release_fuzzy(self, state: MemoryState, step: int, events: list[MemoryEvent]) -> None:
        """Free one fuzzy entry's tokens: evict the oldest, or merge two neighbours (``merge``)."""
        i = self._merge_pair(state) if self.policy.overflow == "merge" and len(state.fuzzy) >= 3 else None
        if i is not None:
            keep, gone = state.fuzzy[i], state.fuzzy.pop(i + 1)
            payload = None
            if self.keep_tokens:
                payload = self.compressor.merge(
                    state.payloads[keep.seq], keep.frames, state.payloads.pop(gone.seq), gone.frames
                )
                state.payloads[keep.seq] = payload
            keep.last_seq, keep.last_pts_us = gone.last_seq, gone.last_pts_us
            keep.frames += gone.frames
            keep.score = max(keep.score, gone.score)
            state.fuzzy_tokens -= gone.tokens
            state.counts["merge"] += 1
            events.append(
                MemoryEvent(
                    step,
                    "merge",
                    gone.seq,
                    "fuzzy",
                    keep.tokens,
                    -gone.tokens,
                    into=keep.seq,
                    payload=payload,
                )
            )
            return
        old = state.fuzzy.pop(0)
        state.fuzzy_tokens -= old.tokens
        state.payloads.pop(old.seq, None)
        state.counts["evict"] += 1
        events.append(MemoryEvent(step, "evict", old.seq, "evicted", 0, -old.tokens))

    def admit(
        self,
        state: MemoryState,
        *,
        seq: int,
        pts_us: int,
        tier: Tier,
        score: float,
        tokens: np.ndarray | None = None,
        grid: tuple[int, int] | None = None,
        content_hash: str = "",
    ) -> tuple[int, list[MemoryEvent]]:
        """Add one frame; returns (tokens charged, events). Never leaves the total above the budget."""
        p = self.policy
        events: list[MemoryEvent] = []
        grid = self.validate(state, tokens, grid)
        if self.keep_tokens:
            tokens = np.asarray(tokens)
            state.grid = grid
        if tier == "clear":
            while state.clear_tokens + p.clear_cost > p.clear_cap and state.clear:
                self._downgrade_oldest_clear(state, seq, events)
        cost = p.clear_cost if tier == "clear" else p.fuzzy_cost
        while state.total_tokens + cost > p.budget:
            if state.fuzzy:
                self._release_fuzzy(state, seq, events)
            elif state.clear:
                self._downgrade_oldest_clear(state, seq, events)
            else:  # cannot happen: the policy guarantees budget >= clear_cap >= clear_cost
                raise AssertionError("empty memory cannot hold one frame")
        entry = Entry(seq, seq, pts_us, pts_us, tier, cost, score, 1, content_hash)
        payload = None
        if self.keep_tokens:
            assert tokens is not None and grid is not None  # validate required both
            if tier == "clear":
                payload = full_block(tokens, grid, self.dtype)
            else:
                payload = self.compressor.compress(tokens, grid, self.dtype)
            state.payloads[seq] = payload
        if tier == "clear":
            state.clear.append(entry)
            state.clear_tokens += cost
        else:
            # New frames are the newest: appending keeps the fuzzy list in time order.
            state.fuzzy.append(entry)
            state.fuzzy_tokens += cost
        state.counts["admit"] += 1
        events.append(MemoryEvent(seq, "admit", seq, tier, cost, cost, payload=payload))
        return cost, events


def check_invariants(state: MemoryState, policy: MemoryPolicy) -> None:
    """Raise AssertionError if the state breaks a budget or bookkeeping rule (used by the tests)."""
    assert state.clear_tokens == sum(e.tokens for e in state.clear), "clear token count drifted"
    assert state.fuzzy_tokens == sum(e.tokens for e in state.fuzzy), "fuzzy token count drifted"
    assert state.total_tokens <= policy.budget, f"budget exceeded: {state.total_tokens} > {policy.budget}"
    assert state.clear_tokens <= policy.clear_cap, "clear cap exceeded"
    assert all(e.tier == "clear" and e.tokens == policy.clear_cost for e in state.clear)
    assert all(e.tier == "fuzzy" and e.tokens == policy.fuzzy_cost for e in state.fuzzy)
    for tier in (state.clear, state.fuzzy):
        seqs = [e.seq for e in tier]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), "tier out of time order"
    spans = sorted((e.seq, e.last_seq) for e in state.clear + state.fuzzy)
    assert all(a[1] < b[0] for a, b in pairwise(spans)), "entries overlap"
    if state.payloads:
        assert set(state.payloads) == {e.seq for e in state.clear + state.fuzzy}, "payloads out of sync"
        for e in state.clear + state.fuzzy:
            assert len(state.payloads[e.seq]) == e.tokens, "payload size differs from its token count"


def replay(events: list[MemoryEvent]) -> dict[int, tuple[str, int, int]]:
    """Rebuild the memory from its event log: {entry seq: (tier, tokens, last frame seq)}."""
    mem: dict[int, list] = {}
    for ev in events:
        if ev.kind == "admit":
            if ev.seq in mem:
                raise ValueError(f"frame {ev.seq} admitted twice")
            mem[ev.seq] = [ev.tier, ev.tokens, ev.seq]
        elif ev.kind == "downgrade":
            if mem[ev.seq][0] != "clear":
                raise ValueError(f"downgrade of non-clear entry {ev.seq}")
            mem[ev.seq][0], mem[ev.seq][1] = ev.tier, ev.tokens
        elif ev.kind == "evict":
            del mem[ev.seq]
        elif ev.kind == "merge":
            absorbed = mem.pop(ev.seq)
            assert ev.into is not None  # a merge names the entry it merges into
            mem[ev.into][1] = ev.tokens
            mem[ev.into][2] = max(mem[ev.into][2], absorbed[2])
        else:
            raise ValueError(f"unknown event kind {ev.kind!r}")
    return {seq: (v[0], v[1], v[2]) for seq, v in mem.items()}
