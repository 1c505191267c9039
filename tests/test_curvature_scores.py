"""Curvature scores: batch and streaming forms agree bit for bit; values match their geometry."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from streamvqa.operators.curvature import SCORES, ScoreState, curvature_scores, score_step

pytestmark = pytest.mark.numerics


def streaming(features: np.ndarray, name: str) -> np.ndarray:
    state = ScoreState()
    return np.array([score_step(state, f, name) for f in features], dtype=np.float64)


def trajectory(seed: int, t: int = 120, d: int = 384) -> np.ndarray:
    """A random walk with jumps (cuts) and a frozen stretch (identical frames)."""
    rng = np.random.default_rng(seed)
    f = np.cumsum(rng.standard_normal((t, d)) * 0.05, axis=0) + rng.standard_normal(d)
    for c in range(20, t, 25):
        f[c:] += rng.standard_normal(d) * 2
    if t > 50:
        f[40:50] = f[40]
    return f.astype(np.float32)


@pytest.mark.parametrize("name", SCORES)
@pytest.mark.parametrize("seed", [0, 1])
def test_batch_and_streaming_agree_exactly(name: str, seed: int) -> None:
    f = trajectory(seed)
    batch = curvature_scores(f, name)
    assert batch.dtype == np.float64 and batch.shape == (len(f),)
    np.testing.assert_array_equal(batch, streaming(f, name))  # bitwise, NaNs in the same places


rows = st.integers(min_value=0, max_value=30)
dims = st.integers(min_value=1, max_value=48)


@st.composite
def feature_arrays(draw) -> np.ndarray:
    t, d = draw(rows), draw(dims)
    elements = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, width=32)
    f = draw(hnp.arrays(np.float32, (t, d), elements=elements))
    if t > 3 and draw(st.booleans()):  # duplicated frames and all-zero rows happen in real streams
        f[1] = f[0]
        f[2] = 0.0
    return f


@settings(max_examples=150, deadline=None)
@given(f=feature_arrays(), name=st.sampled_from(SCORES))
def test_batch_and_streaming_agree_exactly_on_any_trajectory(f: np.ndarray, name: str) -> None:
    np.testing.assert_array_equal(curvature_scores(f, name), streaming(f, name))


def test_undefined_scores_are_nan() -> None:
    f = trajectory(3, t=5, d=8)
    for name in SCORES:
        s = curvature_scores(f, name)
        first = 1 if name == "speed" else 2
        assert np.isnan(s[:first]).all() and np.isfinite(s[first:]).all()
    assert curvature_scores(f[:0], "speed").shape == (0,)


def test_scores_match_the_geometry_of_a_circle() -> None:
    """Unit vectors at angles 0, a, 2a, ...: chords of length 2 sin(a/2), turning by a each step."""
    a = 0.3
    angles = np.arange(6) * a
    f = np.stack([np.cos(angles), np.sin(angles)], axis=1) * 5.0  # scale is normalised away
    speed = 2 * math.sin(a / 2)
    np.testing.assert_allclose(curvature_scores(f, "speed")[1:], speed, rtol=1e-12)
    np.testing.assert_allclose(curvature_scores(f, "turn")[2:], 1 - math.cos(a), rtol=1e-9)
    np.testing.assert_allclose(curvature_scores(f, "speed_turn")[2:], speed * (1 - math.cos(a)), rtol=1e-9)
    np.testing.assert_allclose(curvature_scores(f, "second_diff")[2:], 4 * math.sin(a / 2) ** 2, rtol=1e-9)


def test_turn_of_a_right_angle_and_of_a_reversal() -> None:
    quarter = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]])  # half circle in two steps
    back = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])  # there and back again
    assert curvature_scores(quarter, "turn")[2] == pytest.approx(1 - math.cos(math.pi / 2))
    assert curvature_scores(back, "turn")[2] == pytest.approx(2.0)  # cos = -1: the largest turn


def test_frozen_frames_score_zero_and_a_cut_after_them_still_scores() -> None:
    still = np.tile(np.array([[1.0, 2.0, 3.0]]), (4, 1))
    cut = np.array([[3.0, -1.0, 0.5]])
    f = np.concatenate([still, cut])
    for name in SCORES:
        s = curvature_scores(f, name)
        first = 1 if name == "speed" else 2
        assert (s[first:4] == 0).all(), name
        assert s[4] > 0.5, name  # the cut's direction after rest counts as a right angle
    speed = curvature_scores(f, "speed")
    assert curvature_scores(f, "speed_turn")[4] == speed[4]  # turn factor 1 after rest


def test_streaming_rejects_bad_features() -> None:
    state = ScoreState()
    score_step(state, np.ones(4), "speed")
    with pytest.raises(ValueError, match="dimension changed"):
        score_step(state, np.ones(5), "speed")
    with pytest.raises(ValueError, match="NaN"):
        score_step(state, np.array([1.0, np.nan, 0.0, 0.0]), "speed")
    assert state.count == 1  # a refused feature leaves the state untouched
    with pytest.raises(ValueError, match="unknown curvature score"):
        curvature_scores(np.ones((3, 2)), "jerk")
