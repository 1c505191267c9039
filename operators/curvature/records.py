"""What goes in and out of the CurveStream operator: frames, decisions, memory events."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from .compress import TokenBlock

Tier = Literal["clear", "fuzzy"]
#: why a frame got its tier
Reason = Literal["first", "above", "below", "warmup"]
EventKind = Literal["admit", "downgrade", "evict", "merge"]


@dataclass(frozen=True)
class FrameInput:
    """One frame of one stream, as the vision encoder left it.

    ``seq`` numbers the stream's frames (strictly increasing; gaps allowed);
    ``feature`` is the pooled feature (D,). ``tokens`` (N, D) patch tokens with
    their ``grid`` are optional: without them the operator only routes and
    accounts (index mode); with them the memory also holds the token payloads.
    """

    seq: int
    pts_us: int
    feature: np.ndarray
    tokens: np.ndarray | None = None
    grid: tuple[int, int] | None = None
    content_hash: str = ""


@dataclass(frozen=True, eq=False)
class Decision:
    """The routing decision of one frame: everything needed to plot and replay it.

    Equality compares values with NaN equal to NaN (an undefined score), so decisions that
    went through serialisation compare equal to the originals.
    """

    seq: int
    pts_us: int
    score: float  # NaN while undefined (first frames)
    threshold: float  # +inf during warm-up
    mean: float  # statistics the threshold was computed from (before this score)
    std: float
    tier: Tier
    reason: Reason
    tokens: int  # tokens charged for this frame at admission
    memory_tokens: int  # total tokens in memory after this step
    clear_tokens: int  # of which in clear memory

    def to_dict(self) -> dict:
        """Plain values (NaN as None), for JSON and Arrow."""
        d = dict(self.__dict__)
        for name in ("score", "threshold", "mean", "std"):
            if math.isnan(d[name]):
                d[name] = None
        return d

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Decision):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash((self.seq, self.pts_us, self.tier, self.tokens))


@dataclass(frozen=True)
class MemoryEvent:
    """One change to the memory (its log replays the memory exactly, see ``memory.replay``).

    ``admit``: frame ``seq`` entered ``tier`` with ``tokens``; ``downgrade``:
    entry ``seq`` moved from clear to fuzzy (now ``tokens``); ``evict``: entry
    ``seq`` left memory; ``merge``: entry ``seq`` was folded into entry ``into``
    (which keeps ``tokens``). ``delta`` is the change of the memory's total.
    ``step`` is the frame whose admission caused the event. ``payload`` is the
    entry's new tokens when the memory holds payloads (admit, downgrade, merge).
    """

    step: int
    kind: EventKind
    seq: int
    tier: Tier | Literal["evicted"]
    tokens: int
    delta: int
    into: int | None = None
    payload: TokenBlock | None = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict:
        return {
            "step": self.step,
            "kind": self.kind,
            "seq": self.seq,
            "tier": self.tier,
            "tokens": self.tokens,
            "delta": self.delta,
            "into": self.into,
        }


@dataclass(frozen=True)
class StepOutput:
    """What one frame produced: its decision (None for a late or duplicate frame) and memory events."""

    decision: Decision | None
    events: tuple[MemoryEvent, ...] = ()

    @property
    def skipped(self) -> bool:
        return self.decision is None
