"""Tolerances for comparing two computations of the same arithmetic in another order.

Batching frames, splitting a call, another number of threads or another CPU's kernels change
the order in which a reduction adds its terms, and with it the last bits of the result. How far
two such results may be apart follows from the floating-point error bound, not from what one
machine happened to give (issue #20: a test tuned on AMD EPYC failed on an Intel Xeon):

    a dot product of n terms, summed in any order, has |fl(x.y) - x.y| <= gamma_n |x|.|y|,
    gamma_n = n u / (1 - n u), u = eps / 2 the unit roundoff      (Higham, 2002, eq. 3.5)

so two orders differ by at most 2 gamma_n |x|.|y|. A network chains ``depth`` such reductions;
to first order their errors add, each relative to the size of the values it produces (its
layers are normalised, so that size is the result's scale). Hence

    |a - b| <= 2 * depth * gamma_terms * max|b|

with ``terms`` the longest reduction. The bound is a worst case, so it is far from what
reordering gives in practice (about sqrt(n) u instead of n u); a real error (a wrong token, a
wrong reference) is of the order of the values themselves. The checks that compare orders
therefore run in float64, where the bound is about 1e-11 of the values and any bug is many
orders of magnitude beyond it, and a near-tie in a ranking (the tokens STC recomputes) cannot
flip between the two orders.
"""

from __future__ import annotations

import numpy as np
import torch


def gamma(terms: int, dtype: torch.dtype) -> float:
    """Higham's gamma_n for a reduction of ``terms`` terms in ``dtype``."""
    u = torch.finfo(dtype).eps / 2
    if terms * u >= 1:
        raise ValueError(f"{terms} terms are beyond {dtype}'s error bound")
    return terms * u / (1 - terms * u)


def _tensor(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    """A tensor of ``x`` (a numpy array copied: it may be read-only, as Arrow-backed ones are)."""
    return torch.from_numpy(np.array(x)) if isinstance(x, np.ndarray) else torch.as_tensor(x)


def reorder_atol(expected: torch.Tensor | np.ndarray, *, terms: int, depth: int = 1) -> float:
    """The most two orders of the arithmetic that gave ``expected`` may differ by, elementwise."""
    t = _tensor(expected)
    if not t.is_floating_point():
        raise TypeError(f"not a floating-point result: {t.dtype}")
    scale = float(t.abs().max()) if t.numel() else 0.0
    return 2 * depth * gamma(terms, t.dtype) * scale


def assert_reordered_close(actual, expected, *, terms: int, depth: int = 1) -> None:
    """``actual`` and ``expected`` agree within :func:`reorder_atol` (both of one dtype)."""
    a, e = _tensor(actual), _tensor(expected)
    if a.dtype != e.dtype:
        raise TypeError(f"compare results of one precision, not {a.dtype} and {e.dtype}")
    torch.testing.assert_close(a, e, atol=reorder_atol(e, terms=terms, depth=depth), rtol=0)


def rotation_atol(expected: torch.Tensor, *, max_position: int) -> float:
    """Keys rotated by RoPE to a position against keys computed there. Not a reduction: the
    angle ``position * frequency`` (frequencies <= 1) is rounded to within u of itself, and sin
    and cos add an error of the order of u times the angle again in the argument reduction; a
    rotation moves each pair of components by at most their norm times the angle error, and the
    rotation back and forth in a test doubles it. So 4 u max_position max|keys|."""
    u = torch.finfo(expected.dtype).eps / 2
    return 4 * u * max_position * float(expected.abs().max())


def transformer(*, width: int, mlp: int, layers: int, context: int) -> dict[str, int]:
    """``terms`` and ``depth`` of a transformer's forward pass: per layer six reductions in a row
    (Q/K/V, Q.K over the width, the attention-weighted sum over ``context`` tokens, the output
    projection, the MLP's two layers), an embedding before and a head or norm after; the longest
    reduction is over the MLP's units, the width or the context."""
    return {"terms": max(width, mlp, context), "depth": 2 + 6 * layers}


#: DINOv2-S (operators/vision/vit.py) at 224 px: 12 blocks, width 384, MLP 1536, 257 tokens.
DINOV2 = transformer(width=384, mlp=1536, layers=12, context=257)


def of_config(config, context: int) -> dict[str, int]:
    """:func:`transformer` of a Hugging Face text or vision config (its text part if it has one)."""
    config = getattr(config, "text_config", None) or config
    layers = getattr(config, "num_hidden_layers", None) or config.depth
    return transformer(width=config.hidden_size, mlp=config.intermediate_size, layers=layers, context=context)
