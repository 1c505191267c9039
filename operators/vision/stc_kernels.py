"""Hot loops of STC (STC-Cacher, STC-Pruner): Triton kernels beside PyTorch references.

Three operations, each with a PyTorch reference (``*_torch``) and a Triton
kernel (``*_triton``); the public functions dispatch:

- :func:`token_cosine` - per-token cosine similarity of keys ``(B, N, D)`` with
  a reference ``(N, D)`` (shared) or ``(B, N, D)`` (one per frame): the
  cacher's test of which tokens changed;
- :func:`select_lowest` - the indices of the ``k`` lowest similarities per row,
  ordered by (similarity, index) (a stable ascending sort, cut at ``k``);
- :func:`multiscale_score` - the pruner's score
  ``S(x, c1) + S(x, c2)`` with ``S(x, c) = sum_a exp(-|x - c|^2 / (2a))``,
  ``a in {1/8, 1/4, 1/2, 1, 2}``.

Dispatch (:func:`resolve_backend`): ``backend="auto"`` (the default) runs Triton
when the tensor is on a CUDA device and Triton imports, PyTorch otherwise (CPU).
``STREAMVQA_STC_BACKEND=torch|triton`` overrides "auto". ``backend="triton"``
on CPU tensors only works under ``TRITON_INTERPRET=1`` (set before Triton is
imported: kernels are decorated at import time), which is how the tests run
the kernels without a GPU.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from streamvqa.operators.kernel_dispatch import cdiv, choose_backend

SCALES: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0)
_EPS = 1e-8


# ---------------------------------------------------------------------------- references


def token_cosine_torch(k: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """(B, N, D) x (N, D) or (B, N, D) -> (B, N) cosine similarity (float32), norms clamped at 1e-8."""
    k32, r32 = k.float(), ref.float()
    dot = (k32 * r32).sum(-1)
    den = torch.clamp(k32.norm(dim=-1) * r32.norm(dim=-1), min=_EPS)
    return dot / den


def select_lowest_torch(sims: torch.Tensor, k: int) -> torch.Tensor:
    """(B, N) -> (B, k) int64 indices of the k lowest values, by (value, index)."""
    return torch.sort(sims, dim=-1, stable=True).indices[:, :k]


def multiscale_score_torch(x: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor) -> torch.Tensor:
    """x (B, N, C), anchors c1, c2 (B, C) -> (B, N): S(x, c1) + S(x, c2) (float32)."""
    x32 = x.float()
    out = torch.zeros(x.shape[:2], dtype=torch.float32, device=x.device)
    for c in (c1, c2):
        d2 = ((x32 - c.float()[:, None, :]) ** 2).sum(-1)
        for a in SCALES:
            out = out + torch.exp(-d2 / (2.0 * a))
    return out


# ---------------------------------------------------------------------------- triton


@lru_cache(maxsize=1)
def _triton():
    """The compiled kernels, or None when Triton is missing (imported once, on first use)."""
    try:
        import triton
        import triton.language as tl
    except Exception:  # pragma: no cover - triton is a dependency, but stay usable without it
        return None

    @triton.jit
    def _cosine_kernel(k_ptr, r_ptr, out_ptr, N, D, r_stride_b, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        b = tl.program_id(0)
        rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        dot = tl.zeros([BLOCK_N], dtype=tl.float32)
        kk = tl.zeros([BLOCK_N], dtype=tl.float32)
        rr = tl.zeros([BLOCK_N], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            m = rmask[:, None] & (cols[None, :] < D)
            kv = tl.load(k_ptr + b * N * D + rows[:, None] * D + cols[None, :], mask=m, other=0.0).to(
                tl.float32
            )
            rv = tl.load(r_ptr + b * r_stride_b + rows[:, None] * D + cols[None, :], mask=m, other=0.0).to(
                tl.float32
            )
            dot += tl.sum(kv * rv, axis=1)
            kk += tl.sum(kv * kv, axis=1)
            rr += tl.sum(rv * rv, axis=1)
        den = tl.maximum(tl.sqrt(kk) * tl.sqrt(rr), 1e-8)
        tl.store(out_ptr + b * N + rows, dot / den, mask=rmask)

    @triton.jit
    def _rank_select_kernel(s_ptr, out_ptr, N, K, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
        # rank_i = #{j : s_j < s_i or (s_j == s_i and j < i)}; token i goes to slot rank_i if rank_i < K.
        b = tl.program_id(0)
        ii = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
        imask = ii < N
        si = tl.load(s_ptr + b * N + ii, mask=imask, other=0.0)
        rank = tl.zeros([BLOCK_I], dtype=tl.int32)
        for j0 in range(0, N, BLOCK_J):
            jj = j0 + tl.arange(0, BLOCK_J)
            jmask = jj < N
            sj = tl.load(s_ptr + b * N + jj, mask=jmask, other=0.0)
            before = (sj[None, :] < si[:, None]) | (
                (sj[None, :] == si[:, None]) & (jj[None, :] < ii[:, None])
            )
            before = before & jmask[None, :]
            rank += tl.sum(before.to(tl.int32), axis=1)
        keep = imask & (rank < K)
        tl.store(out_ptr + b * K + rank, ii.to(tl.int64), mask=keep)

    @triton.jit
    def _score_kernel(x_ptr, c1_ptr, c2_ptr, out_ptr, N, C, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
        b = tl.program_id(0)
        rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        d1 = tl.zeros([BLOCK_N], dtype=tl.float32)
        d2 = tl.zeros([BLOCK_N], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            cmask = cols < C
            xv = tl.load(
                x_ptr + b * N * C + rows[:, None] * C + cols[None, :],
                mask=rmask[:, None] & cmask[None, :],
                other=0.0,
            ).to(tl.float32)
            a1 = tl.load(c1_ptr + b * C + cols, mask=cmask, other=0.0).to(tl.float32)
            a2 = tl.load(c2_ptr + b * C + cols, mask=cmask, other=0.0).to(tl.float32)
            e1 = tl.where(cmask[None, :], xv - a1[None, :], 0.0)
            e2 = tl.where(cmask[None, :], xv - a2[None, :], 0.0)
            d1 += tl.sum(e1 * e1, axis=1)
            d2 += tl.sum(e2 * e2, axis=1)
        s = tl.zeros([BLOCK_N], dtype=tl.float32)
        # a in {1/8, 1/4, 1/2, 1, 2}: exp(-d / (2a)) = exp(-d * {4, 2, 1, 1/2, 1/4})
        s += tl.exp(-d1 * 4.0) + tl.exp(-d1 * 2.0) + tl.exp(-d1) + tl.exp(-d1 * 0.5) + tl.exp(-d1 * 0.25)
        s += tl.exp(-d2 * 4.0) + tl.exp(-d2 * 2.0) + tl.exp(-d2) + tl.exp(-d2 * 0.5) + tl.exp(-d2 * 0.25)
        tl.store(out_ptr + b * N + rows, s, mask=rmask)

    return triton, _cosine_kernel, _rank_select_kernel, _score_kernel


def triton_available() -> bool:
    return _triton() is not None


def token_cosine_triton(
    k: torch.Tensor, ref: torch.Tensor, block_n: int = 32, block_d: int = 64
) -> torch.Tensor:
    _, kernel, _, _ = _triton()
    b, n, d = k.shape
    if ref.dim() == 3 and ref.stride(0) == 0:
        ref = ref[0]  # one reference shared by the batch (an expanded view)
    k, ref = k.contiguous(), ref.contiguous()
    stride_b = n * d if ref.dim() == 3 else 0
    out = torch.empty((b, n), dtype=torch.float32, device=k.device)
    kernel[(b, cdiv(n, block_n))](k, ref, out, n, d, stride_b, BLOCK_N=block_n, BLOCK_D=block_d)
    return out


def select_lowest_triton(sims: torch.Tensor, k: int, block_i: int = 32, block_j: int = 64) -> torch.Tensor:
    _, _, kernel, _ = _triton()
    b, n = sims.shape
    k = max(0, min(int(k), n))
    out = torch.empty((b, k), dtype=torch.int64, device=sims.device)
    if k == 0:
        return out
    s = sims.float().contiguous()
    kernel[(b, cdiv(n, block_i))](s, out, n, k, BLOCK_I=block_i, BLOCK_J=block_j)
    return out


def multiscale_score_triton(
    x: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, block_n: int = 32, block_c: int = 64
) -> torch.Tensor:
    _, _, _, kernel = _triton()
    b, n, c = x.shape
    out = torch.empty((b, n), dtype=torch.float32, device=x.device)
    kernel[(b, cdiv(n, block_n))](
        x.contiguous(), c1.contiguous(), c2.contiguous(), out, n, c, BLOCK_N=block_n, BLOCK_C=block_c
    )
    return out


# ---------------------------------------------------------------------------- dispatch


def resolve_backend(tensor: torch.Tensor, backend: str = "auto") -> str:
    """'triton' or 'torch' for an operation on ``tensor``."""
    return choose_backend(
        tensor, backend, env_var="STREAMVQA_STC_BACKEND", what="STC kernel", triton_available=triton_available
    )


def token_cosine(k: torch.Tensor, ref: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    if resolve_backend(k, backend) == "triton":
        return token_cosine_triton(k, ref)
    return token_cosine_torch(k, ref)


def select_lowest(sims: torch.Tensor, k: int, backend: str = "auto") -> torch.Tensor:
    if resolve_backend(sims, backend) == "triton":
        return select_lowest_triton(sims, k)
    return select_lowest_torch(sims, k)


def multiscale_score(
    x: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, backend: str = "auto"
) -> torch.Tensor:
    if resolve_backend(x, backend) == "triton":
        return multiscale_score_triton(x, c1, c2)
    return multiscale_score_torch(x, c1, c2)
