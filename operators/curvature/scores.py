"""Per-frame curvature scores on the trajectory of L2-normalised pooled frame features.

With f_t the L2-normalised feature of frame t and the velocity v_t = f_t - f_{t-1}:

=============  =======================================  ===========  ==================
name           score at frame t                          defined for  range
=============  =======================================  ===========  ==================
``speed``      |v_t|  (first difference; a baseline,    t >= 1       [0, 2]
               not a curvature)
``turn``       1 - cos(v_t, v_{t-1})  (turning angle)   t >= 2       [0, 2]
``speed_turn`` |v_t| * (1 - cos(v_t, v_{t-1}))          t >= 2       [0, 4]
               (speed-weighted turning angle)
``second_diff`` |f_t - 2 f_{t-1} + f_{t-2}| = |v_t - v_{t-1}|  t >= 2  [0, 4]
=============  =======================================  ===========  ==================

Undefined scores (the first one or two frames of a stream) are NaN. The cosine
of two velocities is taken as 1 (no turn) when both are zero (a frozen stream)
and 0 (a right angle) when only one is (motion starting from rest), so that a
cut after duplicated frames still scores.

Batch and streaming forms agree bit for bit: both take every dot product as a
pairwise sum along one contiguous float64 row (``np.add.reduce(a * b, axis=-1)``,
whose result for a row does not depend on how many rows are reduced together),
and the scalar steps (sqrt, division, clipping) are IEEE-exact in numpy and in
Python alike and are applied in the same order. The streaming form carries
f_{t-1}, v_{t-1} and |v_{t-1}|^2, so a step costs O(D) with a handful of numpy calls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

SCORES = ("speed_turn", "turn", "second_diff", "speed")
#: how many previous frames a score looks at (its first defined frame index)
ORDER = {"speed": 1, "turn": 2, "speed_turn": 2, "second_diff": 2}
#: squared velocity norms at or below this count as zero (features are unit vectors)
ZERO_SQ = 1e-18


def check_score(name: str) -> str:
    if name not in ORDER:
        raise ValueError(f"unknown curvature score {name!r}; choose one of {', '.join(SCORES)}")
    return name


def _rowdot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise dot products: one pairwise sum per row, the same for a (D,) row and a (n, D) row."""
    return np.add.reduce(a * b, axis=-1)


def normalise_rows(x: np.ndarray) -> np.ndarray:
    """(n, D) -> float64 rows of unit L2 norm (all-zero rows stay zero)."""
    x = np.ascontiguousarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected (n, D) features, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or infinity")
    norm = np.sqrt(_rowdot(x, x))
    return x / np.where(norm > 0.0, norm, 1.0)[:, None]


def _normalise_one(x: np.ndarray) -> np.ndarray:
    """(D,) -> float64 unit vector; bit-identical to the matching row of :func:`normalise_rows`."""
    x = np.ascontiguousarray(x, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"expected a (D,) feature, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("feature contains NaN or infinity")
    norm = math.sqrt(_rowdot(x, x))
    return x / (norm if norm > 0.0 else 1.0)


def _turn_rows(s0: np.ndarray, s1: np.ndarray, dot: np.ndarray) -> np.ndarray:
    z0, z1 = s0 <= ZERO_SQ, s1 <= ZERO_SQ
    cos = dot / np.sqrt(np.where(z0 | z1, 1.0, s0 * s1))
    cos = np.where(z0 & z1, 1.0, np.where(z0 | z1, 0.0, cos))
    return 1.0 - np.minimum(1.0, np.maximum(-1.0, cos))


def _turn_one(s0: float, s1: float, dot: float) -> float:
    z0, z1 = s0 <= ZERO_SQ, s1 <= ZERO_SQ
    if z0 and z1:
        cos = 1.0
    elif z0 or z1:
        cos = 0.0
    else:
        cos = dot / math.sqrt(s0 * s1)
    return 1.0 - min(1.0, max(-1.0, cos))


def curvature_scores(features: np.ndarray, name: str) -> np.ndarray:
    """Batch form: (T, D) pooled features -> (T,) float64 scores, NaN where undefined."""
    check_score(name)
    f = normalise_rows(features)
    t = len(f)
    out = np.full(t, np.nan)
    if t < 2:
        return out
    v = f[1:] - f[:-1]  # v[i] = v_{i+1}
    s = _rowdot(v, v)
    if name == "speed":
        out[1:] = np.sqrt(s)
        return out
    if t < 3:
        return out
    v0, v1 = v[1:], v[:-1]
    if name == "second_diff":
        a = v0 - v1
        out[2:] = np.sqrt(_rowdot(a, a))
        return out
    turn = _turn_rows(s[1:], s[:-1], _rowdot(v0, v1))
    out[2:] = turn if name == "turn" else np.sqrt(s[1:]) * turn
    return out


@dataclass
class ScoreState:
    """Streaming state: the previous normalised feature, the previous velocity and its squared norm."""

    prev: np.ndarray | None = None  # f_{t-1}
    prev_v: np.ndarray | None = None  # v_{t-1}
    prev_s: float = 0.0  # |v_{t-1}|^2
    count: int = 0

    def to_dict(self) -> dict:
        return {"prev": self.prev, "prev_v": self.prev_v, "prev_s": self.prev_s, "count": self.count}

    @classmethod
    def from_dict(cls, d: dict) -> ScoreState:
        return cls(prev=d["prev"], prev_v=d["prev_v"], prev_s=float(d["prev_s"]), count=int(d["count"]))


def score_step(state: ScoreState, feature: np.ndarray, name: str) -> float:
    """Streaming form: update ``state`` with one (D,) feature and return its score (NaN if undefined).

    O(D) per frame; the same arithmetic as :func:`curvature_scores` in the same order, hence the
    same bits (the tests check it on real and random trajectories).
    """
    f0 = _normalise_one(np.ravel(feature))
    prev = state.prev
    score = math.nan
    if prev is None:
        state.prev, state.count = f0, 1
        return score
    if prev.shape != f0.shape:
        raise ValueError(f"feature dimension changed from {prev.shape[0]} to {f0.shape[0]}")
    v0 = f0 - prev
    s0 = float(_rowdot(v0, v0))
    if name == "speed":
        score = math.sqrt(s0)
    elif state.prev_v is not None:
        v1 = state.prev_v
        if name == "second_diff":
            a = v0 - v1
            score = math.sqrt(float(_rowdot(a, a)))
        else:
            turn = _turn_one(s0, state.prev_s, float(_rowdot(v0, v1)))
            score = turn if name == "turn" else math.sqrt(s0) * turn
    state.prev, state.prev_v, state.prev_s = f0, v0, s0
    state.count += 1
    return score
