"""Moving cached keys to new positions: RoPE re-rotation by a position offset.

The KV memory stores keys **after** RoPE, at the positions they were encoded
at, and every block records that base position. When blocks come back
(window shifted after an eviction, blocks retrieved for a question) they are
laid out contiguously after the attention sinks, and each block's keys are
rotated by ``delta = new_base - old_base``. RoPE rotations compose
(``R(p + d) = R(d) R(p)``), so this equals encoding the keys at the new
positions, up to float rounding, and it is exact for ``delta = 0``.

It holds for the mRoPE of Qwen2/2.5-VL as well: each frequency pair there is
rotated by one of three position components (time, height, width); shifting
all three by the same ``delta`` rotates every pair by ``delta * inv_freq``,
the same operation as for 1-D RoPE. A visual block therefore keeps its
internal (t, h, w) geometry and moves as a whole. The model's
``attention_scaling`` factor (YaRN-style RoPE) is already inside the stored
keys and is not applied twice. Dynamic RoPE variants whose frequencies change
with the sequence length are refused (:func:`inv_freq_of`).

Layout: HF's "rotate_half" convention (frequency ``i`` pairs dimensions ``i``
and ``i + D/2``), which Llama, Qwen2, Qwen2.5-VL, SmolLM2 and Gemma use.
"""

from __future__ import annotations

import torch
from torch import nn

STATIC_ROPE_TYPES = frozenset({"default", "linear", "yarn", "llama3"})


def inv_freq_of(rotary_emb: nn.Module) -> torch.Tensor:
    """The ``(head_dim / 2,)`` inverse frequencies of a transformers rotary embedding module."""
    rope_type = getattr(rotary_emb, "rope_type", "default")
    if rope_type not in STATIC_ROPE_TYPES:
        raise ValueError(
            f"RoPE type {rope_type!r} changes its frequencies with the sequence length; cached keys "
            f"cannot be moved by re-rotation (supported: {', '.join(sorted(STATIC_ROPE_TYPES))})"
        )
    inv_freq = getattr(rotary_emb, "inv_freq", None)
    if not isinstance(inv_freq, torch.Tensor):
        raise ValueError(f"{type(rotary_emb).__name__} has no inv_freq buffer")
    return inv_freq.detach().float().cpu().clone()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def shift_keys(keys: torch.Tensor, delta: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """Keys ``(..., tokens, head_dim)`` encoded at positions ``p`` -> as if encoded at ``p + delta``.

    Computed in float32 and returned in the keys' dtype; ``delta == 0`` returns ``keys`` itself.
    """
    if delta == 0:
        return keys
    head_dim = keys.shape[-1]
    if inv_freq.shape != (head_dim // 2,) or head_dim % 2:
        raise ValueError(f"inv_freq {tuple(inv_freq.shape)} does not fit head_dim {head_dim}")
    angles = float(delta) * inv_freq.to(device=keys.device, dtype=torch.float64)
    angles = torch.cat((angles, angles)).float()
    k32 = keys.float()
    out = k32 * angles.cos() + _rotate_half(k32) * angles.sin()
    return out.to(keys.dtype)
