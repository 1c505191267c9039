"""`streamvqa demo` end to end on the session's embedded stack."""

from __future__ import annotations

import pytest
from kafka import TopicPartition
from rich.console import Console
from streamvqa.schemas import DeadLetter, Frame, decode

from streamvqa import connect
from streamvqa.demo import run_demo
from streamvqa.settings import Settings
from streamvqa.storage.keys import content_hash

pytestmark = pytest.mark.stack


def test_demo_round_trips_real_frames_and_dead_letters_the_corrupt_one(stack_settings: Settings, endpoints) -> None:
    report = run_demo(stack_settings, frames=5, console=Console(quiet=True))
    assert report.ok
    assert report.frames_sent == report.frames_received == report.objects_verified == 5
    assert report.dead_letters and report.dead_letters[0].startswith("invalid_field")

    # The dead letter is on the topic, decodable, and points back at the bad message.
    consumer = connect.consumer(stack_settings, endpoints, group_id=None)
    topic = stack_settings.topics.dead_letter
    partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
    consumer.assign(partitions)
    consumer.seek_to_beginning(*partitions)
    letters = []
    for _ in range(10):
        for messages in consumer.poll(timeout_ms=500).values():
            letters += [decode(m.value, DeadLetter) for m in messages if m.key == report.stream_id.encode()]
        if letters:
            break
    consumer.close()
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
    consumer = connect.consumer(stack_settings, endpoints, group_id=None)
    topic = stack_settings.topics.frames
    partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
    consumer.assign(partitions)
    consumer.seek_to_beginning(*partitions)
    frames = []
    for _ in range(20):
        for messages in consumer.poll(timeout_ms=500).values():
            for m in messages:
                if m.key == report.stream_id.encode():
                    try:
                        frames.append(decode(m.value, Frame))
                    except ValueError:
                        pass  # the deliberately corrupt frame
        if len(frames) == 3:
            break
    consumer.close()
    assert [(f.seq, f.width, f.height, f.codec) for f in frames] == [(i, 176, 144, "jpeg") for i in range(3)]
    assert frames[0].pts_us < frames[1].pts_us < frames[2].pts_us
