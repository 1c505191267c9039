"""Crash consistency of the main pipeline: SIGKILL the pipeline process at random moments (at least
10 times) while a stream with questions flows, restart it each time, and compare with an
uninterrupted run of the same stream: the same memory (every frame with its tier, every KV block),
every question answered exactly once with the same answer, no note lost or written twice, every
bad message dead-lettered once."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
import uuid
from collections import Counter

import pytest

from streamvqa import connect
from streamvqa.ask import make_query, publish_query
from streamvqa.demo import bad_messages, start_pipeline, stop_pipeline
from streamvqa.demo_media import build_demo_media
from streamvqa.operators.io.exactly_once import snapshot_namespace
from streamvqa.operators.io.records import OUTPUT_ID_HEADER
from streamvqa.operators.io.snapshots import SnapshotStore
from streamvqa.operators.serve.stages import StoreConfig
from streamvqa.pipelines.video_qa.memory import manifest_of, state_from_snapshot
from streamvqa.produce import ProduceOptions, produce
from streamvqa.schemas import Answer, DeadLetter, Frame, SpeechNote, VisualNote, decode, decode_any
from tests.kafka_helpers import private_topics, read_all

pytestmark = [pytest.mark.stack, pytest.mark.slow]
KILLS = 10


def _settings(base, tag: str):
    """Topics of their own, questions released by the sources' watermarks only."""
    pipeline = base.pipeline.model_copy(update={"hold_timeout_s": 900.0})
    return private_topics(base.model_copy(update={"pipeline": pipeline}), f"chaos-{tag}")


def _read(settings, endpoints, topic: str) -> list:
    return read_all(settings, endpoints, topic, timeout_ms=1200)


EPOCH_MS = 1_800_000_000_000  # both runs stamp the same wall times


def _ask(settings, endpoints, media, stream_id: str) -> list[str]:
    """The questions first, and wait until the pipeline has forwarded them to the memory stage:
    a question that reaches the memory stage after the stream passed its time sees a little more
    than its time (docs/pipeline.md); both runs must give it the same view."""
    kafka = connect.producer(settings, endpoints)
    ids = []
    for i, q in enumerate(media.questions):
        image = media.images.get(i)
        query = make_query(
            stream_id,
            q.text,
            image=image,
            image_codec="jpeg" if image else None,
            asked_at_us=EPOCH_MS * 1000 + int(q.at_s * 1e6),
            query_id=f"{stream_id}-q{i + 1}",
        )
        publish_query(settings, kafka, query)
        ids.append(query.query_id)
    kafka.close()
    deadline = time.monotonic() + 300
    want = {f"{stream_id}/q/{i}" for i in ids}
    while not want <= {
        dict(m.headers).get(OUTPUT_ID_HEADER, b"").decode()
        for m in _read(settings, endpoints, settings.topics.memory)
    }:
        assert time.monotonic() < deadline, "the questions were not forwarded"
        time.sleep(1)
    return ids


def _stream(settings, endpoints, media, stream_id: str, speed: float | None) -> None:
    """The stream: three bad frame messages, then frames and audio."""
    kafka = connect.producer(settings, endpoints)
    sample = Frame(
        stream_id=stream_id,
        seq=10**9,
        pts_us=0,
        codec="jpeg",
        width=320,
        height=240,
        payload=sorted(media.frames_dir.glob("*.jpg"))[0].read_bytes(),
    )
    for _, value in bad_messages(stream_id, sample):
        kafka.send(settings.topics.frames, key=stream_id.encode(), value=value).get(timeout=30)
    kafka.close()
    options = ProduceOptions(
        stream_id=stream_id, image_fps=media.fps, audio_path=media.audio_path, speed=speed, resume=False
    )
    produce(settings, media.frames_dir, options, endpoints=endpoints, epoch_ms=EPOCH_MS)


def _final_state(settings, endpoints, group: str, stream_id: str):
    objects = connect.object_store(settings, endpoints)
    snapshot, _ = SnapshotStore(objects, snapshot_namespace(group, "memory")).load(stream_id)
    if snapshot is None:
        return None
    return state_from_snapshot(
        snapshot.state, objects, StoreConfig.from_settings(settings, endpoints).kv_store()
    )


def _done(settings, endpoints, group, stream_id, frames: int, duration_us: int, ids: list[str]) -> bool:
    answered = {m.key.decode() for m in _read(settings, endpoints, settings.topics.answers)}
    if not set(ids) <= answered:
        return False
    state = _final_state(settings, endpoints, group, stream_id)
    return (
        state is not None
        and len(state.seqs) == frames
        and state.heard_us >= duration_us - 2_000_000
        and not state.pending
    )


def _outcome(settings, endpoints, group, stream_id):
    answers = [decode(m.value, Answer) for m in _read(settings, endpoints, settings.topics.answers)]
    notes = _read(settings, endpoints, settings.topics.memory)
    identities = Counter(dict(m.headers)[OUTPUT_ID_HEADER].decode() for m in notes)
    visual, speech = {}, {}
    for m in notes:
        item = decode_any(m.value)
        if isinstance(item, VisualNote):
            visual[item.seq] = (item.tier, item.score, item.feature, item.keyframe_key, item.tokens)
        elif isinstance(item, SpeechNote):
            speech[(item.start_us, item.end_us)] = item.text
    letters = Counter(
        (d.source_offset, d.reason)
        for d in (
            decode(m.value, DeadLetter) for m in _read(settings, endpoints, settings.topics.dead_letter)
        )
    )
    manifest = manifest_of(_final_state(settings, endpoints, group, stream_id))
    return answers, identities, visual, speech, letters, manifest


def _wait(settings, endpoints, group, stream_id, media, ids, deadline_s: float, process) -> None:
    frames = len(list(media.frames_dir.glob("*.jpg")))
    deadline = time.monotonic() + deadline_s
    while not _done(settings, endpoints, group, stream_id, frames, int(media.duration_s * 1e6), ids):
        assert time.monotonic() < deadline, "the pipeline did not finish the stream in time"
        assert process().poll() is None, "the pipeline process exited"
        time.sleep(2)


def test_sigkill_restarts_give_the_uninterrupted_result(stack_settings, tmp_path) -> None:
    media = build_demo_media(tmp_path / "media", scene_s=25.0, fps=1.0)  # 75 s, 3 scenes, 3 utterances
    stream_id = f"chaos-{uuid.uuid4().hex[:6]}"

    # the uninterrupted run
    plain, plain_ep = _settings(stack_settings, f"a{uuid.uuid4().hex[:4]}")
    proc = start_pipeline(plain, tmp_path / "plain.log", group="chaos-a")
    try:
        ids = _ask(plain, plain_ep, media, stream_id)
        _stream(plain, plain_ep, media, stream_id, speed=None)
        _wait(plain, plain_ep, "chaos-a", stream_id, media, ids, 600, lambda: proc)
    finally:
        stop_pipeline(proc)
    expected = _outcome(plain, plain_ep, "chaos-a", stream_id)

    # the same stream in real time, the pipeline killed again and again
    chaos, chaos_ep = _settings(stack_settings, f"b{uuid.uuid4().hex[:4]}")
    state = {"proc": start_pipeline(chaos, tmp_path / "chaos.log", group="chaos-b")}
    kills = 0
    try:
        assert _ask(chaos, chaos_ep, media, stream_id) == ids
        feeder = threading.Thread(target=_stream, args=(chaos, chaos_ep, media, stream_id, 1.5), daemon=True)
        feeder.start()
        rng = random.Random(7)
        while kills < KILLS:
            time.sleep(rng.uniform(3.0, 12.0))
            os.killpg(state["proc"].pid, signal.SIGKILL)
            state["proc"].wait(30)
            kills += 1
            state["proc"] = start_pipeline(chaos, tmp_path / "chaos.log", group="chaos-b")
        feeder.join(300)
        _wait(chaos, chaos_ep, "chaos-b", stream_id, media, ids, 900, lambda: state["proc"])
    finally:
        stop_pipeline(state["proc"])
    got = _outcome(chaos, chaos_ep, "chaos-b", stream_id)

    answers, identities, visual, speech, letters, manifest = got
    e_answers, e_identities, e_visual, e_speech, e_letters, e_manifest = expected
    # no note lost or written twice; the same notes, bit for bit: features and scores too
    # (docs/reliability.md, "Floats"), and the KV blocks' content below.
    assert set(identities.values()) == {1} and identities.keys() == e_identities.keys(), (
        {k: n for k, n in identities.items() if n > 1},
        identities.keys() ^ e_identities.keys(),
    )
    assert visual.keys() == e_visual.keys() and speech == e_speech
    for seq, (tier, _score, _feature, key, tokens) in visual.items():
        e_tier, _, _, e_key, e_tokens = e_visual[seq]
        assert (tier, key, tokens) == (e_tier, e_key, e_tokens), seq
    differ = sorted(seq for seq in visual if visual[seq] != e_visual[seq])
    assert not differ, f"frame notes not bit-identical to the uninterrupted run's: seq {differ}"
    assert len(visual) == len(list(media.frames_dir.glob("*.jpg")))
    # each bad message dead-lettered exactly once
    assert sorted(letters) == sorted(e_letters) and set(letters.values()) == {1} and len(letters) == 3
    # the same memory: every frame with its tier and tokens, every KV block with its time range and size
    frames = lambda m: [(f.seq, f.pts_us, f.tier, f.tokens, f.content_hash) for f in m.frames]  # noqa: E731
    assert frames(manifest) == frames(e_manifest)
    blocks = lambda m: [(b.block_index, b.start_us, b.end_us, b.nbytes) for b in m.kv_blocks]  # noqa: E731
    assert blocks(manifest) == blocks(e_manifest)
    same_content = sum(
        a.content_hash == b.content_hash
        for a, b in zip(manifest.kv_blocks, e_manifest.kv_blocks, strict=True)
    )
    assert same_content == len(manifest.kv_blocks), (
        f"{same_content}/{len(manifest.kv_blocks)} KV blocks bit-identical"
    )
    # every question answered exactly once, with the uninterrupted run's answer and evidence
    assert sorted(a.query_id for a in answers) == sorted(ids)
    got_answers = {a.query_id: a for a in answers}
    for e in e_answers:
        a = got_answers[e.query_id]
        assert a.text == e.text, (a.text, e.text)
        assert [(s.start_us, s.end_us) for s in a.evidence] == [(s.start_us, s.end_us) for s in e.evidence]
    exact = sum(visual[q] == e_visual[q] for q in visual)
    print(
        f"{kills} kills; {same_content}/{len(manifest.kv_blocks)} KV blocks and {exact}/{len(visual)} frame notes "
        "bit-identical"
    )
    assert kills >= KILLS
