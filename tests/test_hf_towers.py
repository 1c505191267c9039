"""Hugging Face vision towers (CLIP, SigLIP, Qwen2.5-VL) behind the VisionEncoder interface.

Tiny random-weight models are built offline from configs, saved with ``save_pretrained``
into a temporary folder and loaded back through the registry; every check compares the
adapter with the original in-memory HF model on the same pixels.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

import streamvqa.operators.vision.hf_towers as hf_towers  # registers the hf-* encoders
from streamvqa.operators.vision import available_encoders, build_encoder
from streamvqa.operators.vision.hf_towers import HFVisionTower, detect_family
from tests.numerics import assert_reordered_close, transformer

TINY_TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    vocab_size=99,
    max_position_embeddings=16,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
TINY_VIT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=32,
    patch_size=8,
)
TINY_QWEN_VISION = dict(
    depth=2,
    hidden_size=32,
    intermediate_size=64,
    num_heads=2,
    out_hidden_size=48,
    window_size=56,
    fullatt_block_indexes=[1],
)

# Both tiny towers: 2 layers of width 32 and MLP 64 over at most 64 tokens (tests/numerics.py);
# the projection/merger adds one reduction of at most 4 x 32 terms.
TOWER = transformer(width=32, mlp=4 * 32, layers=2, context=64)
TOWER["depth"] += 1
pytestmark = pytest.mark.numerics


def _quiet_save(model, path: Path) -> Path:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model.save_pretrained(path)
    hf_logging.enable_progress_bar()
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module]]:
    """name -> (checkpoint folder, the in-memory model that wrote it)."""
    from transformers import (
        CLIPConfig,
        CLIPModel,
        CLIPVisionConfig,
        CLIPVisionModel,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        SiglipConfig,
        SiglipModel,
        SiglipVisionConfig,
        SiglipVisionModel,
    )
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    built = {
        "clip": CLIPModel(CLIPConfig(text_config=TINY_TEXT, vision_config=TINY_VIT, projection_dim=16)),
        "clip_vision": CLIPVisionModel(CLIPVisionConfig(**TINY_VIT)),
        "siglip": SiglipModel(SiglipConfig(text_config=TINY_TEXT, vision_config=TINY_VIT)),
        "siglip_vision": SiglipVisionModel(SiglipVisionConfig(**TINY_VIT)),
        "qwen": Qwen2_5_VLForConditionalGeneration(
            Qwen2_5_VLConfig(
                text_config=dict(
                    hidden_size=32,
                    intermediate_size=64,
                    num_hidden_layers=1,
                    num_attention_heads=2,
                    num_key_value_heads=1,
                    vocab_size=99,
                    bos_token_id=1,
                    eos_token_id=2,
                    rope_parameters={
                        "rope_type": "default",
                        "rope_theta": 10000.0,
                        "mrope_section": [2, 3, 3],
                    },
                ),
                vision_config=TINY_QWEN_VISION,
            )
        ),
        # no transformer block: each merged token sees only its own 28x28 pixels (token order check)
        "qwen_local": Qwen2_5_VisionTransformerPretrainedModel(
            Qwen2_5_VLVisionConfig(**{**TINY_QWEN_VISION, "depth": 0, "fullatt_block_indexes": []})
        ),
    }
    out = {}
    for name, model in built.items():
        # random init leaves some weights at exactly 0/1 (norms, biases): perturb them so that a
        # weight the adapter failed to load would show in the comparisons
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        out[name] = (_quiet_save(model.eval(), root / name), model)
    return out


def _frames(count: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(count, h, w, 3), dtype=np.uint8)


CASES = [  # fixture name, registry name, family, has CLS
    ("clip", "hf-clip", "clip", True),
    ("clip_vision", "hf-clip", "clip", True),
    ("siglip", "hf-siglip", "siglip", False),
    ("siglip_vision", "hf-siglip", "siglip", False),
]


def test_registry_names_and_detection(models) -> None:
    assert {"hf-clip", "hf-siglip", "hf-qwen2.5-vl", "hf-vision"} <= set(available_encoders())
    expected = {"clip": "clip", "clip_vision": "clip", "siglip": "siglip", "siglip_vision": "siglip"}
    expected |= {"qwen": "qwen2.5-vl", "qwen_local": "qwen2.5-vl"}
    assert {name: detect_family(path) for name, (path, _) in models.items()} == expected


@pytest.mark.parametrize(("fixture", "registry_name", "family", "has_cls"), CASES)
def test_clip_siglip_tokens_match_the_hf_model(models, fixture, registry_name, family, has_cls) -> None:
    path, reference = models[fixture]
    enc = build_encoder(registry_name, path=str(path), device="cpu")
    assert isinstance(enc, HFVisionTower) and enc.family == family and enc.name == f"hf-{family}"
    assert enc.grid == (4, 4) and enc.embed_dim == 32 and enc.num_prefix_tokens == int(has_cls)
    # only the vision tower is loaded
    assert "Vision" in type(enc.model).__name__
    assert not any(n.startswith("text_model") for n, _ in enc.model.named_parameters())

    frames = _frames(3, 40, 48)
    out = enc.encode(frames)
    assert out.patch_tokens.shape == (3, 16, 32) and out.grid == (4, 4)
    assert out.prefix_tokens.shape == (3, int(has_cls), 32)
    assert out.pooled.shape == (3, 32) and out.patch_tokens.dtype == torch.float32

    vision = reference.vision_model if hasattr(reference, "text_model") else reference
    with torch.inference_mode():
        ref = vision(pixel_values=enc.preprocess(frames))
    assert_reordered_close(out.tokens, ref.last_hidden_state, **TOWER)
    assert_reordered_close(out.pooled, ref.pooler_output, **TOWER)
    if has_cls:  # CLS first, then the patches
        torch.testing.assert_close(out.prefix_tokens[:, 0], ref.last_hidden_state[:, 0])

    # deterministic, and a batch equals its frames one by one (and micro-batches)
    torch.testing.assert_close(enc.encode(frames).patch_tokens, out.patch_tokens, atol=0, rtol=0)
    single = torch.cat([enc.encode(f[None]).patch_tokens for f in frames])
    assert_reordered_close(single, out.patch_tokens, **TOWER)
    enc.max_batch = 2
    assert_reordered_close(enc.encode(frames).pooled, out.pooled, **TOWER)

    mixed = [frames[0], _frames(1, 20, 70, seed=1)[0], frames[2]]  # frames of different sizes
    out_mixed = enc.encode(mixed)
    assert out_mixed.patch_tokens.shape == (3, 16, 32)
    assert_reordered_close(out_mixed.patch_tokens[[0, 2]], out.patch_tokens[[0, 2]], **TOWER)


def test_clip_projection_and_other_input_sizes(models) -> None:
    path, reference = models["clip"]
    enc = build_encoder("hf-clip", path=path, projection=True)
    frames = _frames(2, 32, 32)
    out = enc.encode(frames)
    assert out.pooled.shape == (2, 16)  # projection_dim
    with torch.inference_mode():
        ref = reference.get_image_features(pixel_values=enc.preprocess(frames))
    ref = getattr(ref, "pooler_output", ref)  # transformers 5: a model output, 4.x: the tensor
    assert_reordered_close(out.pooled, ref, **TOWER)
    assert enc.describe()["pool"].startswith("image_embeds")
    # a vision-only checkpoint has no visual_projection: a clear error, not random weights
    with pytest.raises(ValueError, match=r"missing weights.*visual_projection"):
        build_encoder("hf-clip", path=models["clip_vision"][0], projection=True)
    # another input size interpolates the position embeddings; the patch grid follows
    wide = build_encoder("hf-siglip", path=models["siglip"][0], image_size=(32, 64))
    out = wide.encode(_frames(2, 30, 60))
    assert out.grid == wide.grid == (4, 8) and out.patch_tokens.shape == (2, 32, 32)
    assert torch.isfinite(out.patch_tokens).all()
    with pytest.raises(ValueError, match="multiple of patch size"):
        build_encoder("hf-clip", path=path, image_size=30)


def test_bfloat16_and_string_dtype(models) -> None:
    enc = build_encoder("hf-vision", path=models["siglip_vision"][0], dtype="bfloat16")
    out = enc.encode(_frames(2, 32, 32))
    assert out.patch_tokens.dtype == out.pooled.dtype == torch.bfloat16
    ref = build_encoder("hf-vision", path=models["siglip_vision"][0]).encode(_frames(2, 32, 32))
    cos = torch.nn.functional.cosine_similarity(out.pooled.float(), ref.pooled, dim=-1)
    assert cos.min() > 0.99
    assert enc.describe()["dtype"] == "bfloat16"


def test_preprocessing_from_the_processor_config(models, tmp_path) -> None:
    clip_dir = tmp_path / "clip"
    shutil.copytree(models["clip"][0], clip_dir)
    (clip_dir / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "CLIPImageProcessor",
                "do_center_crop": True,
                "crop_size": {"height": 48, "width": 48},
                "size": {"shortest_edge": 48},
                "image_mean": [0.1, 0.2, 0.3],
                "image_std": [0.4, 0.5, 0.6],
            }
        )
    )
    spec = build_encoder("hf-clip", path=clip_dir).preprocess_spec
    assert spec.size == (48, 48) and spec.mode == "center_crop"
    assert spec.mean == (0.1, 0.2, 0.3) and spec.std == (0.4, 0.5, 0.6)
    # without a processor config: the config's image_size and the family defaults
    spec = build_encoder("hf-clip", path=models["clip"][0]).preprocess_spec
    assert spec.size == (32, 32) and spec.mode == "center_crop" and spec.mean == hf_towers.OPENAI_CLIP_MEAN
    spec = build_encoder("hf-siglip", path=models["siglip"][0], mode="letterbox").preprocess_spec
    assert spec.size == (32, 32) and spec.mode == "letterbox" and spec.mean == (0.5, 0.5, 0.5)
    siglip = hf_towers.build_preprocess(
        "siglip",
        {"image_size": 224},
        {"size": {"height": 384, "width": 384}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3},
    )
    assert siglip.size == (384, 384) and siglip.mode == "squash"
    qwen = hf_towers.build_preprocess(
        "qwen2.5-vl", {}, {"min_pixels": 3136, "image_mean": [0.3] * 3, "image_std": [0.2] * 3}
    )
    assert qwen.size == hf_towers.QWEN_DEFAULT_SIZE == (448, 448) and qwen.mean == (0.3, 0.3, 0.3)


def test_qwen_tower_matches_the_full_model_and_its_image_processor(models) -> None:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    path, full = models["qwen"]
    enc = build_encoder("hf-qwen2.5-vl", path=path, image_size=(112, 84))
    assert "language_model" not in dict(enc.model.named_children())
    assert enc.grid == (4, 3) and enc.patch_size == 28 and enc.vit_patch_size == 14 and enc.embed_dim == 48
    frames = _frames(3, 112, 84)  # already at the input size: no resize, so pixels equal the HF processor's
    out = enc.encode(frames)
    assert out.patch_tokens.shape == (3, 12, 48) and out.grid == (4, 3)
    assert out.prefix_tokens.shape == (3, 0, 48)
    torch.testing.assert_close(out.pooled, out.patch_tokens.mean(dim=1))

    processor = Qwen2VLImageProcessorPil(do_resize=False)
    inputs = processor(images=list(frames), return_tensors="pt")
    flat, grid_thw = enc.patchify(enc.preprocess(frames))
    assert grid_thw.tolist() == inputs["image_grid_thw"].tolist() == [[1, 8, 6]] * 3
    torch.testing.assert_close(flat, inputs["pixel_values"], atol=1e-5, rtol=1e-5)

    with torch.inference_mode():
        ref = full.get_image_features(
            pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"]
        )
    ref = torch.stack(list(ref.pooler_output))  # one (12, 48) tensor per image
    assert_reordered_close(out.patch_tokens, ref, **TOWER)

    # deterministic; batch == one by one; frames of other sizes are resized to the fixed input
    torch.testing.assert_close(enc.encode(frames).patch_tokens, out.patch_tokens, atol=0, rtol=0)
    single = torch.cat([enc.encode(f[None]).patch_tokens for f in frames])
    assert_reordered_close(single, out.patch_tokens, **TOWER)
    mixed = enc.encode([frames[0], _frames(1, 50, 90, seed=3)[0]])
    assert mixed.patch_tokens.shape == (2, 12, 48)
    assert_reordered_close(mixed.patch_tokens[0], out.patch_tokens[0], **TOWER)
    with pytest.raises(ValueError, match="multiple of patch size 28"):
        build_encoder("hf-qwen2.5-vl", path=path, image_size=(112, 70))


def test_qwen_merged_tokens_are_row_major(models) -> None:
    """A tower without blocks mixes pixels only inside a 28x28 merge group: perturbing the group
    at (r, c) changes merged token r * cols + c and nothing else."""
    enc = build_encoder("hf-vision", path=models["qwen_local"][0], image_size=(56, 112))
    assert enc.family == "qwen2.5-vl" and enc.grid == (2, 4)
    pixels = torch.randn(1, 3, 56, 112, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        base = enc.encode_pixels(pixels).patch_tokens[0]
        for r, c in [(0, 0), (0, 3), (1, 1), (1, 2)]:
            moved = pixels.clone()
            moved[..., 28 * r : 28 * r + 28, 28 * c : 28 * c + 28] += 1.0
            changed = (enc.encode_pixels(moved).patch_tokens[0] - base).abs().amax(dim=-1) > 1e-6
            assert changed.nonzero().flatten().tolist() == [r * 4 + c]


def test_errors(models, tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_encoder("hf-siglip", path=tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"no config.json"):
        build_encoder("hf-vision", path=tmp_path)
    vit = tmp_path / "vit"
    vit.mkdir()
    (vit / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(ValueError, match=r"unsupported.*'vit'.*supported: clip, clip_vision_model.*siglip"):
        build_encoder("hf-vision", path=vit)
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(models["siglip"][0] / "config.json", no_weights)
    with pytest.raises(FileNotFoundError, match="no model weights"):
        build_encoder("hf-siglip", path=no_weights)
    with pytest.raises(ValueError, match=r"not siglip.*hf-clip"):
        build_encoder("hf-siglip", path=models["clip"][0])
    # a checkpoint that lacks some tower weights fails loudly (transformers would init them at random)
    from safetensors.torch import load_file, save_file

    partial = tmp_path / "partial"
    shutil.copytree(models["qwen"][0], partial)
    state = load_file(partial / "model.safetensors")
    save_file(
        {k: v for k, v in state.items() if not k.startswith("visual.merger")}, partial / "model.safetensors"
    )
    with pytest.raises(ValueError, match=r"incomplete.*missing weights.*merger"):
        build_encoder("hf-qwen2.5-vl", path=partial)
