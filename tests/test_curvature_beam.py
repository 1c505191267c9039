"""The Beam adapter on FnApiRunner: per-stream state, same decisions as the plain operator."""

from __future__ import annotations

import apache_beam as beam
import numpy as np
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.util import assert_that

from streamvqa.operators.curvature import (
    CurveStream,
    CurveStreamConfig,
    FrameInput,
    budget_for,
    frames_from_features,
)
from streamvqa.operators.curvature.beam import CurveStreamDoFn, RouteFrames

D = 24
T = 60
CONFIG = CurveStreamConfig(budget_tokens=budget_for(T, 0.1), clear_share=0.5)


def stream_frames(seed: int) -> list[FrameInput]:
    rng = np.random.default_rng(seed)
    f = np.cumsum(rng.standard_normal((T, D)) * 0.02, axis=0) + rng.standard_normal(D)
    for c in rng.choice(np.arange(8, T), size=5, replace=False):
        f[c:] += rng.standard_normal(D)
    return frames_from_features(f)


def expected(frames: list[FrameInput]):
    op = CurveStream(CONFIG)
    state = op.init_state()
    outs = [op.step(state, f) for f in frames]
    return [o.decision for o in outs if o.decision], [e for o in outs for e in o.events]


def by_stream(expected_by_stream: dict):
    """A matcher: per stream, the elements in order equal the expected list."""

    def check(actual):
        got: dict[str, list] = {}
        for stream_id, item in actual:
            got.setdefault(stream_id, []).append(item)
        for stream_id, items in expected_by_stream.items():
            assert got.get(stream_id) == items, (
                f"{stream_id}: {len(got.get(stream_id, []))} vs {len(items)} items"
            )
        assert set(got) == set(expected_by_stream)

    return check


def test_dofn_matches_the_operator_per_stream_and_keeps_streams_apart() -> None:
    streams = {f"cam-{i}": stream_frames(i) for i in range(3)}
    # Stream 1 has a re-delivered frame (skipped), stream 2 a frame with a NaN feature (refused).
    bad = FrameInput(30, streams["cam-2"][30].pts_us, np.full(D, np.nan))
    inputs = {sid: list(frames) for sid, frames in streams.items()}
    inputs["cam-1"].insert(21, streams["cam-1"][20])
    inputs["cam-2"].insert(30, bad)
    want = {sid: expected(frames) for sid, frames in streams.items()}  # the clean streams, alone
    # Interleave the streams frame by frame, as one partition of a topic would.
    elements = [(sid, frames[i]) for i in range(T + 1) for sid, frames in inputs.items() if i < len(frames)]
    with beam.Pipeline(runner=FnApiRunner()) as p:
        out = p | beam.Create(elements, reshuffle=False) | RouteFrames(CONFIG)
        assert_that(out.decisions, by_stream({sid: d for sid, (d, _) in want.items()}), label="decisions")
        assert_that(out.memory, by_stream({sid: e for sid, (_, e) in want.items()}), label="memory")

        def one_error(errors):
            assert len(errors) == 1
            stream_id, seq, reason = errors[0]
            assert (stream_id, seq) == ("cam-2", 30) and "NaN" in reason

        assert_that(out.errors, one_error, label="errors")
    result = p.result
    counters = {c.key.metric.name: c.committed for c in result.metrics().query()["counters"]}
    assert counters["frames"] == 3 * T
    assert counters["skipped"] == 1 and counters["errors"] == 1
    assert counters["clear"] == sum(d.tier == "clear" for d, _ in want.values() for d in d)


def test_state_survives_across_bundles_and_a_fresh_dofn_instance() -> None:
    """Two pipelines sharing nothing but the state blob: the second continues the first exactly."""
    frames = stream_frames(7)
    dofn = CurveStreamDoFn(CONFIG)
    dofn.setup()
    op = CurveStream(CONFIG)
    state = op.init_state()

    class FakeState:
        def __init__(self) -> None:
            self.value = None

        def read(self):
            return self.value

        def write(self, value) -> None:
            self.value = value

    stored = FakeState()
    got = []
    for i, frame in enumerate(frames):
        if i == T // 2:  # a restart: new DoFn instance, empty cache, state only from the store
            dofn = CurveStreamDoFn(CONFIG)
            dofn.setup()
        got += [
            x for x in dofn.process(("s", frame), state=stored) if not isinstance(x, beam.pvalue.TaggedOutput)
        ]
        op.step(state, frame)
    assert [d for _, d in got] == expected(frames)[0]
    assert stored.value == state.to_bytes()
