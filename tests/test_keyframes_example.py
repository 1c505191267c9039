"""The custom-DAG example (pipelines/examples/keyframes.py) runs on the embedded stack."""

from __future__ import annotations

import json

import numpy as np
import pytest

from streamvqa import connect
from streamvqa.media import decode_frames, decode_jpeg, encode_jpeg, sample_video
from streamvqa.operators.curvature.operator import CurveStream
from streamvqa.operators.curvature.records import FrameInput
from streamvqa.pipelines.examples import keyframes
from streamvqa.schemas import DeadLetter, Frame, decode, encode
from tests.kafka_helpers import new_topics, read_all, send_end_of_stream

pytestmark = [pytest.mark.stack, pytest.mark.slow]


def _frames(n: int = 24) -> list[tuple[bytes, int, int]]:
    # Two scenes: the cut in the middle is what the router must mark clear.
    out = []
    for name in ("bikes.mp4", "carphone_pristine.mp4"):
        picked = [
            rgb for i, (_, rgb) in enumerate(decode_frames(sample_video(name), limit=n * 3)) if i % 6 == 0
        ]
        out += [(encode_jpeg(rgb, quality=85), rgb.shape[1], rgb.shape[0]) for rgb in picked[: n // 2]]
    return out


def test_keyframe_extractor_stores_the_clear_frames_once(stack_settings, endpoints) -> None:
    topic, out = new_topics(stack_settings, endpoints, "kf-in", "kf-out")
    frames = _frames()
    jpegs = [jpeg for jpeg, _, _ in frames]
    producer = connect.producer(stack_settings, endpoints)
    for seq, (jpeg, width, height) in enumerate(frames):
        frame = Frame(
            stream_id="cam-kf",
            seq=seq,
            pts_us=seq * 250_000,
            codec="jpeg",
            width=width,
            height=height,
            payload=jpeg,
        )
        producer.send(topic, key=b"cam-kf", value=encode(frame))
        if seq == 5:
            producer.send(topic, key=b"cam-kf", value=encode(frame))  # a duplicate: routed once
            bad = Frame(
                stream_id="cam-kf",
                seq=99,
                pts_us=0,
                codec="jpeg",
                width=112,
                height=112,
                payload=b"\xff\xd8not a jpeg\xff\xd9",
            )
            producer.send(topic, key=b"cam-kf", value=encode(bad))  # a JPEG that does not decode
    send_end_of_stream(producer, topic)
    producer.flush()
    producer.close()

    keyframes.run(stack_settings, topic, out, f"g-{topic}", bounded=True)

    records = [json.loads(m.value) for m in read_all(stack_settings, endpoints, out)]
    seqs = [r["seq"] for r in records]
    assert seqs == sorted(set(seqs)) and seqs  # each keyframe once, in order
    # The same routing, computed offline with the same encoder and router, picks the same frames.
    processor = keyframes.KeyframeProcessor(out, stack_settings)
    router = CurveStream(processor.curvature)
    state = router.init_state()
    expected = []
    for seq, jpeg in enumerate(jpegs):
        pooled = processor.encoder.encode(decode_jpeg(jpeg)[None]).pooled[0].float().numpy()
        step = router.step(state, FrameInput(seq, seq * 250_000, pooled.astype(np.float32)))
        if step.decision.tier == "clear":
            expected.append(seq)
    assert seqs == expected
    assert any(s >= len(jpegs) // 2 for s in seqs)  # the cut to the second scene is a keyframe
    store = connect.object_store(stack_settings, endpoints)
    for record in records:
        assert store.get(record["key"]) == jpegs[record["seq"]]
        assert record["key"].startswith("streams/cam-kf/keyframes/")
    letters = [
        decode(m.value, DeadLetter)
        for m in read_all(stack_settings, endpoints, stack_settings.topics.dead_letter)
        if m.value and decode(m.value, DeadLetter).source_topic == topic
    ]
    assert [letter.reason for letter in letters] == ["invalid_field"]
    assert "JPEG" in letters[0].detail
