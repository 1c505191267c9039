"""Dependency faults against the main pipeline: the object store stopped for 30 s mid-stream, and
the broker (durable storage) restarted mid-stream.
The pipeline process stays up (its supervisor runs the pipeline again with backoff), nothing is
consumed past what could be committed (the inputs wait in Kafka), and once the store is back
everything catches up: every question answered once, every frame noted once, nothing lost."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from streamvqa.demo import start_pipeline, stop_pipeline
from streamvqa.demo_media import build_demo_media
from tests.test_pipeline_chaos import _ask, _outcome, _settings, _stream, _wait

pytestmark = [pytest.mark.stack, pytest.mark.slow]
OUTAGE_S = 30.0


def _start(settings, tmp_path, prefix: str, group: str):
    """(demo media, a new stream id, the pipeline's log, the pipeline process)."""
    media = build_demo_media(tmp_path / "media", scene_s=15.0, fps=1.0)
    log = tmp_path / "pipeline.log"
    return media, f"{prefix}-{uuid.uuid4().hex[:6]}", log, start_pipeline(settings, log, group=group)


def _assert_exactly_once(answers, ids, identities, visual, letters, media) -> None:
    assert sorted(a.query_id for a in answers) == sorted(ids)  # each answered, once
    assert set(identities.values()) == {1}  # no note written twice
    assert sorted(visual) == list(range(len(list(media.frames_dir.glob("*.jpg")))))  # no frame lost
    assert len(letters) == 3 and set(letters.values()) == {1}


def test_object_store_outage_costs_time_not_data(private_stack, tmp_path) -> None:
    private_stack.up()
    settings, endpoints = _settings(private_stack.settings, f"f{uuid.uuid4().hex[:4]}")
    media, stream_id, log, proc = _start(settings, tmp_path, "outage", "faults")
    try:
        ids = _ask(settings, endpoints, media, stream_id)
        feeder = threading.Thread(
            target=_stream, args=(settings, endpoints, media, stream_id, 2.0), daemon=True
        )
        feeder.start()
        time.sleep(8.0)  # mid-stream
        assert private_stack.s3.stop(grace_s=0.5)
        time.sleep(OUTAGE_S)
        assert proc.poll() is None, "the pipeline process died with the object store"
        private_stack.up()  # the store comes back (same data, same port)
        feeder.join(120)
        _wait(settings, endpoints, "faults", stream_id, media, ids, 600, lambda: proc)
    finally:
        stop_pipeline(proc)
    answers, identities, visual, _speech, letters, manifest = _outcome(
        settings, endpoints, "faults", stream_id
    )
    _assert_exactly_once(answers, ids, identities, visual, letters, media)
    assert len(manifest.frames) == len(visual)
    for answer, question in zip(sorted(answers, key=lambda a: a.query_id), media.questions, strict=True):
        lo, hi = (int(x * 1e6) for x in question.expect)
        assert answer.evidence and answer.evidence[0].start_us < hi and answer.evidence[0].end_us > lo, answer
    assert "pipeline run failed" in log.read_text(errors="replace")  # the outage was felt, and outlived


def test_broker_restart_mid_stream_costs_time_not_data(private_stack, tmp_path) -> None:
    private_stack.up(broker_storage="s3")  # durable: topics and offsets survive a restart
    settings, endpoints = _settings(
        private_stack.settings.model_copy(
            update={"local": private_stack.settings.local.model_copy(update={"broker_storage": "s3"})}
        ),
        f"k{uuid.uuid4().hex[:4]}",
    )
    media, stream_id, log, proc = _start(settings, tmp_path, "broker", "faults-broker")
    try:
        ids = _ask(settings, endpoints, media, stream_id)
        _stream(settings, endpoints, media, stream_id, None)  # all of it in the broker first
        time.sleep(8.0)  # the pipeline is mid-stream
        assert private_stack.broker.stop(grace_s=0.5)
        time.sleep(10.0)
        assert proc.poll() is None, "the pipeline process died with the broker"
        private_stack.up(broker_storage="s3")
        _wait(settings, endpoints, "faults-broker", stream_id, media, ids, 600, lambda: proc)
    finally:
        stop_pipeline(proc)
    answers, identities, visual, _speech, letters, _manifest = _outcome(
        settings, endpoints, "faults-broker", stream_id
    )
    _assert_exactly_once(answers, ids, identities, visual, letters, media)
    assert "ECONNREFUSED" in log.read_text(errors="replace")  # the restart was felt, and outlived
