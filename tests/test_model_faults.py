"""A model stage failing or timing out for some calls: each call has a deadline and is retried
(after undoing what the failed call changed), then its record is dead-lettered as
``model_failed`` and the stream goes on; other streams never see it.

The guard on its own first, then the frame stage (the real STC-cached DINOv2-S) through the
exactly-once task on the embedded broker and object store, then the memory stage's answers."""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid

import pytest

from streamvqa.operators.io.exactly_once import is_outage
from streamvqa.operators.io.records import KafkaRecord
from streamvqa.operators.model_guard import CallPolicy, ModelCallFailed, ModelGuard, ModelWedged
from streamvqa.schemas import (
    Answer,
    DeadLetter,
    Frame,
    InvalidField,
    Query,
    SpeechNote,
    VisualNote,
    decode,
    encode,
)
from tests.kafka_helpers import new_topics, partition_task, read_all

FAST = CallPolicy(timeout_s=0.3, attempts=3, backoff_s=0.05)


# ----------------------------------------------------------------------------- the guard
def test_a_transient_failure_is_retried_after_the_rollback() -> None:
    guard, calls, rollbacks = ModelGuard("m", FAST), [], []

    def fn():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("CUDA error: an illegal memory access")
        return 42

    assert guard.call(fn, rollback=lambda: rollbacks.append(len(calls))) == 42
    assert len(calls) == 2 and rollbacks == [1] and guard.failures == 1


def test_a_persistent_failure_becomes_model_failed_with_every_attempt_named() -> None:
    guard = ModelGuard("encoder", FAST)
    calls = []

    def fn():
        calls.append(1)
        raise RuntimeError(f"out of memory #{len(calls)}")

    with pytest.raises(ModelCallFailed) as info:
        guard.call(fn, what="frame 7 of cam-1")
    assert len(calls) == 3 and info.value.reason == "model_failed"
    text = str(info.value)
    assert "encoder on frame 7 of cam-1 failed 3 times" in text
    assert all(f"attempt {i}: RuntimeError: out of memory #{i}" in text for i in (1, 2, 3))


def test_an_overrun_is_abandoned_and_retried_once_the_model_is_back() -> None:
    guard, calls, order = ModelGuard("m", FAST), [], []

    def fn():
        calls.append(threading.get_ident())
        if len(calls) == 1:
            time.sleep(0.45)  # past the deadline, back before the retry's own deadline
            order.append("late first")
            return "stale"
        order.append("retry")
        return "fresh"

    t0 = time.monotonic()
    assert guard.call(fn, rollback=lambda: order.append("rollback")) == "fresh"
    assert guard.abandoned == 1 and len(calls) == 2
    # the retry never ran beside the abandoned call: it waited for the model, then rolled back
    assert order == ["late first", "rollback", "retry"]
    assert time.monotonic() - t0 < 2.0


def test_a_call_that_never_returns_wedges_the_model() -> None:
    release = threading.Event()
    guard = ModelGuard("m", CallPolicy(timeout_s=0.2, attempts=2, backoff_s=0.0))
    ran = []

    def fn():
        ran.append(1)
        release.wait(10)

    try:
        with pytest.raises(ModelWedged, match="abandoned call has held the model"):
            guard.call(fn)
        hung = [t for t in threading.enumerate() if t.name == "model-m" and t.is_alive()]
        assert hung and all(t.daemon for t in hung)  # the process can still exit
    finally:
        release.set()
    time.sleep(0.3)
    assert ran == [1]  # the retry that gave up never ran once the model came back
    assert not is_outage(ModelWedged("x"))  # counted against the record: after a few runs it is set aside


def test_bad_input_and_outages_are_not_retried() -> None:
    guard, calls = ModelGuard("m", FAST), []

    def bad():
        calls.append(1)
        raise InvalidField("sample rate 7 Hz", "payload")

    with pytest.raises(InvalidField):
        guard.call(bad)

    def outage():
        calls.append(1)
        raise ConnectionRefusedError("object store")

    with pytest.raises(ConnectionRefusedError):
        guard.call(outage)
    assert len(calls) == 2 and guard.failures == 0


def test_call_policy_is_built_from_the_settings() -> None:
    from streamvqa.settings import Settings

    s = Settings(pipeline={"model_timeout_s": 5, "model_attempts": 2, "model_backoff_s": 0.1})
    assert s.pipeline.call_policy() == CallPolicy(timeout_s=5.0, attempts=2, backoff_s=0.1)
    with pytest.raises(ValueError):
        CallPolicy(attempts=0)


# ------------------------------------------------------------------- the frame stage
class FaultyEncoder:
    """The real encoder, failing as told: ``faults[(stream, call)]`` is "raise" (after the real
    call has moved the stream's cache on) or a number of seconds to overrun by. Calls are counted
    per stream, so a retried frame is a new call."""

    def __init__(self, inner, faults: dict[tuple[str, int], object]) -> None:
        self.inner, self.faults, self.calls = inner, faults, {}

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def encode(self, frames, stream_id: str = "default"):
        n = self.calls[stream_id] = self.calls.get(stream_id, 0) + 1
        out = self.inner.encode(frames, stream_id=stream_id)
        fault = self.faults.get((stream_id, n))
        if fault == "raise":
            raise RuntimeError(f"injected failure on call {n} of {stream_id}")
        if fault is not None:
            time.sleep(float(fault))
        return out


@pytest.fixture(scope="module")
def frames_of(tmp_path_factory):
    from PIL import Image

    from streamvqa.demo_media import build_demo_media

    media = build_demo_media(tmp_path_factory.mktemp("faults"), scene_s=6.0, fps=1.0)
    paths = sorted(media.frames_dir.glob("*.jpg"))

    def make(stream_id: str, n: int) -> list[bytes]:
        out = []
        for seq, path in enumerate(paths[:n]):
            w, h = Image.open(path).size
            out.append(
                encode(
                    Frame(
                        stream_id=stream_id,
                        seq=seq,
                        pts_us=seq * 1_000_000,
                        codec="jpeg",
                        width=w,
                        height=h,
                        payload=path.read_bytes(),
                    )
                )
            )
        return out

    return make


def _notes(messages) -> dict[str, list[VisualNote]]:
    out: dict[str, list[VisualNote]] = {}
    for m in messages:
        n = decode(m.value, VisualNote)
        out.setdefault(n.stream_id, []).append(dataclasses.replace(n, encode_ms=0.0, wall_us=0))
    return out


@pytest.mark.stack
@pytest.mark.slow
def test_frame_stage_model_faults_cost_one_frame_and_no_other_stream(
    stack_settings, endpoints, frames_of
) -> None:
    from streamvqa.pipelines.video_qa.graph import StageFactories

    run = uuid.uuid4().hex[:6]
    a, b = f"faulty-{run}", f"healthy-{run}"
    n = 12
    recs = [(a, v) for v in frames_of(a, n)] + [(b, v) for v in frames_of(b, n)]
    recs.sort(key=lambda r: (decode(r[1], Frame).seq, r[0]))  # the two streams interleaved
    policy = CallPolicy(timeout_s=3.0, attempts=3, backoff_s=0.1)
    # stream A: frame 2 fails once (call 3; its retry is call 4), frame 5 always (calls 7-9), frame 8
    # overruns the deadline once (call 12); stream B: frame 3 fails once (call 4)
    faults = {
        (a, 3): "raise",
        (a, 7): "raise",
        (a, 8): "raise",
        (a, 9): "raise",
        (a, 12): 4.0,
        (b, 4): "raise",
    }

    def run_task(name: str, faulty: dict, drop: set[tuple[str, int]]) -> tuple[dict, list[DeadLetter]]:
        topic, out = new_topics(stack_settings, endpoints, f"mf-{name}-in", f"mf-{name}-out", partitions=1)
        stage = StageFactories(stack_settings).frames()
        stage = dataclasses.replace(
            stage, encoder=FaultyEncoder(stage.encoder, faulty), memory_topic=out, calls=policy
        )
        task, producer = partition_task(stack_settings, endpoints, topic, [out], f"g-{topic}", stage)
        try:
            offset = 0
            for sid, value in recs:
                if (sid, decode(value, Frame).seq) in drop:
                    continue
                task.process(KafkaRecord(topic, 0, offset, sid.encode(), value, 1_700_000_000_000))
                offset += 1
            task.commit()
        finally:
            producer.close()
        letters = [
            decode(m.value, DeadLetter)
            for m in read_all(stack_settings, endpoints, stack_settings.topics.dead_letter)
        ]
        return _notes(read_all(stack_settings, endpoints, out)), [
            d for d in letters if d.source_topic == topic
        ]

    faulty, letters = run_task("faulty", faults, set())
    clean, none = run_task("clean", {}, {(a, 5)})  # what A would be had frame 5 never come
    assert none == []
    assert [(d.source_offset, d.reason, d.key) for d in letters] == [(10, "model_failed", a.encode())]
    assert f"encoder on frame 5 of {a} failed 3 times" in letters[0].detail
    assert "injected failure on call 9" in letters[0].detail
    # every retried frame is bit-identical to the clean run (the STC cache rolled back each time)
    assert faulty[b] == clean[b] and len(faulty[b]) == n
    assert faulty[a] == clean[a] and [x.seq for x in faulty[a]] == [s for s in range(n) if s != 5]
    assert any(x.cached_fraction > 0 for x in faulty[a][6:])  # the cache was back in use after the faults


# ------------------------------------------------------------------ the memory stage
@pytest.mark.stack
@pytest.mark.slow
def test_an_answer_the_model_keeps_failing_is_reported_and_dead_lettered(stack_settings, tmp_path) -> None:
    from transformers import AutoTokenizer

    from streamvqa.operators.lm.smollm2 import ensure_converted
    from streamvqa.pipelines.video_qa.graph import StageFactories
    from tests.tiny_models import tiny_llama

    tokenizer = AutoTokenizer.from_pretrained(ensure_converted(), local_files_only=True)
    path = tmp_path / "weights"
    tiny_llama(vocab=len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    settings = stack_settings.model_copy(
        update={
            "pipeline": stack_settings.pipeline.model_copy(
                update={
                    "lm_path": path,
                    "text_features": False,
                    "max_new_tokens": 2,
                    "speech": False,
                    "model_timeout_s": 5.0,
                    "model_backoff_s": 0.05,
                }
            )
        }
    )
    stage = StageFactories(settings).memory()
    memory = stage.memory
    answer = memory.answer
    asked = []

    def failing_answer(kv, question):
        asked.append(question)
        if "boat" in question:
            raise RuntimeError("the decoder produced NaN logits")
        return answer(kv, question)

    memory.answer = failing_answer
    sid = f"lm-faults-{uuid.uuid4().hex[:6]}"
    state, wall = stage.initial_state(sid), int(time.time() * 1e6)
    outputs = []

    def feed(value: bytes, offset: int) -> None:
        nonlocal state
        state, out = stage.process(
            state, KafkaRecord("streamvqa.memory", 0, offset, sid.encode(), value, wall // 1000)
        )
        outputs.extend(out)

    feed(
        encode(
            SpeechNote(
                stream_id=sid,
                seq=0,
                start_us=0,
                end_us=2_000_000,
                wall_us=wall,
                text="The red boat left the harbour.",
            )
        ),
        0,
    )
    boat = encode(Query(query_id=f"{sid}-boat", stream_id=sid, text="Which boat left?", asked_at_us=1))
    feed(boat, 1)
    feed(encode(Query(query_id=f"{sid}-dog", stream_id=sid, text="What barked?", asked_at_us=1)), 2)
    state, out = stage.tick(state, int(time.time() * 1e6) + int(settings.pipeline.hold_timeout_s * 1e6) + 1)
    outputs.extend(out)
    answers = {
        decode(o.value, Answer).query_id: decode(o.value, Answer)
        for o in outputs
        if o.topic == settings.topics.answers
    }
    letters = [decode(o.value, DeadLetter) for o in outputs if o.topic == settings.topics.dead_letter]
    assert set(answers) == {f"{sid}-boat", f"{sid}-dog"}  # the asker hears back either way
    failed, fine = answers[f"{sid}-boat"], answers[f"{sid}-dog"]
    assert failed.text.startswith("This question could not be answered: language-model on question")
    assert "failed 3 times" in failed.text and "NaN logits" in failed.text and failed.model_id == "streamvqa"
    assert fine.model_id == "local/weights" and fine.evidence
    assert [(d.reason, d.source_topic, d.source_offset) for d in letters] == [
        ("model_failed", "streamvqa.memory", 1)
    ]
    assert letters[0].payload_excerpt and boat.startswith(letters[0].payload_excerpt)
    assert sum("boat" in q for q in asked) == 3
    # both are answered, once: the state remembers them
    assert stage.decode_state(stage.encode_state(state)).answered == [f"{sid}-boat", f"{sid}-dog"]
