"""The CurveStream operator: routing rules, decision log, snapshot/restore, state format, real video."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamvqa.operators.curvature import (
    CurveStream,
    CurveStreamConfig,
    CurveStreamState,
    FrameInput,
    budget_for,
    check_invariants,
    codec,
    curvature_scores,
    frames_from_features,
    replay,
)

D = 32


def walk(seed: int, t: int = 160, cuts: tuple[int, ...] = (30, 70, 110, 140)) -> np.ndarray:
    """Small steps inside scenes, a jump at each cut."""
    rng = np.random.default_rng(seed)
    f = np.cumsum(rng.standard_normal((t, D)) * 0.02, axis=0) + rng.standard_normal(D)
    for c in cuts:
        f[c:] += rng.standard_normal(D) * 1.5
    return f


def small_config(**kw) -> CurveStreamConfig:
    base = {"budget_tokens": budget_for(160, 0.1), "grid": (16, 16), "clear_tokens": 256}
    return CurveStreamConfig(**{**base, **kw})


def run(op: CurveStream, frames, state: CurveStreamState | None = None):
    state = state or op.init_state()
    outs = [op.step(state, f) for f in frames]
    return state, outs


def test_routing_rules_first_warmup_above_below() -> None:
    op = CurveStream(small_config(score="speed", k=2.0, min_samples=4))
    _, outs = run(op, frames_from_features(walk(0)))
    decisions = [o.decision for o in outs]
    assert decisions[0].tier == "clear" and decisions[0].reason == "first"
    assert math.isnan(decisions[0].score)
    assert [d.reason for d in decisions[1:5]] == ["warmup"] * 4  # scores 1..4 feed the statistics
    assert all(d.threshold == math.inf for d in decisions[:5])
    for d in decisions[5:]:
        assert d.reason == ("above" if d.score > d.threshold else "below")
        assert d.tier == ("clear" if d.reason == "above" else "fuzzy")
        assert d.threshold == pytest.approx(d.mean + 2.0 * max(d.std, 1e-4))
    clear = {d.seq for d in decisions if d.reason == "above"}
    assert {30, 70, 110, 140} <= clear  # every cut is routed clear
    assert len(clear) <= 12


def test_decision_scores_equal_the_batch_scores() -> None:
    f = walk(1)
    for score in ("speed", "speed_turn", "turn", "second_diff"):
        _, outs = run(CurveStream(small_config(score=score)), frames_from_features(f))
        np.testing.assert_array_equal([o.decision.score for o in outs], curvature_scores(f, score))


@pytest.mark.parametrize("overflow", ["evict", "merge"])
def test_decision_log_is_complete_and_replays_the_memory(overflow: str) -> None:
    op = CurveStream(small_config(overflow=overflow, clear_share=0.5))
    frames = frames_from_features(walk(2))
    state, outs = run(op, frames)
    decisions = [o.decision for o in outs]
    assert [d.seq for d in decisions] == [f.seq for f in frames]  # one decision per frame, in order
    assert [d.pts_us for d in decisions] == [f.pts_us for f in frames]
    events = [e for o in outs for e in o.events]
    admits = [e for e in events if e.kind == "admit"]
    assert [(e.seq, e.tier, e.tokens) for e in admits] == [(d.seq, d.tier, d.tokens) for d in decisions]
    log = []
    for o in outs:  # every decision's memory totals follow from replaying the events so far
        log += o.events
        assert all(e.step == o.decision.seq for e in o.events)
        entries = replay(log)
        assert o.decision.memory_tokens == sum(t for _, t, _ in entries.values()) <= op.config.budget_tokens
        assert o.decision.clear_tokens == sum(t for tier, t, _ in entries.values() if tier == "clear")
    assert replay(events) == {e.seq: (e.tier, e.tokens, e.last_seq) for e in state.memory.entries()}
    assert any(e.kind in ("evict", "merge") for e in events) and any(e.kind == "downgrade" for e in events)
    check_invariants(state.memory, op.config.policy())
    assert state.routed == {
        "clear": sum(d.tier == "clear" for d in decisions),
        "fuzzy": sum(d.tier == "fuzzy" for d in decisions),
    }
    d = decisions[10].to_dict()
    assert set(d) >= {"seq", "pts_us", "score", "threshold", "tier", "tokens", "memory_tokens"}


def _continue_identically(config: CurveStreamConfig, frames: list[FrameInput], split: int) -> None:
    op = CurveStream(config)
    whole_state, whole = run(op, frames)
    state, first = run(op, frames[:split])
    blob = state.to_bytes()
    restored = op.restore(blob)
    assert restored.to_bytes() == blob  # byte-exact round trip
    restored_state, rest = run(op, frames[split:], restored)
    assert [o.decision for o in first + rest] == [o.decision for o in whole]
    assert [o.events for o in first + rest] == [o.events for o in whole]
    assert restored_state.to_bytes() == whole_state.to_bytes()


@settings(max_examples=25, deadline=None)
@given(
    split=st.integers(min_value=0, max_value=160),
    score=st.sampled_from(["speed", "speed_turn", "second_diff"]),
    overflow=st.sampled_from(["evict", "merge"]),
    window=st.sampled_from([5, 32, None]),
    clip=st.booleans(),
)
def test_snapshot_restore_gives_identical_subsequent_decisions(split, score, overflow, window, clip) -> None:
    config = small_config(score=score, overflow=overflow, window=window, clip_outliers=clip, clear_share=0.5)
    _continue_identically(config, frames_from_features(walk(3)), split)


def test_snapshot_restore_with_token_payloads() -> None:
    rng = np.random.default_rng(4)
    f = walk(4, t=60, cuts=(20, 40))
    tokens = rng.standard_normal((60, 16, 8)).astype(np.float32)
    frames = [FrameInput(i, i * 500_000, f[i], tokens[i], (4, 4), content_hash=f"h{i}") for i in range(60)]
    for fuzzy, overflow in (("pool:2x2", "merge"), ("prune:3", "evict")):
        config = CurveStreamConfig(
            budget_tokens=160,
            clear_tokens=16,
            grid=(4, 4),
            fuzzy=fuzzy,
            overflow=overflow,
            keep_tokens=True,
            payload_dtype="float16",
            clear_share=0.5,
        )
        _continue_identically(config, frames, 37)
        state, _ = run(CurveStream(config), frames)
        check_invariants(state.memory, config.policy())
        assert all(p.tokens.dtype == np.float16 for p in state.memory.payloads.values())
        assert {e.content_hash for e in state.memory.entries()} <= {f"h{i}" for i in range(60)}


def test_late_and_duplicate_frames_are_skipped_and_gaps_allowed() -> None:
    op = CurveStream(small_config())
    frames = frames_from_features(walk(5, t=20, cuts=()))
    state, _ = run(op, frames[:10])
    before = state.to_bytes()
    out = op.step(state, frames[9])  # re-delivered
    assert out.skipped and out.events == () and state.skipped == 1
    assert op.step(state, frames[3]).skipped  # late
    after = state.copy()
    after.skipped = 0
    assert after.to_bytes() == CurveStreamState.from_bytes(before).to_bytes()  # nothing else changed
    assert op.step(state, frames[15]).decision.seq == 15  # a gap is fine (a sampler may drop frames)


def test_a_refused_frame_leaves_the_state_unchanged() -> None:
    config = CurveStreamConfig(
        budget_tokens=160, clear_tokens=16, grid=(4, 4), fuzzy="pool:2x2", keep_tokens=True
    )
    op = CurveStream(config)
    rng = np.random.default_rng(8)
    feats, tokens = rng.standard_normal((6, 8)), rng.standard_normal((6, 16, 3)).astype(np.float32)
    state, _ = run(op, [FrameInput(i, i, feats[i], tokens[i], (4, 4)) for i in range(5)])
    before = state.to_bytes()
    bad_frames = {
        "NaN": FrameInput(5, 5, np.full(8, np.nan), tokens[5], (4, 4)),
        "dimension changed": FrameInput(5, 5, np.ones(9), tokens[5], (4, 4)),
        "needs its patch tokens": FrameInput(5, 5, feats[5]),
        "expected": FrameInput(5, 5, feats[5], tokens[5][:5], (4, 4)),
        "grid changed": FrameInput(5, 5, feats[5], tokens[5], (2, 8)),
    }
    for message, frame in bad_frames.items():
        with pytest.raises(ValueError, match=message):
            op.step(state, frame)
        assert state.to_bytes() == before, message
    assert op.step(state, FrameInput(5, 5, feats[5], tokens[5], (4, 4))).decision.seq == 5


def test_restore_refuses_another_config_and_corrupt_blobs() -> None:
    op = CurveStream(small_config())
    state, _ = run(op, frames_from_features(walk(6, t=10, cuts=())))
    blob = state.to_bytes()
    other = CurveStream(small_config(k=2.5))
    with pytest.raises(ValueError, match="config"):
        other.restore(blob)
    with pytest.raises(ValueError, match="config"):
        other.step(state, FrameInput(99, 0, np.ones(D)))
    with pytest.raises(codec.StateFormatError):
        op.restore(b"garbage")
    with pytest.raises(codec.StateFormatError):
        op.restore(blob[:20])
    with pytest.raises(codec.StateFormatError):
        op.restore(blob[:-10])  # an array runs past the end


def test_codec_round_trips_exactly() -> None:
    value = {
        "floats": [0.1, -0.0, math.inf, -math.inf, 1e-300, 2.0**-1074],
        "nan": math.nan,
        "arrays": [
            np.arange(6, dtype=np.int64).reshape(2, 3),
            np.array([0.5, np.nan], np.float16),
            np.zeros((0, 4), np.float32),
            np.array([True, False]),
        ],
        "nested": {"s": "ü", "n": None, "b": True, "t": (1, 2)},
    }
    back = codec.unpack(codec.pack(value))
    assert back["floats"] == value["floats"] and math.isnan(back["nan"])
    for a, b in zip(value["arrays"], back["arrays"], strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    assert back["nested"] == {"s": "ü", "n": None, "b": True, "t": [1, 2]}
    assert codec.pack(value) == codec.pack(value)  # deterministic
    with pytest.raises(TypeError):
        codec.pack({"x": object()})


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="unknown curvature score"):
        CurveStreamConfig(score="jerk")
    with pytest.raises(ValueError, match="cannot hold one clear frame"):
        CurveStreamConfig(budget_tokens=300, clear_share=0.5)
    with pytest.raises(ValueError, match="clear_share"):
        CurveStreamConfig(clear_share=0.0)
    with pytest.raises(ValueError, match="patch grid"):
        CurveStreamConfig(clear_tokens=100)
    assert CurveStreamConfig.from_dict(CurveStreamConfig().to_dict()) == CurveStreamConfig()
    assert replace(CurveStreamConfig(), k=2.0).fingerprint() != CurveStreamConfig().fingerprint()


@pytest.mark.slow
def test_real_video_cuts_are_routed_clear() -> None:
    """Real frames, real backbone: carphone | bunny | bikes (bike rack shot) | carphone, 0.4-0.5 s apart."""
    from streamvqa.media import decode_frames, sample_video
    from streamvqa.operators.vision import build_encoder

    def take(name: str, indices: range) -> list[np.ndarray]:
        frames = dict(enumerate(f for _, f in decode_frames(sample_video(name), limit=max(indices) + 1)))
        return [frames[i] for i in indices]

    clips = [
        take("carphone_pristine.mp4", range(0, 72, 12)),
        take("bigbuckbunny.mp4", range(0, 72, 12)),
        take("bikes.mp4", range(140, 176, 9)),
        take("carphone_pristine.mp4", range(72, 120, 12)),
    ]
    frames = [f for clip in clips for f in clip]
    cuts = {6, 12, 16}  # first frame after each change
    features = build_encoder().encode(frames).pooled.numpy()
    scores = curvature_scores(features, "speed")
    assert (
        set(np.argsort(np.nan_to_num(scores))[-3:].tolist()) == cuts
    )  # the cuts are the three largest jumps
    op = CurveStream(CurveStreamConfig(budget_tokens=budget_for(len(frames), 0.5)))
    _, outs = run(op, frames_from_features(features))
    clear = {o.decision.seq for o in outs if o.decision.reason == "above"}
    assert cuts <= clear, (sorted(clear), np.round(scores, 3).tolist())
    assert len(clear) <= len(cuts) + 3  # a few early frames may pass while the statistics warm up
