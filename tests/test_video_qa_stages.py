"""The four stages of the main pipeline as plain processors (no Beam, no Kafka): real models, the
embedded object store, records routed between them the way the memory topic routes them."""

from __future__ import annotations

import dataclasses
import time
import uuid

import numpy as np
import pytest

from streamvqa import connect
from streamvqa.demo_media import build_demo_media, read_wav
from streamvqa.operators.io.records import KafkaRecord, Output
from streamvqa.pipelines.video_qa.graph import StageFactories
from streamvqa.pipelines.video_qa.memory import match_spans
from streamvqa.schemas import (
    Answer,
    AudioChunk,
    Frame,
    Query,
    SchemaError,
    SpeechNote,
    VisualNote,
    decode,
    encode,
)

pytestmark = [pytest.mark.stack, pytest.mark.slow]


class Router:
    """Runs the stages over records in order, feeding memory-topic outputs to the memory stage."""

    def __init__(self, settings) -> None:
        f = StageFactories(settings)
        self.topics = settings.topics
        self.stages = {t: make() for t, make in f.by_topic().items()}
        self.states: dict[tuple[str, str], object] = {}
        self.answers: list[Answer] = []
        self.notes: list = []
        self.offsets: dict[str, int] = {}

    def record(self, topic: str, key: bytes, value: bytes, ts_ms: int) -> KafkaRecord:
        offset = self.offsets.get(topic, 0)
        self.offsets[topic] = offset + 1
        return KafkaRecord(topic, 0, offset, key, value, ts_ms)

    def feed(self, record: KafkaRecord) -> list[Output]:
        stage = self.stages[record.topic]
        sid = record.key.decode()
        state = self.states.get((record.topic, sid)) or stage.initial_state(sid)
        state, outputs = stage.process(state, record)
        # what the exactly-once task does at a commit: the state goes through its bytes
        self.states[(record.topic, sid)] = stage.decode_state(stage.encode_state(state))
        for out in outputs:
            self._route(out)
        return outputs

    def tick(self, now_us: int) -> None:
        stage = self.stages[self.topics.memory]
        for (topic, sid), state in list(self.states.items()):
            if topic == self.topics.memory:
                state, outputs = stage.tick(state, now_us)
                self.states[(topic, sid)] = state
                for out in outputs:
                    self._route(out)

    def _route(self, out: Output) -> None:
        if out.topic == self.topics.memory:
            self.notes.append(out)
            self.feed(self.record(out.topic, out.partition_key, out.value, int(time.time() * 1000)))
        elif out.topic == self.topics.answers:
            self.answers.append(decode(out.value, Answer))


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> object:
    return build_demo_media(tmp_path_factory.mktemp("demo"), scene_s=15.0, fps=1.0)


def _stream_records(router: Router, media, stream_id: str, epoch_ms: int) -> list[KafkaRecord]:
    """Frames (1 fps) and 1 s audio chunks of the demo stream, merged by pts."""
    items = []
    for seq, path in enumerate(sorted(media.frames_dir.glob("*.jpg"))):
        pts = int(seq / media.fps * 1e6)
        jpeg = path.read_bytes()
        from PIL import Image

        w, h = Image.open(path).size
        frame = Frame(stream_id=stream_id, seq=seq, pts_us=pts, codec="jpeg", width=w, height=h, payload=jpeg)
        items.append((pts, router.topics.frames, encode(frame)))
    samples = read_wav(media.audio_path)
    for seq, start in enumerate(range(0, len(samples), 16_000)):
        chunk = AudioChunk(
            stream_id=stream_id,
            seq=seq,
            pts_us=seq * 1_000_000,
            sample_rate=16_000,
            channels=1,
            sample_format="f32le",
            payload=samples[start : start + 16_000].astype("<f4").tobytes(),
        )
        items.append((seq * 1_000_000, router.topics.audio, encode(chunk)))
    items.sort(key=lambda x: (x[0], x[1] != router.topics.audio))
    return [
        router.record(topic, stream_id.encode(), value, epoch_ms + pts // 1000) for pts, topic, value in items
    ]


def test_stages_answer_from_the_right_utterance_and_scene(stack_settings, media) -> None:
    settings = stack_settings.model_copy(
        update={"pipeline": stack_settings.pipeline.model_copy(update={"hold_timeout_s": 5.0})}
    )
    router = Router(settings)
    sid = f"cam-{uuid.uuid4().hex[:6]}"
    epoch_ms = int(time.time() * 1000)
    records = _stream_records(router, media, sid, epoch_ms)
    # every question is published up front; the memory stage holds each until its time
    for i, q in enumerate(media.questions):
        image = media.images.get(i)
        query = Query(
            query_id=f"{sid}-q{i}",
            stream_id=sid,
            text=q.text,
            asked_at_us=epoch_ms * 1000 + int(q.at_s * 1e6),
            image=image,
            image_codec="jpeg" if image else None,
        )
        router.feed(router.record(router.topics.queries, sid.encode(), encode(query), epoch_ms))
    # asked while the last utterance (31-43.5 s) goes on: answered without waiting for its end
    mid_s, (talk_from, talk_to) = 37.0, (media.utterances[-1][0], media.utterances[-1][1])
    assert talk_from < mid_s < talk_to
    mid = Query(
        query_id=f"{sid}-mid",
        stream_id=sid,
        text="What was said?",
        asked_at_us=epoch_ms * 1000 + int(mid_s * 1e6),
    )
    router.feed(router.record(router.topics.queries, sid.encode(), encode(mid), epoch_ms))
    assert router.answers == []  # nothing seen yet: all held
    bad = dataclasses.replace(
        decode(records[0].value, Frame)
        if records[0].topic == router.topics.frames
        else decode(records[1].value, Frame),
        seq=10_000,
    )
    answered_at = {}
    for record in records:
        router.feed(record)
        for a in router.answers:
            answered_at.setdefault(
                a.query_id,
                decode(record.value, Frame).pts_us
                if record.topic == router.topics.frames
                else decode(record.value, AudioChunk).pts_us,
            )
    with pytest.raises(SchemaError):  # a frame whose JPEG is garbage is refused (the task dead-letters it)
        router.feed(
            router.record(
                router.topics.frames,
                sid.encode(),
                encode(dataclasses.replace(bad, payload=b"\xff\xd8garbage\xff\xd9")),
                epoch_ms,
            )
        )
    router.tick(int(time.time() * 1e6) + 10_000_000)  # the last question waits for the stream's end
    by_id = {a.query_id: a for a in router.answers}
    assert sorted(by_id) == sorted([*(f"{sid}-q{i}" for i in range(len(media.questions))), f"{sid}-mid"])
    assert len(router.answers) == len(media.questions) + 1  # once each
    # the mid-utterance question: released once both sources passed 37 s, before the utterance
    # ended (progress marks during speech), and answered from what had ended by then
    assert mid_s * 1e6 - 1_000_000 <= answered_at[f"{sid}-mid"] < talk_to * 1e6
    assert by_id[f"{sid}-mid"].evidence
    assert all(e.end_us <= mid_s * 1e6 for e in by_id[f"{sid}-mid"].evidence), by_id[f"{sid}-mid"].evidence
    for i, q in enumerate(media.questions):
        a = by_id[f"{sid}-q{i}"]
        assert a.evidence, a
        best = a.evidence[0]
        lo, hi = (int(x * 1e6) for x in q.expect)
        assert best.start_us < hi and best.end_us > lo, (q.text, a.text, a.evidence)
        stages = [s.stage for s in a.latency]
        assert stages[0] == "wait" and stages[-1] == "total"
        if i in answered_at:  # held until the stream reached the question's time, not answered before
            assert answered_at[f"{sid}-q{i}"] >= int(q.at_s * 1e6) - 1_000_000
    notes = [
        decode(n.value, VisualNote) for n in router.notes if b"/frame/" in dict(n.headers)["streamvqa-id"]
    ]
    assert len(notes) == len(list(media.frames_dir.glob("*.jpg")))
    assert {n.tier for n in notes} == {"clear", "fuzzy"}
    store = connect.object_store(settings, connect.resolve_endpoints(settings))
    keyframes = [n.keyframe_key for n in notes if n.keyframe_key]
    assert keyframes and all(store.get(k)[:2] == b"\xff\xd8" for k in keyframes)
    speech = [
        decode(n.value, SpeechNote) for n in router.notes if b"/speech/" in dict(n.headers)["streamvqa-id"]
    ]
    assert any("america" in s.text.lower() for s in speech)
    marks = [
        decode(n.value, SpeechNote) for n in router.notes if b"/heard/" in dict(n.headers)["streamvqa-id"]
    ]
    during = [m for m in marks if m.open_since_us is not None]  # marks sent while someone spoke
    assert during and all(m.text == "" and m.start_us <= m.open_since_us <= m.end_us for m in during)
    # during the last utterance: marks that say speech is open since some point of it
    assert any(
        talk_from * 1e6 - 500_000 <= m.open_since_us < m.end_us <= talk_to * 1e6 + 1_000_000 for m in during
    ), [(m.open_since_us, m.end_us) for m in during]


def test_match_spans_are_runs_best_first() -> None:
    sims = np.array([0.1, 0.9, 0.95, 0.2, 0.88, 0.3])
    spans = match_spans(sims, [0, 1, 2, 3, 4, 5], threshold=0.6, margin=0.1)
    assert [(s.start_us, s.end_us) for s in spans] == [(1, 3), (4, 5)]
    assert spans[0].score == pytest.approx(0.95)
    assert match_spans(np.array([0.1, 0.2]), [0, 1], threshold=0.6, margin=0.1) == []


def test_unknown_stream_is_answered_after_the_hold(stack_settings) -> None:
    router = Router(stack_settings)
    query = Query(query_id="q-unknown", stream_id="nobody", text="anything?", asked_at_us=1)
    router.feed(router.record(router.topics.queries, b"nobody", encode(query), 0))
    router.tick(int(time.time() * 1e6))  # not yet: the hold lasts hold_timeout_s
    assert router.answers == []
    router.tick(int(time.time() * 1e6) + int(stack_settings.pipeline.hold_timeout_s * 1e6) + 1)
    assert [a.query_id for a in router.answers] == ["q-unknown"]
    assert "unknown stream" in router.answers[0].text and router.answers[0].evidence == ()


def test_frame_stage_after_restarts_equals_an_uninterrupted_run(stack_settings, media) -> None:
    """The STC reference is rebuilt from its frame after a restore: notes (features, scores, tiers)
    are bit-identical to an uninterrupted run's, whatever the restart points."""
    factories = StageFactories(stack_settings)
    sid = f"restart-{uuid.uuid4().hex[:6]}"
    router = Router.__new__(Router)
    router.offsets, router.topics = {}, stack_settings.topics
    records = [
        r for r in _stream_records(router, media, sid, 1_700_000_000_000) if r.topic == router.topics.frames
    ][:24]

    def run(restart_at: set[int]) -> list[VisualNote]:
        stage = factories.frames()
        state, notes = stage.initial_state(sid), []
        for i, record in enumerate(records):
            if i in restart_at:  # a new worker: fresh encoder, state from its bytes
                stage = factories.frames()
                state = stage.decode_state(stage.encode_state(state))
            state, outputs = stage.process(state, record)
            notes += [decode(o.value, VisualNote) for o in outputs]
        return notes

    plain = run(set())
    restarted = run({3, 5, 6, 13, 20})
    assert len(plain) == len(restarted) == len(records)
    strip = lambda n: dataclasses.replace(n, encode_ms=0.0)  # noqa: E731
    assert [strip(n) for n in restarted] == [strip(n) for n in plain]
    assert any(n.cached_fraction > 0 for n in plain)  # the cache was in use
