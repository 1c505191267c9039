"""The demo stream built from packaged media (the end-to-end run is tests/test_pipeline_e2e.py)."""

from __future__ import annotations

import numpy as np
import pytest

from streamvqa.demo import bad_messages
from streamvqa.demo_media import QUESTIONS, RATE, build_demo_media, read_wav
from streamvqa.media import decode_jpeg
from streamvqa.pipelines.video_qa.frames import pixels_of
from streamvqa.schemas import Frame, InvalidField, SchemaError, decode


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    return build_demo_media(tmp_path_factory.mktemp("media"), scene_s=15.0, fps=1.0)


def test_frames_scenes_and_question_images(media) -> None:
    frames = sorted(media.frames_dir.glob("*.jpg"))
    assert len(frames) == 45 and media.duration_s == 45.0
    assert [s[0] for s in media.scenes] == ["bikes", "carphone", "bunny"]
    assert decode_jpeg(frames[0].read_bytes()).shape == (240, 320, 3)
    image_questions = [i for i, q in enumerate(media.questions) if q.image_from]
    assert sorted(media.images) == image_questions
    assert decode_jpeg(media.images[image_questions[0]])[:2].size > 0


def test_speech_lies_where_the_script_says(media) -> None:
    audio = read_wav(media.audio_path)
    assert len(audio) == int(media.duration_s * RATE)
    for start, end, text in media.utterances:
        assert end <= media.duration_s and text
        inside = audio[int(start * RATE) : int(end * RATE)]
        assert np.sqrt(np.mean(inside**2)) > 0.01
    first_start = media.utterances[0][0]
    assert np.abs(audio[: int(first_start * RATE) - 100]).max() == 0.0  # silence before the first


def test_a_shorter_demo_drops_what_does_not_fit(tmp_path) -> None:
    short = build_demo_media(tmp_path, scene_s=10.0, fps=0.5)
    assert len(list(short.frames_dir.glob("*.jpg"))) == 15
    assert all(end <= short.duration_s for _, end, _ in short.utterances)
    assert len(short.utterances) == 2  # the third starts at 31 s


def test_questions_ask_about_the_stream() -> None:
    for q in QUESTIONS:
        assert 0 <= q.expect[0] < q.expect[1] <= q.at_s + 1.0  # a question is about what came before it


def test_injected_bad_messages_are_refused_with_distinct_reasons(media) -> None:
    sample = Frame(
        stream_id="s",
        seq=1,
        pts_us=0,
        codec="jpeg",
        width=320,
        height=240,
        payload=sorted(media.frames_dir.glob("*.jpg"))[0].read_bytes(),
    )
    reasons = []
    for _, value in bad_messages("s", sample):
        try:
            frame = decode(value, Frame)
        except SchemaError as err:
            reasons.append(err.reason)
        else:  # decodes as a record: the frame stage refuses its payload
            with pytest.raises(InvalidField):
                pixels_of(frame)
            reasons.append("payload")
    assert sorted(reasons) == ["malformed", "payload", "truncated"]
