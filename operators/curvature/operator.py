"""The CurveStream operator: curvature score -> K-sigma routing -> two-tier memory under a token budget.

    op = CurveStream(CurveStreamConfig(budget_tokens=16384))
    state = op.init_state()
    for frame in frames:                      # FrameInput(seq, pts_us, feature[, tokens, grid])
        out = op.step(state, frame)           # out.decision, out.events
    blob = state.to_bytes()                   # snapshot; CurveStreamState.from_bytes(blob) restores

Plain Python/numpy with explicit state: ``step`` takes the state and returns the
outputs; the state object is updated in place (copy it with ``state.copy()``
to keep the old one). The same config on a restored state gives the same
subsequent decisions, bit for bit; restoring under another config is refused.

Routing of frame t (score s_t, threshold T_t = mean + k * std of the previous
``window`` defined scores):

- the first frame of a stream is clear (``first``: a stream starts a scene);
- while s_t is undefined or fewer than ``min_samples`` scores were seen: fuzzy (``warmup``);
- s_t > T_t: clear (``above``), else fuzzy (``below``).

s_t then joins the statistics. Frames whose ``seq`` is not above the last one
seen (late or re-delivered) are skipped and counted, so replays are idempotent.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np

from . import codec
from .compress import make_compressor
from .memory import HierarchicalMemory, MemoryPolicy, MemoryState, Overflow
from .records import Decision, FrameInput, Reason, StepOutput, Tier
from .scores import ScoreState, check_score, score_step
from .threshold import KSigmaThreshold, RollingStats

STATE_VERSION = 1


@dataclass(frozen=True)
class CurveStreamConfig:
    """Parameters of the operator (defaults chosen by bench/curvature_eval.py, see docs/curvature.md)."""

    score: str = "speed"
    k: float = 1.0
    window: int | None = 32  # scores in the running statistics; None = the whole stream
    min_samples: int = 4
    std_floor: float = 1e-4
    clip_outliers: bool = False  # winsorise the statistics at the threshold
    budget_tokens: int = 16384
    clear_share: float = 0.75  # at most this fraction of the budget in clear memory
    clear_tokens: int = 256  # tokens of a clear frame: all patch tokens (16 x 16 for DINOv2-S at 224)
    fuzzy: str = "pool:4x4"  # fuzzy compression: pool:RxC or prune:N
    grid: tuple[int, int] = (16, 16)  # patch grid of the encoder (for the fuzzy token count)
    overflow: Overflow = "merge"
    first_frame_clear: bool = True
    keep_tokens: bool = False  # hold token payloads in the state (else route and account only)
    payload_dtype: str = "float32"

    def __post_init__(self) -> None:
        check_score(self.score)
        if not (self.k >= 0 and math.isfinite(self.k)):
            raise ValueError("k must be a finite number >= 0")
        if not 0.0 < self.clear_share <= 1.0:
            raise ValueError("clear_share must be in (0, 1]")
        if self.payload_dtype not in ("float32", "float16"):
            raise ValueError("payload_dtype must be float32 or float16")
        if self.grid[0] * self.grid[1] != self.clear_tokens:
            raise ValueError(f"clear_tokens ({self.clear_tokens}) must equal the patch grid {self.grid}")
        self.policy()  # validates the budget split
        KSigmaThreshold(
            self.k, self.min_samples, self.std_floor, RollingStats(self.window), self.clip_outliers
        )

    @property
    def fuzzy_tokens(self) -> int:
        return make_compressor(self.fuzzy).n_tokens(self.grid)

    def policy(self) -> MemoryPolicy:
        return MemoryPolicy(
            budget=self.budget_tokens,
            clear_cap=math.floor(self.clear_share * self.budget_tokens),
            clear_cost=self.clear_tokens,
            fuzzy_cost=self.fuzzy_tokens,
            overflow=self.overflow,
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["grid"] = list(self.grid)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> CurveStreamConfig:
        d = dict(d)
        d["grid"] = tuple(d["grid"])
        return cls(**d)

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def budget_for(frames: int, fraction: float, clear_tokens: int = 256) -> int:
    """The token budget that is ``fraction`` of ``frames`` full frames."""
    return math.floor(fraction * frames * clear_tokens)


@dataclass
class CurveStreamState:
    """Everything the operator remembers about one stream (explicit, serialisable)."""

    config_fingerprint: str
    scores: ScoreState = field(default_factory=ScoreState)
    threshold: KSigmaThreshold = field(default_factory=KSigmaThreshold)
    memory: MemoryState = field(default_factory=MemoryState)
    last_seq: int | None = None
    frames: int = 0  # frames routed
    skipped: int = 0  # late or duplicate frames ignored
    routed: dict[str, int] = field(default_factory=lambda: {"clear": 0, "fuzzy": 0})

    def copy(self) -> CurveStreamState:
        return copy.deepcopy(self)

    def to_dict(self) -> dict:
        t = self.threshold
        return {
            "version": STATE_VERSION,
            "config": self.config_fingerprint,
            "scores": self.scores.to_dict(),
            "threshold": {
                "k": t.k,
                "min_samples": t.min_samples,
                "std_floor": t.std_floor,
                "clip": t.clip,
                "stats": t.stats.to_dict(),
            },
            "memory": self.memory.to_dict(),
            "last_seq": self.last_seq,
            "frames": self.frames,
            "skipped": self.skipped,
            "routed": dict(self.routed),
        }

    @classmethod
    def from_dict(cls, d: dict) -> CurveStreamState:
        if d.get("version") != STATE_VERSION:
            raise codec.StateFormatError(f"state version {d.get('version')!r}, expected {STATE_VERSION}")
        t = d["threshold"]
        return cls(
            config_fingerprint=d["config"],
            scores=ScoreState.from_dict(d["scores"]),
            threshold=KSigmaThreshold(
                float(t["k"]),
                int(t["min_samples"]),
                float(t["std_floor"]),
                RollingStats.from_dict(t["stats"]),
                bool(t["clip"]),
            ),
            memory=MemoryState.from_dict(d["memory"]),
            last_seq=d["last_seq"],
            frames=int(d["frames"]),
            skipped=int(d["skipped"]),
            routed={k: int(v) for k, v in d["routed"].items()},
        )

    def to_bytes(self) -> bytes:
        return codec.pack(self.to_dict())

    @classmethod
    def from_bytes(cls, data: bytes) -> CurveStreamState:
        d = codec.unpack(data)
        if not isinstance(d, dict):
            raise codec.StateFormatError("state blob does not hold a state")
        return cls.from_dict(d)


class CurveStream:
    """Stateless operator logic for one config; the per-stream state is passed to :meth:`step`."""

    def __init__(self, config: CurveStreamConfig | None = None) -> None:
        self.config = config or CurveStreamConfig()
        self.fingerprint = self.config.fingerprint()
        self.memory = HierarchicalMemory(
            self.config.policy(),
            make_compressor(self.config.fuzzy),
            keep_tokens=self.config.keep_tokens,
            payload_dtype=self.config.payload_dtype,
        )

    def init_state(self) -> CurveStreamState:
        c = self.config
        return CurveStreamState(
            config_fingerprint=self.fingerprint,
            threshold=KSigmaThreshold(
                c.k, c.min_samples, c.std_floor, RollingStats(c.window), c.clip_outliers
            ),
        )

    def restore(self, data: bytes) -> CurveStreamState:
        """A state from :meth:`CurveStreamState.to_bytes`, checked to belong to this config."""
        state = CurveStreamState.from_bytes(data)
        self._check(state)
        return state

    def _check(self, state: CurveStreamState) -> None:
        if state.config_fingerprint != self.fingerprint:
            raise ValueError(
                f"state was written under config {state.config_fingerprint}, this operator runs {self.fingerprint}"
            )

    def step(self, state: CurveStreamState, frame: FrameInput) -> StepOutput:
        """Route one frame; updates ``state`` in place and returns the decision and memory events."""
        self._check(state)
        if state.last_seq is not None and frame.seq <= state.last_seq:
            state.skipped += 1
            return StepOutput(None, ())
        c = self.config
        # Everything that can refuse a frame is checked before any state changes: a refused frame
        # (ValueError) leaves the state exactly as it was.
        self.memory.validate(state.memory, frame.tokens, frame.grid)
        score = score_step(state.scores, frame.feature, c.score)
        th = state.threshold
        threshold, mean, std = th.value(), th.stats.mean, th.stats.std
        tier: Tier
        reason: Reason
        if state.frames == 0 and c.first_frame_clear:
            tier, reason = "clear", "first"
        elif math.isnan(score) or not th.ready:
            tier, reason = "fuzzy", "warmup"
        elif score > threshold:
            tier, reason = "clear", "above"
        else:
            tier, reason = "fuzzy", "below"
        if not math.isnan(score):
            th.push(score)
        charged, events = self.memory.admit(
            state.memory,
            seq=frame.seq,
            pts_us=frame.pts_us,
            tier=tier,
            score=score if not math.isnan(score) else 0.0,
            tokens=frame.tokens,
            grid=frame.grid,
            content_hash=frame.content_hash,
        )
        state.last_seq = frame.seq
        state.frames += 1
        state.routed[tier] += 1
        decision = Decision(
            seq=frame.seq,
            pts_us=frame.pts_us,
            score=score,
            threshold=threshold,
            mean=mean,
            std=std,
            tier=tier,
            reason=reason,
            tokens=charged,
            memory_tokens=state.memory.total_tokens,
            clear_tokens=state.memory.clear_tokens,
        )
        return StepOutput(decision, tuple(events))

    def run(self, frames, state: CurveStreamState | None = None) -> tuple[CurveStreamState, list[StepOutput]]:
        """Step through an iterable of frames (convenience for batch use and tests)."""
        state = state or self.init_state()
        return state, [self.step(state, f) for f in frames]


def frames_from_features(
    features: np.ndarray, pts_us: np.ndarray | None = None, start_seq: int = 0
) -> list[FrameInput]:
    """FrameInputs for (T, D) features (index mode), pts defaulting to 0.5 s apart."""
    features = np.asarray(features)
    if pts_us is None:
        pts_us = np.arange(len(features), dtype=np.int64) * 500_000
    return [FrameInput(start_seq + i, int(pts_us[i]), features[i]) for i in range(len(features))]
