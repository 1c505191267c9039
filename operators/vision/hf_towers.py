"""Hugging Face vision towers (CLIP, SigLIP, the Qwen2.5-VL vision transformer) from a local path.

    encoder = build_encoder("hf-siglip", path="/models/siglip-base-patch16-224", device="cuda")
    out = encoder.encode(frames)          # (B, H, W, 3) uint8 RGB, or a list of frames of any sizes

The directory is a ``save_pretrained`` checkpoint (``config.json`` + safetensors or
``pytorch_model.bin``, single file or sharded), loaded with ``local_files_only=True``:
nothing is downloaded. It may hold the full image-text / vision-language model
(``CLIPModel``, ``SiglipModel``, ``Qwen2_5_VLForConditionalGeneration``) or only its
vision model (``CLIPVisionModel``, ``SiglipVisionModel``,
``Qwen2_5_VisionTransformerPretrainedModel``). Only the vision tower is built and only
its tensors are read: the text model never lands in memory.

Families (detected from ``config.json``'s ``model_type``) and their outputs:

- ``clip`` (``clip``, ``clip_vision_model``): prefix = CLS ``(B, 1, D)``; patches = the
  other ``last_hidden_state`` tokens (before ``post_layernorm``, as LLaVA-style models
  take them); pooled = ``pooler_output`` (``post_layernorm(CLS)``), or with
  ``projection=True`` the projected ``image_embeds`` ``(B, projection_dim)``.
- ``siglip`` (``siglip``, ``siglip_vision_model``): no CLS, prefix ``(B, 0, D)``;
  patches = ``last_hidden_state`` (after ``post_layernorm``); pooled = the
  attention-pooling head (``pooler_output``); a tower without head
  (``vision_use_head=False``) pools by the mean of the patches.
- ``qwen2.5-vl`` (``qwen2_5_vl``, ``qwen2_5_vl_vision``): patches = the tower's output
  after the 2x2 patch merger, ``(B, (H/28)(W/28), out_hidden_size)``, row-major over
  the merged grid; no prefix; pooled = mean of the merged tokens.

Patch tokens are always row-major over ``grid = (rows, cols)``. For Qwen2.5-VL the
grid is the *merged* grid: ``patch_size`` of the encoder is the effective 28 px
(14 px ViT patches x ``spatial_merge_size`` 2); ``vit_patch_size`` and
``merge_size`` keep the raw numbers. Qwen's own patchification orders the 14 px
patches by 2x2 merge groups (group row, group col, row in group, col in group); the
merger concatenates each group's four consecutive tokens, and the tower undoes its
window-attention permutation, so merged token ``r * cols + c`` covers pixels
``[28r, 28r + 28) x [28c, 28c + 28)`` (checked by tests/test_hf_towers.py with a
tower whose only mixing is inside the merge group).

Preprocessing (a :class:`~.preprocess.Preprocess`, so :meth:`VisionEncoder.encode`
resizes and normalises on the device as for DINOv2):

- mean/std: ``preprocessor_config.json`` in the directory when present
  (``image_mean``/``image_std``), else the family's defaults (CLIP and Qwen: the
  OpenAI CLIP statistics; SigLIP: 0.5/0.5).
- size: CLIP from ``crop_size`` (it resizes the short side and crops the centre:
  mode ``center_crop``), SigLIP from ``size`` (``height``/``width``: mode ``squash``),
  else the vision config's ``image_size``. Qwen2.5-VL has no fixed size (its processor
  picks one per image between ``min_pixels`` and ``max_pixels``): the encoder uses a
  fixed ``image_size`` (default 448x448 -> a 16x16 merged grid, 256 tokens like the
  DINOv2 default), which must be a multiple of 28; mode ``squash``.
- ``image_size=`` and ``mode=`` override the above. A CLIP/SigLIP input size other than
  the trained one interpolates the position embeddings (``interpolate_pos_encoding``).
- Resizing is bilinear with antialiasing, where the HF processors resize bicubic
  (CLIP, SigLIP, Qwen): pixels differ slightly from the HF processors' when a frame
  is resized, not otherwise.
- Qwen2.5-VL: each (already normalised) frame is duplicated in time to fill the
  ``temporal_patch_size`` of 2, as Qwen's image processor does for a still image, and
  patchified to ``(B * H/14 * W/14, 3 * 2 * 14 * 14)`` with ``grid_thw = (1, H/14, W/14)``
  per frame; the frames of a batch go through the tower as one packed sequence
  (attention stays within each frame).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Literal, cast

import torch

from .encoder import EncoderOutput, VisionEncoder
from .preprocess import Mode, Preprocess
from .registry import register_encoder

Family = Literal["clip", "siglip", "qwen2.5-vl"]

#: config.json ``model_type`` -> family
MODEL_TYPES: dict[str, Family] = {
    "clip": "clip",
    "clip_vision_model": "clip",
    "siglip": "siglip",
    "siglip_vision_model": "siglip",
    "qwen2_5_vl": "qwen2.5-vl",
    "qwen2_5_vl_vision": "qwen2.5-vl",
}
#: model types that hold the vision settings under ``vision_config``
_FULL_MODEL_TYPES = {"clip", "siglip", "qwen2_5_vl"}

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
_FAMILY_STATS = {
    "clip": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
    "siglip": (SIGLIP_MEAN, SIGLIP_STD),
    "qwen2.5-vl": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
}
QWEN_DEFAULT_SIZE = (448, 448)

_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# Qwen2.5-VL keeps the tower under ``visual.`` (original checkpoints and transformers' own
# save_pretrained) or ``model.visual.`` (a state dict of the 5.x module tree).
_QWEN_KEY_MAPPING = {r"^(model\.)?visual\.": ""}


def _supported() -> str:
    return ", ".join(sorted(MODEL_TYPES))


def read_config(path: str | Path) -> dict[str, Any]:
    """``config.json`` of a local checkpoint, with clear errors for a wrong path or model type."""
    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"vision tower path {str(root)!r} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(
            f"vision tower path {str(root)!r} is not a directory (a save_pretrained folder)"
        )
    config_file = root / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no config.json in {str(root)!r}: not a Hugging Face checkpoint folder")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config_file} is not valid JSON: {exc}") from None
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(
            f"unsupported vision tower model_type {model_type!r} in {config_file}; supported: {_supported()}"
        )
    return config


def detect_family(path: str | Path) -> Family:
    """The tower family (``clip``, ``siglip``, ``qwen2.5-vl``) of a local checkpoint."""
    return MODEL_TYPES[read_config(path)["model_type"]]


def _check_weights(root: Path) -> None:
    if not any((root / name).is_file() for name in _WEIGHT_FILES):
        raise FileNotFoundError(
            f"no model weights in {str(root)!r} (expected one of: {', '.join(_WEIGHT_FILES)})"
        )


def _as_size(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def _size_from_processor(pp: dict[str, Any], key: str) -> tuple[int, int] | None:
    value = pp.get(key)
    if isinstance(value, int):
        return value, value
    if isinstance(value, dict):
        if "height" in value and "width" in value:
            return int(value["height"]), int(value["width"])
        if "shortest_edge" in value and key == "size":
            return int(value["shortest_edge"]), int(value["shortest_edge"])
    return None


def build_preprocess(
    family: Family,
    vision_config: dict[str, Any],
    processor_config: dict[str, Any] | None,
    image_size: int | tuple[int, int] | None = None,
    mode: Mode | None = None,
) -> Preprocess:
    """The :class:`Preprocess` of a tower (see the module docstring for the rules)."""
    pp = processor_config or {}
    mean, std = _FAMILY_STATS[family]
    if pp.get("do_normalize", True) and pp.get("image_mean") and pp.get("image_std"):
        # the ignore: a processor config's mean and std are lists of three (RGB) values
        mean, std = tuple(float(v) for v in pp["image_mean"]), tuple(float(v) for v in pp["image_std"])  # type: ignore[assignment]
    if family == "qwen2.5-vl":
        qwen_size = _as_size(image_size) if image_size is not None else QWEN_DEFAULT_SIZE
        return Preprocess(size=qwen_size, mode=mode or "squash", mean=mean, std=std)
    size = None
    default_mode: Mode = "squash"
    if family == "clip" and pp.get("do_center_crop", True):
        default_mode = "center_crop"
        size = _size_from_processor(pp, "crop_size") if pp else None
    if size is None and pp:
        size = _size_from_processor(pp, "size")
    if size is None:
        size = _as_size(vision_config.get("image_size", 224))
    if image_size is not None:
        size = _as_size(image_size)
    return Preprocess(size=size, mode=mode or default_mode, mean=mean, std=std)


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return value


@contextlib.contextmanager
def _quiet_transformers():
    """Hide the load report (the text tower's weights are 'unexpected' by design) and progress bars."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars_enabled:
            hf_logging.enable_progress_bar()


def load_vision_model(
    path: str | Path, projection: bool = False, dtype: torch.dtype = torch.float32, **hf_kwargs
):
    """Only the vision tower of a local checkpoint -> (family, HF module, raw vision config dict).

    Raises when a weight of the tower is missing from the checkpoint (transformers would
    otherwise initialise it at random with a warning).
    """
    root = Path(path).expanduser()
    config = read_config(root)
    family = MODEL_TYPES[config["model_type"]]
    _check_weights(root)
    full = config["model_type"] in _FULL_MODEL_TYPES
    kwargs: dict[str, Any] = {
        "local_files_only": True,
        "output_loading_info": True,
        "dtype": dtype,
        **hf_kwargs,
    }
    with _quiet_transformers():  # config warnings about the unused text model, the load report
        if family == "clip":
            from transformers import (
                CLIPConfig,
                CLIPVisionConfig,
                CLIPVisionModel,
                CLIPVisionModelWithProjection,
            )

            if full:
                full_cfg = CLIPConfig.from_pretrained(root, local_files_only=True)
                vision_cfg = full_cfg.vision_config
                # the projection size lives on the full config
                vision_cfg.projection_dim = full_cfg.projection_dim
            else:
                vision_cfg = CLIPVisionConfig.from_pretrained(root, local_files_only=True)
            cls = CLIPVisionModelWithProjection if projection else CLIPVisionModel
        elif family == "siglip":
            if projection:
                raise ValueError(
                    "projection=True is for CLIP; SigLIP's pooled output is its attention-pooling head"
                )
            from transformers import SiglipConfig, SiglipVisionConfig, SiglipVisionModel

            if full:
                vision_cfg = SiglipConfig.from_pretrained(root, local_files_only=True).vision_config
            else:
                vision_cfg = SiglipVisionConfig.from_pretrained(root, local_files_only=True)
            cls = SiglipVisionModel
        else:
            if projection:
                raise ValueError(
                    "projection=True is for CLIP; the Qwen2.5-VL tower ends with its patch merger"
                )
            from transformers import Qwen2_5_VLConfig
            from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
            from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
                Qwen2_5_VisionTransformerPretrainedModel,
            )

            if full:
                vision_cfg = Qwen2_5_VLConfig.from_pretrained(root, local_files_only=True).vision_config
            else:
                vision_cfg = Qwen2_5_VLVisionConfig.from_pretrained(root, local_files_only=True)
            cls = Qwen2_5_VisionTransformerPretrainedModel
            kwargs.setdefault("key_mapping", _QWEN_KEY_MAPPING)
        model, info = cls.from_pretrained(root, config=vision_cfg, **kwargs)
    missing = sorted(info.get("missing_keys") or [])
    mismatched = list(info.get("mismatched_keys") or [])
    if missing or mismatched:
        what = []
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            what.append(f"{len(missing)} missing weights ({shown})")
        if mismatched:
            what.append(f"{len(mismatched)} weights of the wrong shape ({mismatched[0]!r} ...)")
        raise ValueError(f"the {family} vision tower in {str(root)!r} is incomplete: {'; '.join(what)}")
    raw_vision = config.get("vision_config", {}) if full else config
    return family, model, raw_vision


class HFVisionTower(VisionEncoder):
    """A Hugging Face CLIP / SigLIP / Qwen2.5-VL vision tower behind the :class:`VisionEncoder` interface."""

    def __init__(
        self,
        model: torch.nn.Module,
        family: Family,
        preprocess: Preprocess,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | str = torch.float32,
        max_batch: int = 32,
        projection: bool = False,
        path: str | None = None,
    ) -> None:
        if family not in _FAMILY_STATS:
            raise ValueError(f"unknown vision tower family {family!r}")
        self.family = family
        self.name = f"hf-{family}"
        self.path = path
        self.device = torch.device(device)
        self.dtype = _as_dtype(dtype)
        # Any: an HF vision model, its config's fields looked up by name
        self.model: Any = model.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        self.projection = projection
        self.max_batch = max_batch
        self.preprocess_spec = preprocess
        cfg: Any = model.config  # an HF config: fields by name
        if family == "qwen2.5-vl":
            self.vit_patch_size = int(cfg.patch_size)
            self.merge_size = int(cfg.spatial_merge_size)
            self.temporal_patch_size = int(cfg.temporal_patch_size)
            self.patch_size = self.vit_patch_size * self.merge_size  # one output token per 28x28 pixels
            self.embed_dim = int(cfg.out_hidden_size)
            self.num_prefix_tokens = 0
        else:
            self.vit_patch_size = self.patch_size = int(cfg.patch_size)
            self.merge_size = 1
            self.embed_dim = int(cfg.hidden_size)
            self.num_prefix_tokens = 1 if family == "clip" else 0
        if any(side % self.patch_size for side in preprocess.size):
            raise ValueError(
                f"input size {preprocess.size} is not a multiple of patch size {self.patch_size}"
                + (" (14 px patches x 2x2 merge)" if family == "qwen2.5-vl" else "")
            )

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | str = torch.float32,
        image_size: int | tuple[int, int] | None = None,
        mode: Mode | None = None,
        projection: bool = False,
        max_batch: int = 32,
        family: Family | None = None,
        **hf_kwargs,
    ) -> HFVisionTower:
        """Load the vision tower of a local checkpoint (``family`` given: check that it matches)."""
        root = Path(path).expanduser()
        detected = detect_family(root)
        if family is not None and family != detected:
            model_type = read_config(root)["model_type"]
            raise ValueError(
                f"{str(root)!r} holds a {model_type!r} checkpoint ({detected}), not {family}: "
                f"use build_encoder('hf-{detected}', ...) or 'hf-vision'"
            )
        torch_dtype = _as_dtype(dtype)
        family, model, raw_vision = load_vision_model(
            root, projection=projection, dtype=torch_dtype, **hf_kwargs
        )
        processor_file = root / "preprocessor_config.json"
        processor = json.loads(processor_file.read_text()) if processor_file.is_file() else None
        spec = build_preprocess(family, raw_vision, processor, image_size=image_size, mode=mode)
        return cls(
            model,
            family,
            spec,
            device=device,
            dtype=torch_dtype,
            max_batch=max_batch,
            projection=projection,
            path=str(root),
        )

    # -- Qwen2.5-VL -----------------------------------------------------------------------------

    def patchify(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) -> Qwen's packed patches (B * H/14 * W/14, 3 * T * 14 * 14) and grid_thw (B, 3).

        The same layout as transformers' Qwen2-VL image processor: patches ordered by 2x2
        merge group (group row, group col, row in group, col in group), each flattened as
        (channel, time, y, x), the still frame repeated ``temporal_patch_size`` times.
        """
        b, c, h, w = pixels.shape
        p, m, t = self.vit_patch_size, self.merge_size, self.temporal_patch_size
        gh, gw = h // p, w // p
        x = pixels.reshape(b, c, gh // m, m, p, gw // m, m, p)
        x = x.permute(0, 2, 5, 3, 6, 1, 4, 7)  # (B, gh/m, gw/m, m, m, C, p, p)
        x = x.unsqueeze(6).expand(*x.shape[:6], t, p, p)  # (B, gh/m, gw/m, m, m, C, T, p, p)
        flat = x.reshape(b * gh * gw, c * t * p * p)
        grid_thw = torch.tensor([[1, gh, gw]] * b, dtype=torch.long, device=pixels.device)
        return flat, grid_thw

    def _encode_qwen(self, pixels: torch.Tensor) -> EncoderOutput:
        flat, grid_thw = self.patchify(pixels)
        merged = self.model(flat, grid_thw=grid_thw).pooler_output  # (B * N, out_hidden_size)
        b = pixels.shape[0]
        patches = merged.reshape(b, -1, merged.shape[-1])
        grid = (pixels.shape[-2] // self.patch_size, pixels.shape[-1] // self.patch_size)
        prefix = patches.new_zeros((b, 0, patches.shape[-1]))
        return EncoderOutput(
            patch_tokens=patches, prefix_tokens=prefix, pooled=patches.mean(dim=1), grid=grid
        )

    # -- CLIP / SigLIP --------------------------------------------------------------------------

    def encode_pixels(self, pixels: torch.Tensor) -> EncoderOutput:
        if self.family == "qwen2.5-vl":
            return self._encode_qwen(pixels)
        interpolate = tuple(pixels.shape[-2:]) != _as_size(self.model.config.image_size)
        out = self.model(pixel_values=pixels, interpolate_pos_encoding=interpolate)
        tokens = out.last_hidden_state
        p = self.num_prefix_tokens
        prefix, patches = tokens[:, :p], tokens[:, p:]
        if self.family == "clip":
            pooled = out.image_embeds if self.projection else out.pooler_output
        else:
            pooled = out.pooler_output if out.pooler_output is not None else patches.mean(dim=1)
        grid = (pixels.shape[-2] // self.patch_size, pixels.shape[-1] // self.patch_size)
        return EncoderOutput(patch_tokens=patches, prefix_tokens=prefix, pooled=pooled, grid=grid)

    def describe(self) -> dict:
        info = {**super().describe(), "family": self.family, "path": self.path}
        if self.family == "qwen2.5-vl":
            info |= {"vit_patch_size": self.vit_patch_size, "merge_size": self.merge_size, "pool": "mean"}
        elif self.family == "clip":
            info["pool"] = (
                "image_embeds (projected CLS)" if self.projection else "pooler_output (post_layernorm CLS)"
            )
        else:
            info["pool"] = "attention-pooling head"
        return info


def _factory(family: Family | None):
    def build(
        path: str | Path,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | str = torch.float32,
        **kwargs,
    ) -> HFVisionTower:
        return HFVisionTower.from_pretrained(path, device=device, dtype=dtype, family=family, **kwargs)

    build.__name__ = f"_hf_{(family or 'vision').replace('.', '_').replace('-', '_')}"
    build.__doc__ = f"Build the {family or 'detected'} vision tower of the local checkpoint at ``path``."
    return build


for _name, _family in (("hf-clip", "clip"), ("hf-siglip", "siglip"), ("hf-qwen2.5-vl", "qwen2.5-vl")):
    register_encoder(_name)(_factory(cast(Family, _family)))
register_encoder("hf-vision")(_factory(None))
