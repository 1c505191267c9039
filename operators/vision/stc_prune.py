"""STC-Pruner: keep the most distinctive patch tokens of each frame before the language model.

    pruner = STCPruner(STCPruneConfig(tokens_per_frame=64))
    state = pruner.init_state()                       # one per stream
    kept = pruner.prune(state, out.patch_tokens, out.grid)        # one chunk of frames
    kept[0].tokens, kept[0].index, kept[0].positions            # (n, D) original features, flat and (row, col) positions

Per chunk (the frames of one call), with X the raw patch tokens ``(F, N, D)``:

1. keep the ``channel_fraction`` (0.5) of channels with the lowest variance over
   all the chunk's tokens (ties by channel index);
2. L2-normalise every token over those channels: ``z``;
3. ``S(z, c) = sum_{a in {1/8, 1/4, 1/2, 1, 2}} exp(-|z - c|^2 / (2a))``;
   ``score(z) = S(z, mean of z over the frame) + S(z, p)`` where ``p`` is the
   running mean of the past chunks' mean raw tokens, projected the same way
   (those channels, L2-normalised); for a stream's first chunk ``p`` is this
   chunk's own mean;
4. keep the ``n`` tokens with the LOWEST score (ties by index), returned in
   raster order with their original (unnormalised, all-channel) features and
   their grid positions; then fold this chunk's mean into the running mean.

``n`` is ``tokens_per_frame``, a per-frame list, or a curvature tier per frame
(``tiers=["clear", "fuzzy", ...]`` through ``tier_tokens``).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .stc_kernels import multiscale_score

_MAGIC = b"STCP1\n"


@dataclass(frozen=True)
class STCPruneConfig:
    tokens_per_frame: int = 64
    channel_fraction: float = 0.5
    #: tokens per frame for a curvature tier (CurveStream Decision.tier)
    tier_tokens: dict = field(default_factory=lambda: {"clear": 128, "fuzzy": 32})
    backend: str = "auto"

    def __post_init__(self) -> None:
        if self.tokens_per_frame < 0:
            raise ValueError("tokens_per_frame must be >= 0")
        if not 0.0 < self.channel_fraction <= 1.0:
            raise ValueError("channel_fraction must be in (0, 1]")

    def fingerprint(self) -> str:
        return json.dumps({"channel_fraction": self.channel_fraction}, sort_keys=True)


@dataclass
class PrunedFrame:
    """The kept tokens of one frame, in raster order."""

    tokens: torch.Tensor  # (n, D) original patch features
    index: torch.Tensor  # (n,) int64 flat patch index (row * cols + col), ascending
    positions: torch.Tensor  # (n, 2) int64 (row, col) in the patch grid
    scores: torch.Tensor  # (n,) float32 score of each kept token (lower = more distinctive)
    grid: tuple[int, int]

    def __len__(self) -> int:
        return int(self.index.shape[0])


@dataclass
class STCPruneState:
    """Running mean of the past chunks' mean raw tokens (float64, full width) and how many chunks it covers."""

    config_fingerprint: str = ""
    past_mean: np.ndarray | None = None
    chunks: int = 0

    def copy(self) -> STCPruneState:
        return STCPruneState(
            self.config_fingerprint, None if self.past_mean is None else self.past_mean.copy(), self.chunks
        )

    def to_bytes(self) -> bytes:
        meta = {
            "config": self.config_fingerprint,
            "chunks": self.chunks,
            "dim": None if self.past_mean is None else int(self.past_mean.shape[0]),
        }
        header = json.dumps(meta, sort_keys=True).encode()
        body = b"" if self.past_mean is None else self.past_mean.astype("<f8").tobytes()
        return _MAGIC + struct.pack("<I", len(header)) + header + body

    @classmethod
    def from_bytes(cls, blob: bytes) -> STCPruneState:
        if not blob.startswith(_MAGIC):
            raise ValueError("not an STC pruner state blob")
        off = len(_MAGIC)
        (hlen,) = struct.unpack_from("<I", blob, off)
        meta = json.loads(blob[off + 4 : off + 4 + hlen])
        body = blob[off + 4 + hlen :]
        dim = meta["dim"]
        if (dim is None and body) or (dim is not None and len(body) != 8 * dim):
            raise ValueError("STC pruner state blob has the wrong length")
        mean = None if dim is None else np.frombuffer(body, dtype="<f8").astype(np.float64)
        return cls(meta["config"], mean, meta["chunks"])


def select_channels(tokens: torch.Tensor, fraction: float) -> torch.Tensor:
    """Indices (ascending) of the ``fraction`` of channels with the lowest variance over all tokens."""
    d = tokens.shape[-1]
    keep = max(1, math.ceil(fraction * d - 1e-9))
    var = tokens.reshape(-1, d).double().var(dim=0, unbiased=False)
    order = torch.sort(var, stable=True).indices[:keep]
    return torch.sort(order).values


def _project(x: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    sel = x.index_select(-1, channels).float()
    return sel / torch.clamp(sel.norm(dim=-1, keepdim=True), min=1e-12)


class STCPruner:
    def __init__(self, config: STCPruneConfig | None = None) -> None:
        self.config = config or STCPruneConfig()

    def init_state(self) -> STCPruneState:
        return STCPruneState(self.config.fingerprint())

    def tokens_for(
        self, frames: int, n: int | Sequence[int] | None = None, tiers: Sequence[str] | None = None
    ) -> list[int]:
        if tiers is not None:
            if len(tiers) != frames:
                raise ValueError(f"{len(tiers)} tiers for {frames} frames")
            return [int(self.config.tier_tokens[t]) for t in tiers]
        if n is None:
            n = self.config.tokens_per_frame
        if isinstance(n, int):
            return [n] * frames
        if len(n) != frames:
            raise ValueError(f"{len(n)} token counts for {frames} frames")
        return [int(v) for v in n]

    def scores(self, state: STCPruneState, tokens: torch.Tensor) -> torch.Tensor:
        """(F, N, D) raw patch tokens -> (F, N) scores (lower = more distinctive); does not touch ``state``."""
        if tokens.ndim != 3:
            raise ValueError(f"expected (frames, tokens, dim), got {tuple(tokens.shape)}")
        f, _, d = tokens.shape
        if state.past_mean is not None and state.past_mean.shape[0] != d:
            raise ValueError(f"token width {d} does not match the state's {state.past_mean.shape[0]}")
        channels = select_channels(tokens, self.config.channel_fraction)
        z = _project(tokens, channels)
        frame_mean = z.mean(dim=1)
        past = (
            tokens.reshape(-1, d).double().mean(0)
            if state.past_mean is None
            else torch.from_numpy(state.past_mean)
        )
        p = _project(past.to(device=tokens.device, dtype=tokens.dtype)[None], channels).expand(f, -1)
        return multiscale_score(z, frame_mean, p.contiguous(), backend=self.config.backend)

    def prune(
        self,
        state: STCPruneState,
        tokens: torch.Tensor,
        grid: tuple[int, int],
        n: int | Sequence[int] | None = None,
        tiers: Sequence[str] | None = None,
    ) -> list[PrunedFrame]:
        """One chunk (F, N, D) of a stream -> the kept tokens per frame; updates ``state``'s running mean."""
        f, num, d = tokens.shape
        if grid[0] * grid[1] != num:
            raise ValueError(f"grid {grid} does not hold {num} tokens")
        counts = self.tokens_for(f, n, tiers)
        with torch.inference_mode():
            scores = self.scores(state, tokens)
        out = []
        for i, k in enumerate(counts):
            k = max(0, min(k, num))
            low = torch.sort(scores[i], stable=True).indices[:k]
            idx = torch.sort(low).values
            pos = torch.stack([idx // grid[1], idx % grid[1]], dim=1)
            out.append(PrunedFrame(tokens[i, idx], idx, pos, scores[i, idx], grid))
        chunk_mean = tokens.detach().reshape(-1, d).double().mean(0).cpu().numpy()
        if state.past_mean is None:
            state.past_mean, state.chunks = chunk_mean, 1
        else:  # running mean of the chunk means
            state.chunks += 1
            state.past_mean = state.past_mean + (chunk_mean - state.past_mean) / state.chunks
        return out


__all__ = ["PrunedFrame", "STCPruneConfig", "STCPruneState", "STCPruner", "select_channels"]
