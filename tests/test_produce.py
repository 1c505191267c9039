"""`streamvqa produce` against the real embedded broker (fresh topics per test)."""

from __future__ import annotations

import importlib.util
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from streamvqa import connect, media
from streamvqa.produce import ProduceOptions, produce, sample_times
from streamvqa.schemas import AudioChunk, Frame, decode, encode, validate
from tests.kafka_helpers import frame_bytes, new_topics, read_all

pytestmark = pytest.mark.stack


def _speech_wav(name: str = "beckett.wav") -> Path:
    spec = importlib.util.find_spec("moonshine_voice")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("speech WAVs come from the moonshine-voice wheel")
    return Path(spec.submodule_search_locations[0]) / "assets" / name


def _read(
    settings, endpoints, topic: str, record_type, expected: int | None = None, stream: str | None = None
):
    """(message, record) of ``topic`` (of ``stream`` only, if given), in offset order per partition."""
    consumer = connect.consumer(settings, endpoints, topic, group_id=None, consumer_timeout_ms=800)
    out = []
    deadline = time.monotonic() + 10.0
    try:
        while time.monotonic() < deadline:
            for m in consumer:
                if stream is None or m.key == stream.encode():
                    out.append((m, decode(m.value, record_type)))
            if expected is None or len(out) >= expected:
                break
    finally:
        consumer.close()
    return out


def _stream(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def test_sample_times_pick_the_closest_frame_once() -> None:
    # 25 fps source sampled at 10 fps: ticks every 100 ms, frames every 40 ms.
    pts = [i * 40_000 for i in range(26)]
    kept = sample_times(pts, 10)
    assert [pts[i] for i in kept] == [
        0,
        80_000,
        200_000,
        280_000,
        400_000,
        480_000,
        600_000,
        680_000,
        800_000,
        880_000,
        1_000_000,
    ]
    assert sample_times(pts, 100) == list(range(26))  # slower source: every frame, once
    assert sample_times(pts, None) == list(range(26))


def test_video_file_at_max_speed_with_fps_sampling(stack_settings, endpoints) -> None:
    frames_topic, audio_topic = new_topics(stack_settings, endpoints, "frames", "audio")
    stream = _stream("bikes")
    options = ProduceOptions(stream_id=stream, fps=5, max_width=320, max_height=320, jpeg_quality=70)
    report = produce(
        stack_settings,
        media.sample_video("bikes.mp4"),
        options,
        endpoints=endpoints,
        frames_topic=frames_topic,
        audio_topic=audio_topic,
    )
    assert report.frames == 50 and report.audio_chunks == 0  # 10 s at 5 fps; bikes.mp4 has no audio
    got = _read(stack_settings, endpoints, frames_topic, Frame, expected=50)
    assert len(got) == 50
    assert {m.key for m, _ in got} == {stream.encode()} and len({m.partition for m, _ in got}) == 1
    records = [r for _, r in got]
    for r in records:
        validate(r)
        assert (r.width, r.height) == (320, 136)  # 640x272 fitted into 320x320
        assert media.decode_jpeg(r.payload).shape == (136, 320, 3)
    assert [r.seq for r in records] == list(range(50))
    assert np.diff([r.pts_us for r in records]).tolist() == [200_000] * 49
    assert records[0].pts_us == 0
    assert "50 frames" in report.summary()


def test_folder_of_images(stack_settings, endpoints, tmp_path) -> None:
    from PIL import Image

    frames_topic, audio_topic = new_topics(stack_settings, endpoints, "frames", "audio")
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(5):
        Image.fromarray(np.full((48, 64, 3), i * 50, np.uint8)).save(folder / f"img_{i:03d}.png")
    (folder / "notes.txt").write_text("not an image")
    stream = _stream("imgs")
    report = produce(
        stack_settings,
        folder,
        ProduceOptions(stream_id=stream, image_fps=2.0, max_width=32),
        endpoints=endpoints,
        frames_topic=frames_topic,
        audio_topic=audio_topic,
    )
    assert report.frames == 5
    records = [r for _, r in _read(stack_settings, endpoints, frames_topic, Frame, expected=5)]
    assert [r.seq for r in records] == list(range(5))
    assert [r.pts_us for r in records] == [0, 500_000, 1_000_000, 1_500_000, 2_000_000]
    assert {(r.width, r.height) for r in records} == {(32, 24)}
    means = [int(media.decode_jpeg(r.payload).mean()) for r in records]
    assert means == sorted(means) and abs(means[-1] - 200) < 4  # in name order


def test_audio_chunks_from_a_separate_speech_wav(stack_settings, endpoints) -> None:
    wav = _speech_wav()
    frames_topic, audio_topic = new_topics(stack_settings, endpoints, "frames", "audio")
    stream = _stream("speech")
    options = ProduceOptions(stream_id=stream, fps=2, max_width=96, audio_path=wav, chunk_ms=1000)
    report = produce(
        stack_settings,
        media.sample_video("carphone_pristine.mp4"),
        options,
        endpoints=endpoints,
        frames_topic=frames_topic,
        audio_topic=audio_topic,
    )
    chunks = [r for _, r in _read(stack_settings, endpoints, audio_topic, AudioChunk, expected=10)]
    assert report.audio_chunks == len(chunks) == 10  # 9.96 s of speech in 1 s chunks
    assert [c.seq for c in chunks] == list(range(10))
    assert [c.pts_us for c in chunks] == [i * 1_000_000 for i in range(10)]
    assert {(c.sample_rate, c.channels, c.sample_format) for c in chunks} == {(16_000, 1, "f32le")}
    samples = np.concatenate([np.frombuffer(c.payload, "<f4") for c in chunks])
    assert all(len(c.payload) == 64_000 for c in chunks[:-1])
    assert len(samples) / 16_000 == pytest.approx(9.963, abs=0.01)
    assert 0.01 < float(np.abs(samples).mean()) < 0.5  # speech, not silence or garbage
    assert report.frames == 8  # the 4 s video at 2 fps


def test_resume_continues_numbering_without_gaps_or_duplicates(stack_settings, endpoints) -> None:
    # One partition, and another stream writing after ours: the tail search must widen.
    frames_topic, audio_topic = new_topics(stack_settings, endpoints, "frames", "audio", partitions=1)
    stream = _stream("resume")
    video = media.sample_video("bigbuckbunny.mp4")  # 5.3 s, H.264 + AAC audio

    def run(limit):
        options = ProduceOptions(stream_id=stream, fps=5, max_width=160, limit=limit, resume_window=7)
        return produce(
            stack_settings,
            video,
            options,
            endpoints=endpoints,
            frames_topic=frames_topic,
            audio_topic=audio_topic,
        )

    first = run(10)
    assert (first.frames, first.first_frame_seq) == (10, 0)
    producer = connect.producer(stack_settings, endpoints)
    for seq in range(20):
        producer.send(frames_topic, key=b"other", value=frame_bytes("other", 100 + seq))
        producer.send(audio_topic, key=b"other", value=b"not a record")
    producer.flush()
    producer.close()
    second = run(None)
    assert second.first_frame_seq == 10 and second.skipped_frames > 0
    assert second.first_audio_seq == first.audio_chunks
    expected = first.frames + second.frames
    frames = [r for _, r in _read(stack_settings, endpoints, frames_topic, Frame, expected, stream=stream)]
    assert [f.seq for f in frames] == list(range(len(frames)))
    pts = [f.pts_us for f in frames]
    assert np.diff(pts).tolist() == [200_000] * (len(pts) - 1)  # same grid as one uninterrupted run
    assert len(frames) == 27  # 5.3 s at 5 fps
    chunks = [r for _, r in _read(stack_settings, endpoints, audio_topic, AudioChunk, 6, stream=stream)]
    assert [c.seq for c in chunks] == list(range(len(chunks))) and len(chunks) == 6
    assert np.diff([c.pts_us for c in chunks]).tolist() == [1_000_000] * 5
    third = run(None)  # nothing left to send
    assert (third.frames, third.audio_chunks, third.first_frame_seq) == (0, 0, 27)


def test_resume_ignores_a_message_keyed_by_the_stream_that_names_another(
    stack_settings, endpoints, tmp_path
) -> None:
    """Issue #20, defect 5: the resume scan counts only records whose body names the stream. A message
    keyed K whose record is another stream's (seq and pts far ahead), or that does not decode, must not
    make `produce --stream-id K` skip its frames."""
    from PIL import Image

    frames_topic, audio_topic = new_topics(stack_settings, endpoints, "frames", "audio", partitions=1)
    for i in range(6):
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    stream = _stream("keyed")

    def run(limit=None):
        return produce(
            stack_settings,
            tmp_path,
            ProduceOptions(stream_id=stream, image_fps=2.0, limit=limit),
            endpoints=endpoints,
            frames_topic=frames_topic,
            audio_topic=audio_topic,
        )

    first = run(limit=2)
    assert (first.frames, first.first_frame_seq) == (2, 0)
    producer = connect.producer(stack_settings, endpoints)
    forged = Frame(
        stream_id="other",
        seq=10**9,
        pts_us=10**15,
        codec="jpeg",
        width=16,
        height=16,
        payload=b"\xff\xd8" + bytes(16) + b"\xff\xd9",
    )
    producer.send(frames_topic, key=stream.encode(), value=encode(forged))  # keyed K, body of "other"
    producer.send(frames_topic, key=stream.encode(), value=b"not a record")  # keyed K, does not decode
    producer.flush()
    producer.close()
    second = run()
    assert (second.frames, second.first_frame_seq, second.skipped_frames) == (4, 2, 2)
    records = [
        decode(m.value, Frame)
        for m in read_all(stack_settings, endpoints, frames_topic)
        if m.value != b"not a record"
    ]
    mine = [r for r in records if r.stream_id == stream]
    assert len(records) == len(mine) + 1  # and the forged one
    assert [r.seq for r in mine] == list(range(6))
    assert [r.pts_us for r in mine] == [i * 500_000 for i in range(6)]  # one uninterrupted run's frames
    assert run().frames == 0  # and it resumes from its own last frame, not the forged one


def test_realtime_pacing(stack_settings, endpoints) -> None:
    frames_topic, audio_topic = new_topics(stack_settings, endpoints, "frames", "audio")
    options = ProduceOptions(stream_id=_stream("paced"), fps=10, max_width=64, speed=1.0, limit=9)
    report = produce(
        stack_settings,
        media.sample_video("carphone_pristine.mp4"),
        options,
        endpoints=endpoints,
        frames_topic=frames_topic,
        audio_topic=audio_topic,
    )
    assert report.frames == 9
    assert report.last_frame_pts_us == pytest.approx(800_000, abs=40_000)
    assert 0.75 <= report.elapsed_s < 8.0  # 0.8 s of video in real time
    fast = ProduceOptions(stream_id=_stream("paced"), fps=10, max_width=64, speed=4.0, limit=9)
    quick = produce(
        stack_settings,
        media.sample_video("carphone_pristine.mp4"),
        fast,
        endpoints=endpoints,
        frames_topic=frames_topic,
        audio_topic=audio_topic,
    )
    assert 0.19 <= quick.elapsed_s < report.elapsed_s


def test_loops_continue_the_timeline(stack_settings, endpoints) -> None:
    frames_topic, audio_topic = new_topics(stack_settings, endpoints, "frames", "audio")
    options = ProduceOptions(stream_id=_stream("loops"), fps=5, max_width=96, loops=2, sample_format="s16le")
    report = produce(
        stack_settings,
        media.sample_video("bigbuckbunny.mp4"),
        options,
        endpoints=endpoints,
        frames_topic=frames_topic,
        audio_topic=audio_topic,
    )
    frames = [r for _, r in _read(stack_settings, endpoints, frames_topic, Frame, expected=report.frames)]
    assert [f.seq for f in frames] == list(range(report.frames))
    assert report.frames == 53  # 2 x 5.3 s (the audio is a little longer than the video) at 5 fps
    steps = np.diff([f.pts_us for f in frames]).tolist()
    assert all(160_000 <= step <= 240_000 for step in steps)  # one sampling grid across the seam
    assert steps.count(200_000) >= 50
    chunks = [
        r for _, r in _read(stack_settings, endpoints, audio_topic, AudioChunk, expected=report.audio_chunks)
    ]
    assert {c.sample_format for c in chunks} == {"s16le"} and len(chunks) == report.audio_chunks == 11
    # The second pass's audio starts where the first one's ends: one continuous chunk grid.
    assert [c.pts_us for c in chunks] == [i * 1_000_000 for i in range(11)]
    assert all(len(c.payload) == 32_000 for c in chunks[:-1])


def test_a_separate_audio_file_loops_with_the_video(stack_settings, endpoints, tmp_path) -> None:
    """A frames folder with a speech WAV, played 3 times: the speech comes in every pass, each
    pass starting where the previous one ended (the WAV is longer than the frames here)."""
    from PIL import Image

    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(4):
        Image.new("RGB", (32, 24), (60 * i, 0, 0)).save(folder / f"{i:03d}.jpg")
    frames_topic, audio_topic = new_topics(stack_settings, endpoints, "frames", "audio")
    options = ProduceOptions(
        stream_id=_stream("loopwav"), image_fps=1.0, audio_path=_speech_wav(), chunk_ms=1000, loops=3
    )
    report = produce(
        stack_settings,
        folder,
        options,
        endpoints=endpoints,
        frames_topic=frames_topic,
        audio_topic=audio_topic,
    )
    frames = [r for _, r in _read(stack_settings, endpoints, frames_topic, Frame, expected=report.frames)]
    chunks = [
        r for _, r in _read(stack_settings, endpoints, audio_topic, AudioChunk, expected=report.audio_chunks)
    ]
    assert report.frames == 12
    # each pass lasts as long as its 9.96 s of speech: frames at 0-3 s, ~9.96-12.96 s, ~19.93-22.93 s
    assert [round(f.pts_us / 1e6) for f in frames] == [0, 1, 2, 3, 10, 11, 12, 13, 20, 21, 22, 23]
    samples = np.concatenate([np.frombuffer(c.payload, "<f4") for c in chunks])
    assert len(samples) / 16_000 == pytest.approx(3 * 9.963, abs=0.05)
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    once = samples[: len(samples) // 3]
    assert 0.01 < float(np.abs(samples[-len(once) :]).mean()) < 0.5  # the last pass has speech too


def test_command_line(stack_settings, endpoints, tmp_path) -> None:
    import typer
    from PIL import Image
    from typer.testing import CliRunner

    from streamvqa.produce import produce_command

    frames_topic, audio_topic = new_topics(stack_settings, endpoints, "frames", "audio")
    for i in range(3):
        Image.fromarray(np.full((16, 16, 3), 9 * i, np.uint8)).save(tmp_path / f"{i}.jpg")
    app = typer.Typer()
    app.command("produce")(produce_command)
    app.command("noop")(lambda: None)  # two commands: typer keeps the sub-command name
    args = [
        "produce",
        str(tmp_path),
        "--stream-id",
        "cli-1",
        "--data-dir",
        str(stack_settings.data_dir),
        "--frames-topic",
        frames_topic,
        "--audio-topic",
        audio_topic,
        "--quiet",
        "--image-fps",
        "4",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "stream cli-1: 3 frames (seq 0..2), 0 audio chunks" in result.output
    result = CliRunner().invoke(app, args)  # nothing new to send
    assert result.exit_code == 0 and "0 frames" in result.output
    result = CliRunner().invoke(app, [*args[:2], "--stream-id", "bad id!", *args[4:]])
    assert result.exit_code != 0
