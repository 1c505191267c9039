"""A transformers 5.x decoder seen the way the KV memory needs it.

:class:`DecoderAdapter` wraps a causal LM (Llama, SmolLM2, Qwen2, ...) or the
language model inside a video LM (Qwen2.5-VL, LLaVA-OneVision) and offers one
operation, :meth:`DecoderAdapter.forward`: run a chunk of embeddings at given
positions over a given past (per-layer keys and values), and return the new
tokens' keys and values (post-RoPE, as the attention used them), the logits
asked for, and optionally the pre-RoPE keys or queries of the chunk's tokens
(whose means are the ReKV block representative and question vector), captured
by forward hooks on the attention projections.

Nothing here keeps state between calls: the past comes in, the new KV goes out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .rope import inv_freq_of


@dataclass(frozen=True)
class ChunkOutput:
    """What one forward over a chunk produced (tensors on the model's device)."""

    keys: torch.Tensor | None  # (layers, kv_heads, tokens, head_dim), post-RoPE (None: not asked)
    values: torch.Tensor | None  # (layers, kv_heads, tokens, head_dim)
    logits: torch.Tensor | None  # (tokens_kept, vocab) float32, or None
    pre_rope_keys: torch.Tensor | None  # (layers, kv_heads, tokens, head_dim) float32, when captured
    pre_rope_queries: torch.Tensor | None  # (layers, heads, tokens, head_dim) float32, when captured
    cache: object  # the transformers DynamicCache after the chunk (past + chunk): decode goes on in it


def _find_decoder(model: nn.Module) -> tuple[Any, Any]:
    """(decoder with .layers/.embed_tokens/.rotary_emb, lm_head) of a causal or video LM.
    Any: the HF modules' attributes (config, layers, weight) are looked up by name."""
    lm_head = getattr(model, "lm_head", None)
    inner = getattr(model, "model", None)
    candidates = [getattr(inner, "language_model", None), inner, getattr(model, "language_model", None)]
    for decoder in candidates:
        if decoder is not None and all(hasattr(decoder, a) for a in ("layers", "embed_tokens", "rotary_emb")):
            if lm_head is None:
                break
            return decoder, lm_head
    raise TypeError(
        f"{type(model).__name__} is not a supported decoder LM: need .lm_head and a decoder with "
        "layers, embed_tokens and rotary_emb (Llama/Qwen2/SmolLM2, Qwen2.5-VL, LLaVA-OneVision)"
    )


class DecoderAdapter:
    """One HF decoder LM, its geometry and a stateless chunk forward."""

    def __init__(self, model: nn.Module, *, model_id: str | None = None) -> None:
        self.model = model.eval()
        self.decoder, self.lm_head = _find_decoder(model)
        config = self.decoder.config
        self.config = config
        self.model_id = model_id or getattr(model.config, "_name_or_path", "") or type(model).__name__
        self.num_layers = len(self.decoder.layers)
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.hidden_size = config.hidden_size
        rope_params = getattr(config, "rope_parameters", None) or {}
        self.mrope = "mrope_section" in rope_params
        self.inv_freq = inv_freq_of(self.decoder.rotary_emb)
        if self.inv_freq.shape != (self.head_dim // 2,):
            raise ValueError(
                f"partial RoPE (inv_freq {tuple(self.inv_freq.shape)}, head_dim {self.head_dim}) is not supported"
            )
        self.max_positions = getattr(config, "max_position_embeddings", None)
        self._capture: frozenset[str] = frozenset()
        self._captured: dict[str, list[torch.Tensor | None]] = {}
        for i, layer in enumerate(self.decoder.layers):
            attn = layer.self_attn
            # Pre-RoPE key/query: after the projection (and its per-head norm where the model has one).
            k_mod = getattr(attn, "k_norm", None) or attn.k_proj
            q_mod = getattr(attn, "q_norm", None) or attn.q_proj
            k_mod.register_forward_hook(self._hook(i, "keys"))
            q_mod.register_forward_hook(self._hook(i, "queries"))

    def _hook(self, index: int, kind: str):
        def hook(_module, _inputs, output):
            if kind in self._capture:
                heads = self.num_kv_heads if kind == "keys" else self.num_heads
                x = output.float().reshape(output.shape[0], output.shape[1], heads, self.head_dim)
                self._captured[kind][index] = x[0].transpose(0, 1)  # (heads, tokens, head_dim)

        return hook

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """(tokens,) int ids -> (tokens, hidden) embeddings."""
        return self.decoder.embed_tokens(token_ids.to(self.device))

    def _cache(self, past: tuple[torch.Tensor, torch.Tensor] | None):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.config)
        if past is not None and past[0].shape[2] > 0:
            keys, values = past
            for i in range(self.num_layers):
                cache.update(keys[i][None], values[i][None], i)
        return cache

    @torch.no_grad()
    def forward(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
        *,
        logits: str = "none",
        capture: str | tuple[str, ...] | None = None,
        cache=None,
        return_kv: bool = True,
    ) -> ChunkOutput:
        """Run ``embeds`` ``(tokens, hidden)`` at ``positions`` (``(tokens,)``, or ``(3, tokens)`` for
        mRoPE) after ``past`` = (keys, values) each ``(layers, kv_heads, past_tokens, head_dim)``.

        ``logits``: "none", "last" or "all". ``capture``: None, "keys", "queries" or both in a
        tuple (pre-RoPE, per token).
        ``cache``: a DynamicCache returned by an earlier call, to go on in it (then ``past`` is None).
        """
        if embeds.dim() != 2 or embeds.shape[1] != self.hidden_size:
            raise ValueError(f"embeds must be (tokens, {self.hidden_size}), got {tuple(embeds.shape)}")
        n = embeds.shape[0]
        if n == 0:
            raise ValueError("empty chunk")
        positions = positions.to(self.device, torch.int64)
        if positions.dim() == 1:
            if positions.shape != (n,):
                raise ValueError(f"positions {tuple(positions.shape)} for {n} tokens")
            position_ids = positions.view(1, 1, n).expand(3, 1, n) if self.mrope else positions[None]
        elif positions.dim() == 2 and positions.shape == (3, n):
            if not self.mrope:
                raise ValueError("3-D (t, h, w) positions need a model with mRoPE (Qwen2/2.5-VL)")
            position_ids = positions[:, None, :]
        else:
            raise ValueError(f"positions must be ({n},) or (3, {n}), got {tuple(positions.shape)}")
        if cache is not None:
            if past is not None:
                raise ValueError("give past or cache, not both")
            past_len = cache.get_seq_length()
        else:
            past_len = 0 if past is None else past[0].shape[2]
            cache = self._cache(past)
        wanted = frozenset((capture,) if isinstance(capture, str) else capture or ())
        if not wanted <= {"keys", "queries"}:
            raise ValueError(f"capture must name keys and/or queries, got {capture!r}")
        self._capture = wanted
        self._captured = {kind: [None] * self.num_layers for kind in wanted}
        try:
            out = self.decoder(
                inputs_embeds=embeds.to(self.device, self.dtype)[None],
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
            )
        finally:
            self._capture = frozenset()
        hidden = out.last_hidden_state[0]
        if logits == "last":
            logit_values = self.lm_head(hidden[-1:]).float()
        elif logits == "all":
            logit_values = self.lm_head(hidden).float()
        elif logits == "none":
            logit_values = None
        else:
            raise ValueError(f"logits must be none, last or all, got {logits!r}")
        keys = values = None
        if return_kv:
            keys = torch.stack([cache.layers[i].keys[0, :, past_len:] for i in range(self.num_layers)])
            values = torch.stack([cache.layers[i].values[0, :, past_len:] for i in range(self.num_layers)])
        captured = {kind: torch.stack(layers) for kind, layers in self._captured.items()}  # type: ignore[arg-type]
        return ChunkOutput(
            keys=keys,
            values=values,
            logits=logit_values,
            pre_rope_keys=captured.get("keys"),
            pre_rope_queries=captured.get("queries"),
            cache=cache,
        )
