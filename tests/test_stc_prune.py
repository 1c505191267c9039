"""STC-Pruner: the most distinctive tokens per frame, with their grid positions (docs/stc.md)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streamvqa.operators.vision import PrunedFrame, STCPruneConfig, STCPruner, STCPruneState

pytestmark = pytest.mark.numerics

GRID = (6, 8)


def chunk(seed: int, frames: int = 3, d: int = 20) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.2, 3.0, size=d)  # channels of different variance
    x = rng.standard_normal((frames, GRID[0] * GRID[1], d)) * scale + rng.standard_normal(d)
    return torch.from_numpy(x.astype(np.float32))


def numpy_reference(chunks: list[np.ndarray], n: int) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """The formula written out in numpy (float64), independent of the module."""
    past = None
    results = []
    for x in chunks:
        f, _, d = x.shape
        flat = x.reshape(-1, d).astype(np.float64)
        var = flat.var(axis=0)
        channels = np.sort(np.argsort(var, kind="stable")[: int(np.ceil(d / 2))])

        def proj(v, channels=channels):
            s = v[..., channels]
            return s / np.linalg.norm(s, axis=-1, keepdims=True)

        z = proj(x.astype(np.float64))
        anchor = proj(flat.mean(0) if past is None else past)

        def sim(a, c):
            d2 = ((a - c) ** 2).sum(-1)
            return sum(np.exp(-d2 / (2 * s)) for s in (1 / 8, 1 / 4, 1 / 2, 1, 2))

        out = []
        for i in range(f):
            score = sim(z[i], z[i].mean(0)) + sim(z[i], anchor)
            keep = np.sort(np.argsort(score, kind="stable")[:n])
            out.append((keep, score[keep]))
        results.append(out)
        means = flat.mean(0)
        past = means if past is None else past + (means - past) / (len(results))
    return results


def test_matches_numpy_reference_over_chunks_with_running_mean() -> None:
    chunks = [chunk(1), chunk(2), chunk(3, frames=2)]
    expected = numpy_reference([c.numpy() for c in chunks], n=12)
    pruner = STCPruner(STCPruneConfig(tokens_per_frame=12))
    state = pruner.init_state()
    for c, exp in zip(chunks, expected, strict=True):
        got = pruner.prune(state, c, GRID)
        for frame, (keep, score) in zip(got, exp, strict=True):
            np.testing.assert_array_equal(frame.index.numpy(), keep)
            np.testing.assert_allclose(frame.scores.numpy(), score, rtol=1e-5, atol=1e-5)
    assert state.chunks == 3
    np.testing.assert_allclose(
        state.past_mean, np.mean([c.reshape(-1, 20).double().mean(0).numpy() for c in chunks], axis=0)
    )


def test_keeps_n_tokens_with_positions_and_original_features() -> None:
    x = chunk(5)
    pruner = STCPruner(STCPruneConfig(tokens_per_frame=10))
    out = pruner.prune(pruner.init_state(), x, GRID)
    assert len(out) == 3 and all(isinstance(f, PrunedFrame) and len(f) == 10 for f in out)
    for i, f in enumerate(out):
        idx = f.index.numpy()
        assert (np.diff(idx) > 0).all()  # raster order, no duplicates
        np.testing.assert_array_equal(f.positions.numpy(), np.stack([idx // GRID[1], idx % GRID[1]], 1))
        assert torch.equal(f.tokens, x[i, f.index])  # unnormalised, every channel
        assert f.grid == GRID
    per_frame = pruner.prune(pruner.init_state(), x, GRID, n=[0, 5, 100])
    assert [len(f) for f in per_frame] == [0, 5, 48]
    by_tier = STCPruner(STCPruneConfig(tier_tokens={"clear": 30, "fuzzy": 4})).prune(
        STCPruneState(), x, GRID, tiers=["fuzzy", "clear", "fuzzy"]
    )
    assert [len(f) for f in by_tier] == [4, 30, 4]
    with pytest.raises(ValueError):
        pruner.prune(pruner.init_state(), x, GRID, n=[1, 2])
    with pytest.raises(ValueError, match="grid"):
        pruner.prune(pruner.init_state(), x, (5, 5))


def test_the_odd_token_out_is_kept_first() -> None:
    rng = np.random.default_rng(0)
    x = np.tile(rng.standard_normal(16), (1, 48, 1)) + 0.01 * rng.standard_normal((1, 48, 16))
    x[0, 29] = rng.standard_normal(16) * 3  # one distinctive token
    out = STCPruner(STCPruneConfig(tokens_per_frame=1)).prune(
        STCPruneState(), torch.from_numpy(x.astype(np.float32)), GRID
    )
    assert out[0].index.tolist() == [29] and out[0].positions.tolist() == [[3, 5]]


def test_deterministic_and_state_round_trip() -> None:
    pruner = STCPruner(STCPruneConfig(tokens_per_frame=8))
    s1, s2 = pruner.init_state(), pruner.init_state()
    a = pruner.prune(s1, chunk(7), GRID)
    b = pruner.prune(s2, chunk(7), GRID)
    assert all(
        torch.equal(x.index, y.index) and torch.equal(x.scores, y.scores) for x, y in zip(a, b, strict=True)
    )
    restored = STCPruneState.from_bytes(s1.to_bytes())
    assert restored.chunks == 1 and np.array_equal(restored.past_mean, s1.past_mean)
    nxt = pruner.prune(s1, chunk(8), GRID)
    nxt2 = pruner.prune(restored, chunk(8), GRID)
    assert all(
        torch.equal(x.index, y.index) and torch.equal(x.scores, y.scores)
        for x, y in zip(nxt, nxt2, strict=True)
    )
    assert np.array_equal(s1.past_mean, restored.past_mean)
    empty = STCPruneState.from_bytes(pruner.init_state().to_bytes())
    assert empty.past_mean is None and empty.chunks == 0
    with pytest.raises(ValueError):
        STCPruneState.from_bytes(s1.to_bytes()[:-8])
    with pytest.raises(ValueError, match="width"):
        pruner.prune(s1, chunk(9, d=12), GRID)
    # the running mean matters: a different history changes the scores
    fresh = pruner.scores(pruner.init_state(), chunk(8))
    assert not torch.allclose(fresh, pruner.scores(s1, chunk(8)))
