"""ReKV block scoring: PyTorch reference against a per-head loop, Triton (run by the interpreter on CPU)
against the reference, dispatch, layer combination and budgeted block selection."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from streamvqa.operators.lm import scoring as S

pytestmark = pytest.mark.numerics


def naive_scores(query: torch.Tensor, mean_keys: torch.Tensor) -> torch.Tensor:
    """(L, B) by the definition: one dot product per (layer, block, query head), in float64."""
    layers, heads, _ = query.shape
    blocks, _, kv_heads, _ = mean_keys.shape
    group = heads // kv_heads
    out = torch.zeros(layers, blocks, dtype=torch.float64)
    for l in range(layers):  # noqa: E741
        for b in range(blocks):
            for h in range(heads):
                out[l, b] += torch.dot(query[l, h].double(), mean_keys[b, l, h // group].double())
    return out


def make(layers: int, heads: int, kv: int, dim: int, blocks: int, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(layers, heads, dim, generator=g).to(dtype)
    k = torch.randn(blocks, layers, kv, dim, generator=g).to(dtype)
    return q, k


# ---------------------------------------------------------------------------- reference


@pytest.mark.parametrize(
    ("layers", "heads", "kv", "dim", "blocks"),
    [
        (30, 9, 3, 64, 5),  # SmolLM2-135M: GQA, 3 query heads per KV head
        (2, 4, 4, 48, 7),  # MHA
        (3, 8, 1, 80, 1),  # MQA, one block
        (1, 6, 2, 17, 0),  # no block
    ],
)
def test_reference_matches_per_head_loop(layers: int, heads: int, kv: int, dim: int, blocks: int) -> None:
    q, k = make(layers, heads, kv, dim, blocks)
    got = S.score_blocks_torch(q, k)
    assert got.shape == (layers, blocks) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), naive_scores(q, k), atol=1e-4, rtol=1e-5)


@given(
    layers=st.integers(1, 3),
    kv=st.integers(1, 3),
    group=st.integers(1, 3),
    dim=st.integers(1, 40),
    blocks=st.integers(0, 12),
    seed=st.integers(0, 2**16),
)
def test_reference_matches_per_head_loop_for_any_shape(
    layers: int, kv: int, group: int, dim: int, blocks: int, seed: int
) -> None:
    q, k = make(layers, kv * group, kv, dim, blocks, seed)
    torch.testing.assert_close(S.score_blocks_torch(q, k).double(), naive_scores(q, k), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_reference_computes_in_float32_for_any_input_dtype(dtype: torch.dtype) -> None:
    q, k = make(4, 9, 3, 64, 300, dtype=dtype)
    got = S.score_blocks_torch(q, k)
    assert got.dtype == torch.float32
    # the same (rounded) inputs, upcast: no float16 overflow or accumulation error on top
    torch.testing.assert_close(got.double(), naive_scores(q.float(), k.float()), atol=1e-3, rtol=1e-5)
    big = torch.full((1, 2, 64), 200.0, dtype=dtype)
    assert torch.isfinite(S.score_blocks_torch(big, big[None].expand(3, 1, 2, 64))).all()  # 5e6 > fp16 max


def test_shape_errors_are_value_errors() -> None:
    q, k = make(2, 6, 3, 16, 4)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        S.score_blocks_torch(q, make(2, 4, 4, 16, 4)[1])
    with pytest.raises(ValueError, match="layers"):
        S.score_blocks_torch(q, k[:, :1])
    with pytest.raises(ValueError, match="head_dim"):
        S.score_blocks_torch(q, k[..., :8])
    with pytest.raises(ValueError, match="query must be"):
        S.score_blocks_torch(q[0], k)
    with pytest.raises(ValueError, match="mean_keys must be"):
        S.score_blocks_torch(q, k[0])
    with pytest.raises(ValueError, match="floating"):
        S.score_blocks_torch(q, k.long())
    with pytest.raises(ValueError, match="multiple of KV heads"):
        S.score_blocks(q, make(2, 4, 4, 16, 4)[1], backend="triton")  # checked before any kernel runs


# ---------------------------------------------------------------------------- triton

# Triton decorates kernels at import time and reads TRITON_INTERPRET then: run them in a fresh interpreter.
INTERPRETER_SCRIPT = textwrap.dedent(
    """
    import os
    assert os.environ["TRITON_INTERPRET"] == "1"
    import torch
    from streamvqa.operators.lm import scoring as S

    g = torch.Generator().manual_seed(0)
    def check(layers, heads, kv, dim, blocks, dtype=torch.float32, **kw):
        q = torch.randn(layers, heads, dim, generator=g).to(dtype)
        k = torch.randn(blocks, layers, kv, dim, generator=g).to(dtype)
        got, exp = S.score_blocks_triton(q, k, **kw), S.score_blocks_torch(q, k)
        assert got.shape == exp.shape == (layers, blocks) and got.dtype == torch.float32
        tol = 1e-4 * max(1.0, exp.abs().max().item()) if blocks else 0
        assert torch.allclose(got, exp, atol=tol, rtol=1e-4), (layers, heads, kv, dim, blocks, dtype)
        return got

    for dim in (48, 64, 80, 1):
        for blocks in (0, 1, 33, 300):
            check(3, 9, 3, dim, blocks)  # GQA
    check(2, 4, 4, 80, 70)  # MHA
    check(2, 8, 1, 96, 5)  # MQA
    check(2, 6, 2, 130, 65, block_b=16, block_d=32)  # several D tiles, tiles of blocks not filled
    for dtype in (torch.float16, torch.bfloat16):
        check(3, 9, 3, 64, 50, dtype=dtype)
    # non-contiguous inputs
    q = torch.randn(3, 64, 9, generator=g).transpose(1, 2)
    k = torch.randn(3, 20, 64, 3, generator=g).permute(1, 0, 3, 2)
    assert torch.allclose(S.score_blocks_triton(q, k), S.score_blocks_torch(q, k), atol=1e-4)
    # dispatch: the environment variable sends "auto" to the kernel
    os.environ["STREAMVQA_KV_BACKEND"] = "triton"
    assert S.resolve_backend(q) == "triton"
    assert torch.allclose(S.score_blocks(q, k), S.score_blocks_torch(q, k), atol=1e-4)
    print("ok")
    """
)


def test_triton_kernel_in_the_interpreter_matches_the_reference() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop("STREAMVQA_KV_BACKEND", None)
    proc = subprocess.run(
        [sys.executable, "-c", INTERPRETER_SCRIPT], env=env, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip().endswith("ok")


def test_dispatch_picks_torch_on_cpu_and_honours_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(S.BACKEND_ENV, raising=False)
    x = torch.zeros(1, 1, 2)
    assert S.resolve_backend(x) == "torch"
    assert S.resolve_backend(x, "torch") == "torch"
    monkeypatch.setenv(S.BACKEND_ENV, "torch")
    assert S.resolve_backend(x) == "torch"
    with pytest.raises(ValueError, match="unknown"):
        S.resolve_backend(x, "cuda-magic")
    q, k = make(2, 6, 3, 16, 4)
    torch.testing.assert_close(S.score_blocks(q, k), S.score_blocks_torch(q, k))
    if torch.cuda.is_available() and S.triton_available():
        monkeypatch.delenv(S.BACKEND_ENV)
        assert S.resolve_backend(x.cuda()) == "triton"


@pytest.mark.skipif(not (torch.cuda.is_available() and S.triton_available()), reason="needs CUDA + Triton")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_triton_on_gpu_matches_reference(dtype: torch.dtype) -> None:
    for dim, blocks in ((64, 4096), (80, 333), (48, 1)):
        q, k = make(30, 9, 3, dim, blocks, dtype=dtype)
        q, k = q.cuda(), k.cuda()
        exp = S.score_blocks_torch(q, k)
        torch.testing.assert_close(S.score_blocks_triton(q, k), exp, atol=1e-3, rtol=1e-4)


# ---------------------------------------------------------------------------- combine


def test_combine_is_mean_of_layer_z_scores() -> None:
    scores = torch.tensor([[1.0, 2.0, 3.0], [10.0, 0.0, 20.0]])
    z0 = torch.tensor([-1.0, 0.0, 1.0]) / torch.tensor(2.0 / 3.0).sqrt()
    z1 = (scores[1] - 10.0) / torch.tensor(200.0 / 3.0).sqrt()
    torch.testing.assert_close(S.combine_layer_scores(scores), (z0 + z1) / 2)


@given(
    layers=st.integers(1, 5),
    blocks=st.integers(2, 40),
    layer=st.integers(0, 4),
    factor=st.floats(1e-3, 1e3),
    shift=st.floats(-1e3, 1e3),
    seed=st.integers(0, 2**16),
)
def test_combine_ignores_a_layers_scale_and_offset(
    layers: int, blocks: int, layer: int, factor: float, shift: float, seed: int
) -> None:
    # float64, so that the affine map itself loses nothing (a float32 layer 1e-3 * x + 1e3 would)
    scores = torch.randn(layers, blocks, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    scaled = scores.clone()
    scaled[layer % layers] = scaled[layer % layers] * factor + shift
    torch.testing.assert_close(
        S.combine_layer_scores(scaled), S.combine_layer_scores(scores), atol=1e-3, rtol=1e-3
    )


def test_combine_zero_variance_layer_contributes_nothing() -> None:
    informative = torch.tensor([0.5, -1.0, 2.0, 0.25])
    for flat in (torch.full((4,), 0.1), torch.zeros(4), torch.full((4,), -123.456)):
        got = S.combine_layer_scores(torch.stack([informative, flat]))
        torch.testing.assert_close(got, S.combine_layer_scores(informative[None]) / 2)
    assert torch.equal(S.combine_layer_scores(torch.full((3, 5), 7.0)), torch.zeros(5))


def test_combine_edge_shapes() -> None:
    assert torch.equal(S.combine_layer_scores(torch.tensor([[3.0], [-1.0]])), torch.zeros(1))
    assert S.combine_layer_scores(torch.zeros(4, 0)).shape == (0,)
    assert S.combine_layer_scores(torch.zeros(2, 6, dtype=torch.float16)).dtype == torch.float32
    with pytest.raises(ValueError, match="layers, blocks"):
        S.combine_layer_scores(torch.zeros(5))


# ---------------------------------------------------------------------------- select


def test_select_takes_best_blocks_and_returns_time_order() -> None:
    scores = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.3])
    assert S.select_blocks(scores, [1] * 5, top_k=3, max_tokens=None) == [1, 2, 3]
    assert S.select_blocks(scores, [1] * 5, top_k=None, max_tokens=None) == [0, 1, 2, 3, 4]
    assert S.select_blocks(scores, [1] * 5, top_k=0, max_tokens=None) == []
    assert S.select_blocks(scores, [1] * 5, top_k=9, max_tokens=None) == [0, 1, 2, 3, 4]
    assert S.select_blocks(torch.zeros(0), [], top_k=3, max_tokens=10) == []


def test_select_skips_a_block_that_does_not_fit_and_goes_on() -> None:
    scores = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.3])
    counts = [10, 40, 30, 50, 20]
    # 1 (40) fits, 3 (50) would make 90 > 70: skipped, 2 (30) fits -> 70, 4 (20) and 0 (10) don't fit
    assert S.select_blocks(scores, counts, top_k=None, max_tokens=70) == [1, 2]
    assert S.select_blocks(scores, counts, top_k=None, max_tokens=80) == [0, 1, 2]
    assert S.select_blocks(scores, counts, top_k=2, max_tokens=80) == [1, 2]
    assert S.select_blocks(scores, counts, top_k=None, max_tokens=5) == []
    assert S.select_blocks(scores, torch.tensor(counts), top_k=None, max_tokens=70) == [1, 2]
    # empty blocks always fit
    assert S.select_blocks(scores, [0, 0, 0, 0, 0], top_k=None, max_tokens=0) == [0, 1, 2, 3, 4]


def test_select_breaks_ties_by_lower_index() -> None:
    scores = torch.tensor([0.5, 0.9, 0.5, 0.5, 0.9])
    assert S.select_blocks(scores, [1] * 5, top_k=3, max_tokens=None) == [0, 1, 4]
    assert S.select_blocks(scores, [1] * 5, top_k=4, max_tokens=None) == [0, 1, 2, 4]
    assert S.select_blocks(torch.zeros(4), [1] * 4, top_k=2, max_tokens=None) == [0, 1]


@pytest.mark.parametrize(
    ("scores", "counts", "kwargs", "error"),
    [
        (torch.zeros(2, 2), [1, 1], {}, ValueError),
        ([0.1, 0.2], [1, 1], {}, ValueError),
        (torch.zeros(3), [1, 1], {}, ValueError),
        (torch.zeros(2), [1, -1], {}, ValueError),
        (torch.zeros(2), [1, 1.5], {}, TypeError),
        (torch.zeros(2), torch.tensor([1.0, 2.0]), {}, ValueError),
        (torch.tensor([0.0, float("nan")]), [1, 1], {}, ValueError),
        (torch.zeros(2), [1, 1], {"top_k": -1}, ValueError),
        (torch.zeros(2), [1, 1], {"max_tokens": -5}, ValueError),
        (torch.zeros(2), [1, 1], {"top_k": 2.0}, TypeError),
        (torch.zeros(2), [1, 1], {"max_tokens": True}, TypeError),
    ],
)
def test_select_validates_arguments(scores, counts, kwargs, error) -> None:
    with pytest.raises(error):
        S.select_blocks(scores, counts, **{"top_k": None, "max_tokens": None, **kwargs})


@given(
    data=st.lists(st.tuples(st.integers(-3, 3), st.integers(0, 20)), max_size=30),
    top_k=st.none() | st.integers(0, 10),
    max_tokens=st.none() | st.integers(0, 100),
)
def test_select_is_greedy_in_score_order(
    data: list[tuple[int, int]], top_k: int | None, max_tokens: int | None
) -> None:
    scores = torch.tensor([float(s) for s, _ in data])
    counts = [c for _, c in data]
    chosen = S.select_blocks(scores, counts, top_k=top_k, max_tokens=max_tokens)
    assert chosen == sorted(set(chosen))
    assert top_k is None or len(chosen) <= top_k
    assert max_tokens is None or sum(counts[i] for i in chosen) <= max_tokens
    # Walking the blocks best first: each block left out either came after the count limit was reached
    # or did not fit in the budget that the blocks chosen before it had left.
    order = sorted(range(len(data)), key=lambda i: (-data[i][0], i))
    picked, total = set(chosen), 0
    for i in order:
        if i in picked:
            total += counts[i]
            continue
        full = top_k is not None and len([j for j in picked if order.index(j) < order.index(i)]) >= top_k
        assert full or (max_tokens is not None and total + counts[i] > max_tokens), (i, chosen)
