"""STC kernels: Triton (run by the interpreter on CPU) against the PyTorch references; dispatch."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from streamvqa.operators.vision import stc_kernels as K

pytestmark = pytest.mark.numerics

# Triton decorates kernels at import time and reads TRITON_INTERPRET then: run them in a fresh interpreter.
INTERPRETER_SCRIPT = textwrap.dedent(
    """
    import os
    assert os.environ["TRITON_INTERPRET"] == "1"
    import torch
    from tests.numerics import reorder_atol
    from streamvqa.operators.vision import stc_kernels as K

    g = torch.Generator().manual_seed(0)
    # cosine: N and D not multiples of the blocks, a zero row (clamped norm)
    k = torch.randn(2, 45, 70, generator=g)
    r = torch.randn(45, 70, generator=g)
    k[1, 3] = 0.0
    got, exp = K.token_cosine(k, r, backend="triton"), K.token_cosine_torch(k, r)
    assert got.shape == exp.shape == (2, 45)
    # a cosine: a dot product and two norms of D = 70 terms, then a division (tests/numerics.py)
    atol = reorder_atol(exp, terms=70, depth=3)
    assert torch.allclose(got, exp, atol=atol, rtol=0), (got - exp).abs().max()
    r3 = torch.randn(2, 45, 70, generator=g)  # one reference per frame
    assert torch.allclose(K.token_cosine(k, r3, backend="triton"), K.token_cosine_torch(k, r3), atol=atol, rtol=0)
    assert torch.allclose(K.token_cosine(k, r.expand(2, 45, 70), backend="triton"), exp, atol=atol, rtol=0)
    # selection: ties resolved by index exactly as a stable sort; k = 0, 1, N
    s = torch.randn(3, 77, generator=g)
    s[0, 10] = s[0, 4]
    s[2] = 0.5
    for kk in (0, 1, 19, 77):
        a, b = K.select_lowest(s, kk, backend="triton"), K.select_lowest_torch(s, kk)
        assert torch.equal(a, b), (kk, a, b)
    # multi-scale score, and pruner/cacher paths end to end through the triton backend
    x = torch.nn.functional.normalize(torch.randn(2, 37, 90, generator=g), dim=-1)
    c1, c2 = x.mean(1), torch.nn.functional.normalize(torch.randn(2, 90, generator=g), dim=-1)
    got, exp = K.multiscale_score(x, c1, c2, backend="triton"), K.multiscale_score_torch(x, c1, c2)
    # squared distances over D = 90 terms, exponentials, a sum over 37 tokens x 2 anchors x 5 scales
    atol = reorder_atol(exp, terms=2 * 5 * 37, depth=3)
    assert torch.allclose(got, exp, atol=atol, rtol=0), (got - exp).abs().max()
    from streamvqa.operators.vision import STCPruneConfig, STCPruner
    t = torch.randn(2, 48, 32, generator=g)
    a = STCPruner(STCPruneConfig(tokens_per_frame=9, backend="triton"))
    b = STCPruner(STCPruneConfig(tokens_per_frame=9, backend="torch"))
    for fa, fb in zip(a.prune(a.init_state(), t, (6, 8)), b.prune(b.init_state(), t, (6, 8))):
        assert torch.equal(fa.index, fb.index)
    from streamvqa.operators.vision import STCCacheConfig, STCCachedEncoder
    from streamvqa.operators.vision.vit import ViT, ViTConfig
    torch.manual_seed(0)
    vit = ViT(ViTConfig(embed_dim=32, depth=2, num_heads=2, pos_grid=4)).eval()
    with torch.no_grad():
        vit.pos_embed.normal_()
    px = torch.randn(6, 3, 56, 56, generator=g)
    px[1] = px[0] + 0.05 * torch.randn(3, 56, 56, generator=g)
    for extra in ({}, {"similarity": "input", "reference": "centre", "budget": "call"}):
        outs = []
        for backend in ("triton", "torch"):
            cfg = STCCacheConfig(cache_interval=4, update_token_ratio=0.3, backend=backend, **extra)
            enc = STCCachedEncoder(vit, config=cfg)
            outs.append(enc.forward_stream(px, enc.state("s")))
        atol = reorder_atol(outs[1], terms=4 * 32, depth=2 + 6 * 2)  # 2 blocks of width 32, MLP 128
        assert torch.allclose(outs[0], outs[1], atol=atol, rtol=0), (extra, (outs[0] - outs[1]).abs().max())
    print("ok")
    """
)


def test_triton_kernels_in_the_interpreter_match_the_references() -> None:
    root = str(Path(__file__).resolve().parents[1])  # the script imports tests.numerics
    env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "STREAMVQA_STC_BACKEND": "auto",
        "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.run(
        [sys.executable, "-c", INTERPRETER_SCRIPT], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip().endswith("ok")


def test_dispatch_picks_torch_on_cpu_and_honours_overrides(monkeypatch) -> None:
    monkeypatch.delenv("STREAMVQA_STC_BACKEND", raising=False)
    x = torch.zeros(1, 2)
    assert K.resolve_backend(x) == "torch"
    assert K.resolve_backend(x, "torch") == "torch"
    monkeypatch.setenv("STREAMVQA_STC_BACKEND", "torch")
    assert K.resolve_backend(x) == "torch"
    with pytest.raises(ValueError, match="unknown"):
        K.resolve_backend(x, "cuda-magic")
    if torch.cuda.is_available() and K.triton_available():
        monkeypatch.delenv("STREAMVQA_STC_BACKEND")
        assert K.resolve_backend(x.cuda()) == "triton"


def test_references_against_plain_formulas() -> None:
    g = torch.Generator().manual_seed(3)
    k, r = torch.randn(2, 9, 16, generator=g), torch.randn(9, 16, generator=g)
    torch.testing.assert_close(
        K.token_cosine(k, r), torch.nn.functional.cosine_similarity(k, r[None], dim=-1)
    )
    s = torch.tensor([[0.3, 0.1, 0.1, 0.9, -1.0]])
    assert K.select_lowest(s, 3).tolist() == [[4, 1, 2]]
    x = torch.zeros(1, 1, 4)
    c = torch.zeros(1, 4)
    assert K.multiscale_score(x, c, c).item() == pytest.approx(10.0)  # 2 anchors x 5 scales x exp(0)
    c2 = torch.tensor([[1.0, 0, 0, 0]])  # |x - c|^2 = 1
    expect = 5 + sum(torch.exp(torch.tensor(-1 / (2 * a))).item() for a in K.SCALES)
    assert K.multiscale_score(x, c, c2).item() == pytest.approx(expect, rel=1e-6)


@pytest.mark.skipif(not (torch.cuda.is_available() and K.triton_available()), reason="needs CUDA + Triton")
def test_triton_on_gpu_matches_reference() -> None:
    g = torch.Generator().manual_seed(1)
    k, r = torch.randn(4, 257, 384, generator=g).cuda(), torch.randn(257, 384, generator=g).cuda()
    torch.testing.assert_close(K.token_cosine_triton(k, r), K.token_cosine_torch(k, r), atol=1e-5, rtol=1e-5)
    s = K.token_cosine_torch(k, r)
    assert torch.equal(K.select_lowest_triton(s, 64), K.select_lowest_torch(s, 64))
    x = torch.nn.functional.normalize(torch.randn(4, 256, 192, generator=g), dim=-1).cuda()
    torch.testing.assert_close(
        K.multiscale_score_triton(x, x.mean(1), x[:, 0]),
        K.multiscale_score_torch(x, x.mean(1), x[:, 0]),
        atol=1e-5,
        rtol=1e-5,
    )
