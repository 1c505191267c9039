"""ReKV block scoring: which spilled KV-cache blocks to bring back for a question.

Each block of the video's KV cache is summarised by its mean key per layer and KV head,
``mean_keys (B, L, KV, D)``. At question time the question's query vectors ``(L, H, D)``
score every block per layer (:func:`score_blocks`): the sum over query heads of the dot
product with the block's mean key of that head's KV group (grouped-query attention: query
head ``h`` reads KV head ``h // (H // KV)``). Since ``sum_{h in g} q_h . k_g = (sum_{h in g}
q_h) . k_g``, the query heads are summed per group first (in PyTorch) and the kernel does one
dot product per (layer, block, KV head).

- :func:`score_blocks` - ``(L, B)`` float32 scores, PyTorch reference (``*_torch``) or Triton
  kernel (``*_triton``), dispatched like :mod:`streamvqa.operators.vision.stc_kernels`;
- :func:`combine_layer_scores` - one score per block: per-layer z-scores averaged over layers;
- :func:`select_blocks` - the best blocks under a block count and a token budget, in time order.

Dispatch (:func:`resolve_backend`): ``backend="auto"`` runs Triton when the tensors are on a
CUDA device and Triton imports, PyTorch otherwise. ``STREAMVQA_KV_BACKEND=torch|triton``
overrides "auto". ``backend="triton"`` on CPU tensors only works under ``TRITON_INTERPRET=1``
(set before Triton is imported), which is how the tests run the kernel without a GPU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import torch

from streamvqa.operators.kernel_dispatch import cdiv, choose_backend

BACKEND_ENV = "STREAMVQA_KV_BACKEND"
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ---------------------------------------------------------------------------- shapes


def _check_shapes(query: torch.Tensor, mean_keys: torch.Tensor) -> tuple[int, int, int, int, int]:
    """``(L, H, KV, D, B)`` of a valid ``query (L, H, D)`` / ``mean_keys (B, L, KV, D)`` pair (ValueError else)."""
    if query.dim() != 3:
        raise ValueError(f"query must be (layers, heads, head_dim), got shape {tuple(query.shape)}")
    if mean_keys.dim() != 4:
        raise ValueError(
            f"mean_keys must be (blocks, layers, kv_heads, head_dim), got shape {tuple(mean_keys.shape)}"
        )
    layers, heads, dim = query.shape
    blocks, k_layers, kv_heads, k_dim = mean_keys.shape
    if k_layers != layers:
        raise ValueError(f"query has {layers} layers but mean_keys has {k_layers}")
    if k_dim != dim:
        raise ValueError(f"query head_dim {dim} != mean_keys head_dim {k_dim}")
    if kv_heads < 1 or heads < 1:
        raise ValueError(f"need at least one query head and one KV head, got {heads} and {kv_heads}")
    if heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of KV heads ({kv_heads})")
    for name, t in (("query", query), ("mean_keys", mean_keys)):
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be a floating tensor, got {t.dtype}")
    if query.device != mean_keys.device:
        raise ValueError(f"query on {query.device} but mean_keys on {mean_keys.device}")
    return layers, heads, kv_heads, dim, blocks


def _grouped_query(query: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """``(L, H, D)`` -> ``(L, KV, D)`` float32: the query heads summed per KV group."""
    layers, heads, dim = query.shape
    return query.float().reshape(layers, kv_heads, heads // kv_heads, dim).sum(2)


# ---------------------------------------------------------------------------- reference


def score_blocks_torch(query: torch.Tensor, mean_keys: torch.Tensor) -> torch.Tensor:
    """query (L, H, D), mean_keys (B, L, KV, D) -> (L, B) float32:
    ``sum_h query[l, h] . mean_keys[b, l, h // (H // KV)]``."""
    _, _, kv_heads, _, _ = _check_shapes(query, mean_keys)
    q = _grouped_query(query, kv_heads)
    return torch.einsum("lkd,blkd->lb", q, mean_keys.float())


# ---------------------------------------------------------------------------- triton


@lru_cache(maxsize=1)
def _triton():
    """The compiled kernel, or None when Triton is missing (imported once, on first use)."""
    try:
        import triton
        import triton.language as tl
    except Exception:  # pragma: no cover - triton is a dependency, but stay usable without it
        return None

    @triton.jit
    def _score_kernel(q_ptr, k_ptr, out_ptr, B, L, KV, D, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
        # q (L, KV, D) float32 (heads summed per group), k (B, L, KV, D) contiguous, out (L, B).
        layer = tl.program_id(0)
        rows = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
        rmask = rows < B
        row_base = rows.to(tl.int64) * L * KV * D + layer * KV * D
        acc = tl.zeros([BLOCK_B], dtype=tl.float32)
        for g in range(0, KV):
            for d0 in range(0, D, BLOCK_D):
                cols = d0 + tl.arange(0, BLOCK_D)
                cmask = cols < D
                qv = tl.load(q_ptr + (layer * KV + g) * D + cols, mask=cmask, other=0.0)
                kv = tl.load(
                    k_ptr + row_base[:, None] + g * D + cols[None, :],
                    mask=rmask[:, None] & cmask[None, :],
                    other=0.0,
                ).to(tl.float32)
                acc += tl.sum(kv * qv[None, :], axis=1)
        tl.store(out_ptr + layer * B + rows, acc, mask=rmask)

    return triton, _score_kernel


def triton_available() -> bool:
    return _triton() is not None


def score_blocks_triton(
    query: torch.Tensor, mean_keys: torch.Tensor, block_b: int = 32, block_d: int = 64
) -> torch.Tensor:
    """Same as :func:`score_blocks_torch`, by a Triton kernel (grid: layers x tiles of ``block_b`` blocks)."""
    layers, _, kv_heads, dim, blocks = _check_shapes(query, mean_keys)
    out = torch.empty((layers, blocks), dtype=torch.float32, device=query.device)
    if blocks == 0 or layers == 0:
        return out
    _, kernel = _triton()
    q = _grouped_query(query, kv_heads).contiguous()
    kernel[(layers, cdiv(blocks, block_b))](
        q, mean_keys.contiguous(), out, blocks, layers, kv_heads, dim, BLOCK_B=block_b, BLOCK_D=block_d
    )
    return out


# ---------------------------------------------------------------------------- dispatch


def resolve_backend(tensor: torch.Tensor, backend: str = "auto") -> str:
    """'triton' or 'torch' for scoring ``tensor``."""
    return choose_backend(
        tensor, backend, env_var=BACKEND_ENV, what="KV scoring", triton_available=triton_available
    )


def score_blocks(query: torch.Tensor, mean_keys: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """query (L, H, D), mean_keys (B, L, KV, D) -> (L, B) float32 block scores per layer."""
    if resolve_backend(query, backend) == "triton":
        return score_blocks_triton(query, mean_keys)
    return score_blocks_torch(query, mean_keys)


# ---------------------------------------------------------------------------- combine, select


def combine_layer_scores(scores: torch.Tensor) -> torch.Tensor:
    """(L, B) -> (B,) float32: each layer's scores standardised across blocks (z-score; a layer whose
    scores are all equal contributes 0), then averaged over layers. One block (or no layer) -> zeros."""
    if scores.dim() != 2:
        raise ValueError(f"scores must be (layers, blocks), got shape {tuple(scores.shape)}")
    layers, blocks = scores.shape
    if layers == 0 or blocks <= 1:
        return torch.zeros(blocks, dtype=torch.float32, device=scores.device)
    s = scores.double()
    centred = s - s.mean(dim=1, keepdim=True)
    std = centred.pow(2).mean(dim=1, keepdim=True).sqrt()
    # Equal scores can leave rounding residue in the mean: treat a spread far below the scores'
    # own magnitude as none.
    scale = s.abs().amax(dim=1, keepdim=True)
    flat = std <= 1e-12 * torch.clamp(scale, min=1e-300)
    z = torch.where(flat, torch.zeros_like(s), centred / torch.where(flat, torch.ones_like(std), std))
    return z.mean(dim=0).float()


def _non_negative_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int or None, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def select_blocks(
    scores: torch.Tensor,
    token_counts: Sequence[int] | torch.Tensor,
    *,
    top_k: int | None,
    max_tokens: int | None,
) -> list[int]:
    """Indices of the blocks to retrieve, ascending (time order).

    Blocks are taken in order of decreasing score (ties: lower index first) while the running
    token total stays within ``max_tokens`` (a block that does not fit is skipped and the next
    one tried), at most ``top_k`` of them. ``None`` lifts a limit.
    """
    if not isinstance(scores, torch.Tensor) or scores.dim() != 1:
        raise ValueError("scores must be a 1-D tensor (blocks,)")
    values = scores.detach().double().cpu().tolist()
    if any(math.isnan(v) for v in values):
        raise ValueError("scores contain NaN")
    if isinstance(token_counts, torch.Tensor):
        if token_counts.dim() != 1 or token_counts.is_floating_point() or token_counts.is_complex():
            raise ValueError("token_counts must be a 1-D integer tensor")
        counts = [int(c) for c in token_counts.tolist()]
    else:
        counts = []
        for c in token_counts:
            if isinstance(c, bool) or not isinstance(c, int):
                raise TypeError(f"token counts must be ints, got {c!r}")
            counts.append(c)
    if len(counts) != len(values):
        raise ValueError(f"{len(values)} scores but {len(counts)} token counts")
    if any(c < 0 for c in counts):
        raise ValueError("token counts must be >= 0")
    limit = None if top_k is None else _non_negative_int("top_k", top_k)
    budget = None if max_tokens is None else _non_negative_int("max_tokens", max_tokens)

    order = sorted(range(len(values)), key=lambda i: (-values[i], i))
    chosen: list[int] = []
    total = 0
    for i in order:
        if limit is not None and len(chosen) >= limit:
            break
        if budget is not None and total + counts[i] > budget:
            continue
        chosen.append(i)
        total += counts[i]
    return sorted(chosen)
