"""A DINOv2-style Vision Transformer in plain PyTorch.

Same architecture and numerics as Hugging Face ``Dinov2Model`` (pre-norm blocks,
LayerScale, exact-erf GELU, LayerNorm eps 1e-6, learned position embeddings
trained on a square grid and bicubically resized to the input's patch grid).

Each block exposes its sub-steps (:meth:`Block.qkv`, :meth:`Block.attention_output`,
:meth:`Block.mlp`) so that a caching encoder (STC-Cacher: per-layer K/V,
attention and MLP outputs of a reference frame) can run the same weights token
by token without re-implementing the model.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ViTConfig:
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    patch_size: int = 14
    in_chans: int = 3
    #: side of the square patch grid the position embeddings were trained on (518 px / 14)
    pos_grid: int = 37
    layer_norm_eps: float = 1e-6
    layerscale: bool = True

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    def to_dict(self) -> dict:
        return asdict(self)


class LayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.lambda1 = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.lambda1


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x)))."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        d = cfg.embed_dim
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.norm1 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d, d)
        self.value = nn.Linear(d, d)
        self.proj = nn.Linear(d, d)
        self.ls1 = LayerScale(d) if cfg.layerscale else nn.Identity()
        self.norm2 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(d, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, d)
        self.ls2 = LayerScale(d) if cfg.layerscale else nn.Identity()

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, N, hd)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Q, K, V of the normalised input, each (B, heads, N, head_dim)."""
        h = self.norm1(x)
        return self._heads(self.query(h)), self._heads(self.key(h)), self._heads(self.value(h))

    def attention_output(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Softmax attention of queries ``q`` over ``k``/``v``, projected: (B, Nq, D), before LayerScale."""
        out = F.scaled_dot_product_attention(q, k, v)
        b, _, n, _ = out.shape
        return self.proj(out.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP branch of the block for residual input ``x`` (before LayerScale)."""
        return self.fc2(F.gelu(self.fc1(self.norm2(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attention_output(*self.qkv(x)))
        return x + self.ls2(self.mlp(x))


class ViT(nn.Module):
    """Patch embedding + CLS token + position embeddings + blocks + final LayerNorm."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.embed_dim
        self.patch_embed = nn.Conv2d(cfg.in_chans, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.pos_grid * cfg.pos_grid, d))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self._pos_cache: dict[tuple, torch.Tensor] = {}

    @property
    def num_prefix_tokens(self) -> int:
        return 1

    def _load_from_state_dict(self, *args, **kwargs):
        self._pos_cache.clear()
        return super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        self._pos_cache.clear()
        return super()._apply(fn, *args, **kwargs)

    def position_embeddings(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """(1, 1 + grid_h*grid_w, D): the trained grid resized bicubically (as DINOv2 does).

        Resizing uses half-pixel centres and a = -0.75 without antialiasing, the
        exact operation of the reference export; the result is cached per grid.
        """
        key = (grid_h, grid_w, self.pos_embed.device, self.pos_embed.dtype, self.pos_embed._version)
        cached = self._pos_cache.get(key)
        if cached is not None:
            return cached
        g = self.cfg.pos_grid
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        if (grid_h, grid_w) != (g, g):
            grid = patch_pos.reshape(1, g, g, -1).permute(0, 3, 1, 2).float()
            grid = F.interpolate(grid, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
            patch_pos = grid.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1).to(self.pos_embed.dtype)
        pos = torch.cat([cls_pos, patch_pos], dim=1).detach()
        self._pos_cache[key] = pos
        return pos

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised pixels -> (B, 1 + N, D) input tokens of block 0."""
        x = self.patch_embed(pixels)  # (B, D, gh, gw)
        b, _, gh, gw = x.shape
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)
        return x + self.position_embeddings(gh, gw)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 1 + N, D) tokens after the final LayerNorm (CLS first)."""
        ps = self.cfg.patch_size
        if pixels.shape[-1] % ps or pixels.shape[-2] % ps:
            raise ValueError(
                f"image side must be a multiple of the patch size {ps}, got {tuple(pixels.shape[-2:])}"
            )
        x = self.embed(pixels)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def grid_for(image_size: tuple[int, int], patch_size: int) -> tuple[int, int]:
    h, w = image_size
    return math.floor(h / patch_size), math.floor(w / patch_size)
