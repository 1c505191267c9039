"""Online K-sigma statistics against a numpy reference (sliding and cumulative windows)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamvqa.operators.curvature import KSigmaThreshold, RollingStats


def check_against_numpy(values: list[float], window: int | None, rel: float = 1e-9) -> None:
    stats = RollingStats(window)
    for i, v in enumerate(values):
        stats.push(v)
        ref = np.array(values[max(0, i + 1 - window) : i + 1] if window else values[: i + 1])
        scale = max(1.0, float(np.abs(ref).max()))
        assert stats.n == len(ref)
        assert math.isclose(stats.mean, float(np.mean(ref)), rel_tol=rel, abs_tol=rel * scale)
        # std within a relative tolerance of the values' scale (catastrophic cancellation is the risk)
        assert math.isclose(stats.std, float(np.std(ref)), rel_tol=1e-6, abs_tol=1e-7 * scale), (i, stats.std)
        if window:
            assert stats.values() == ref.tolist()


@settings(max_examples=120, deadline=None)
@given(
    values=st.lists(st.floats(min_value=-1e4, max_value=1e4, allow_nan=False), min_size=1, max_size=120),
    window=st.one_of(st.none(), st.integers(min_value=1, max_value=20)),
)
def test_running_mean_and_std_match_numpy(values: list[float], window: int | None) -> None:
    check_against_numpy(values, window)


def test_numerically_stable_for_large_offsets_over_long_streams() -> None:
    """Values around 1e6 with spread 1e-3 for 20k steps: naive sum-of-squares would lose every digit."""
    rng = np.random.default_rng(0)
    values = (1e6 + rng.standard_normal(20_000) * 1e-3).tolist()
    stats = RollingStats(50)
    for v in values:
        stats.push(v)
    ref = np.array(values[-50:])
    assert stats.mean == pytest.approx(ref.mean(), rel=1e-12)
    assert stats.std == pytest.approx(ref.std(), rel=1e-6)


def test_regime_changes_are_tracked_exactly_enough() -> None:
    values = [0.0] * 100 + [1e8] * 100 + [1.0, 2.0, 3.0] * 40
    check_against_numpy(values, window=16, rel=1e-9)


def test_threshold_warm_up_floor_and_formula() -> None:
    th = KSigmaThreshold(k=2.0, min_samples=3, std_floor=0.5, stats=RollingStats(4))
    assert th.value() == math.inf
    th.push(1.0)
    th.push(1.0)
    assert th.value() == math.inf and not th.ready
    th.push(1.0)
    assert th.ready and th.value() == pytest.approx(1.0 + 2.0 * 0.5)  # std 0 floored at 0.5
    for v in (4.0, 7.0, 10.0):
        th.push(v)
    w = np.array([1.0, 4.0, 7.0, 10.0])
    assert th.value() == pytest.approx(w.mean() + 2.0 * w.std())


def test_clipped_statistics_hold_outliers_at_the_threshold() -> None:
    plain = KSigmaThreshold(k=1.0, min_samples=2, stats=RollingStats(8))
    clipped = KSigmaThreshold(k=1.0, min_samples=2, stats=RollingStats(8), clip=True)
    for v in (1.0, 1.2, 0.9, 1.1):
        plain.push(v)
        clipped.push(v)
    limit = clipped.value()
    plain.push(50.0)
    clipped.push(50.0)
    assert clipped.stats.values()[-1] == pytest.approx(limit)
    assert clipped.value() < plain.value() / 3


def test_state_round_trip_continues_identically() -> None:
    a = RollingStats(7)
    values = np.random.default_rng(1).standard_normal(40).tolist()
    for v in values[:23]:
        a.push(v)
    b = RollingStats.from_dict(a.to_dict())
    for v in values[23:]:
        a.push(v)
        b.push(v)
        assert (a.mean, a.m2) == (b.mean, b.m2)


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        RollingStats(0)
    with pytest.raises(ValueError, match="non-finite"):
        RollingStats(3).push(float("nan"))
    with pytest.raises(ValueError, match="exceed the window"):
        KSigmaThreshold(min_samples=10, stats=RollingStats(4))
