"""CurveStream: curvature-aware hierarchical visual memory (training-free).

Per frame: a curvature score on the trajectory of L2-normalised pooled features
(:mod:`.scores`), an online K-sigma threshold (:mod:`.threshold`), and a two-tier
memory under a strict token budget (:mod:`.memory`, :mod:`.compress`), composed
by :class:`CurveStream` (:mod:`.operator`) with explicit, serialisable state.
The Beam adapter lives in :mod:`.beam` (imported on demand: it needs apache-beam).
See docs/curvature.md.
"""

from .compress import PoolCompressor, PruneCompressor, TokenBlock, make_compressor
from .memory import Entry, HierarchicalMemory, MemoryPolicy, MemoryState, check_invariants, replay
from .operator import CurveStream, CurveStreamConfig, CurveStreamState, budget_for, frames_from_features
from .records import Decision, FrameInput, MemoryEvent, StepOutput
from .scores import SCORES, ScoreState, curvature_scores, score_step
from .threshold import KSigmaThreshold, RollingStats

__all__ = [
    "SCORES",
    "CurveStream",
    "CurveStreamConfig",
    "CurveStreamState",
    "Decision",
    "Entry",
    "FrameInput",
    "HierarchicalMemory",
    "KSigmaThreshold",
    "MemoryEvent",
    "MemoryPolicy",
    "MemoryState",
    "PoolCompressor",
    "PruneCompressor",
    "RollingStats",
    "ScoreState",
    "StepOutput",
    "TokenBlock",
    "budget_for",
    "check_invariants",
    "curvature_scores",
    "frames_from_features",
    "make_compressor",
    "replay",
    "score_step",
]
