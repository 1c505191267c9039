"""The main pipeline end to end on the embedded stack: `streamvqa run pipeline` as a process of
its own, the demo stream (three scenes, three utterances) published with injected bad frames,
questions about what was said and an image question, answers on the answers topic."""

from __future__ import annotations

import io
import json
from collections import Counter

import pytest
from rich.console import Console

from streamvqa.demo import run_demo
from tests.kafka_helpers import private_topics, read_all

pytestmark = [pytest.mark.stack, pytest.mark.slow]


def test_stream_questions_answers_and_dead_letters(stack_settings, tmp_path) -> None:
    settings, endpoints = private_topics(stack_settings, "e2e")
    out = io.StringIO()
    result = run_demo(
        settings,
        speed=None,
        scene_s=15.0,
        fps=1.0,
        report_dir=tmp_path / "report",
        answer_timeout_s=400,
        console=Console(file=out, width=200),
    )
    media = result.media
    # every question answered, exactly once (on the topic too, not only as the demo saw it)
    assert sorted(result.answers) == list(range(len(media.questions)))
    on_topic = Counter(m.key.decode() for m in read_all(settings, endpoints, settings.topics.answers))
    assert sorted(on_topic) == sorted(f"{result.stream_id}-q{i + 1}" for i in range(len(media.questions)))
    assert set(on_topic.values()) == {1}
    # evidence inside the right utterance or scene, best span first
    for i, question in enumerate(media.questions):
        answer = result.answers[i]
        assert result.hit(i), (question.text, answer.text, answer.evidence)
        assert [s.stage for s in answer.latency][-1] == "total"
    image_answer = result.answers[next(i for i, q in enumerate(media.questions) if q.image_from)]
    assert image_answer.text.startswith("It appeared at")
    # the bad frames went to the dead letters with their reasons, and the stream went on
    assert sorted(d.reason for d in result.dead_letters) == ["invalid_field", "malformed", "truncated"]
    assert all(d.source_topic == settings.topics.frames for d in result.dead_letters)
    assert result.frames_noted == len(list(media.frames_dir.glob("*.jpg")))
    assert result.ok
    # the report
    html = result.report_path.read_text()
    assert result.stream_id in html and all(q.text.split(",")[0] in html for q in media.questions)
    for png in ("timeline.png", "memory.png", "latency.png"):
        assert (tmp_path / "report" / png).stat().st_size > 10_000
    assert list((tmp_path / "report" / "keyframes").glob("*.jpg"))
    # what was printed: the answers with their evidence; never the object store's credentials
    printed = out.getvalue()
    assert all(f"A{i + 1}:" in printed for i in range(len(media.questions))) and "evidence" in printed
    secret = json.loads((settings.stack_dir / "seaweedfs" / "credentials.json").read_text())["secret_key"]
    log = (settings.data_dir / "demo" / "pipeline.log").read_text(errors="replace")
    assert "pipeline streamvqa" in log  # the pipeline's own log was written
    for where, text in [("console", printed), ("pipeline log", log), ("report", html)]:
        assert secret not in text, where
