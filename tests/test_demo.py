"""`streamvqa demo` end to end on the session's embedded stack."""

from __future__ import annotations

import pytest
from rich.console import Console
from streamvqa.schemas import DeadLetter, Frame, decode

from streamvqa import connect
from streamvqa.demo import run_demo
from streamvqa.settings import Settings
from streamvqa.storage.keys import content_hash
from tests.kafka_helpers import read_all

pytestmark = pytest.mark.stack


def test_demo_round_trips_real_frames_and_dead_letters_the_corrupt_one(stack_settings: Settings, endpoints) -> None:
    report = run_demo(stack_settings, frames=5, console=Console(quiet=True))
    assert report.ok
    assert report.frames_sent == report.frames_received == report.objects_verified == 5
    assert report.dead_letters and report.dead_letters[0].startswith("invalid_field")

    # The dead letter is on the topic, decodable, and points back at the bad message.
    letters = [decode(m.value, DeadLetter)
               for m in read_all(stack_settings, endpoints, stack_settings.topics.dead_letter)
               if m.key == report.stream_id.encode()]
    assert len(letters) == 1
    letter = letters[0]
    assert letter.source_topic == stack_settings.topics.frames
    assert letter.reason == "invalid_field"
    assert "JPEG" in letter.detail

    # The good frames' JPEGs are in the object store under the stream's prefix, content-addressed.
    store = connect.object_store(stack_settings, endpoints)
    objects = list(store.list(f"streams/{report.stream_id}/frames/"))
    assert len(objects) == 5
    for info in objects:
        data = store.get(info.key)
        assert info.key.endswith(content_hash(data)[:16])
        assert data[:2] == b"\xff\xd8"


def test_demo_frames_on_the_topic_are_valid_frame_records(stack_settings: Settings, endpoints) -> None:
    report = run_demo(stack_settings, frames=3, video="carphone_pristine.mp4", console=Console(quiet=True))
    mine = [m.value for m in read_all(stack_settings, endpoints, stack_settings.topics.frames)
            if m.key == report.stream_id.encode()]
    assert len(mine) == 4  # 3 frames and the deliberately corrupt one, last
    frames = [decode(value, Frame) for value in mine[:3]]
    assert [(f.seq, f.width, f.height, f.codec) for f in frames] == [(i, 176, 144, "jpeg") for i in range(3)]
    assert frames[0].pts_us < frames[1].pts_us < frames[2].pts_us
