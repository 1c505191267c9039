"""`streamvqa produce`: publish a video source to the frames and audio topics.

Sources
    * a video file (anything PyAV/FFmpeg opens: MP4, MKV, MPEG-2, WAV/MP3 audio-only, ...);
    * a URL (``rtsp://``, ``http(s)://``, ``udp://``, ...): passed to ``av.open`` unchanged, so
      FFmpeg's protocol support decides what works (``--av-option rtsp_transport=tcp`` helps
      RTSP through firewalls); it is a *live* source (see the resume rule);
    * a capture device: ``/dev/video0`` opens with ``format="v4l2"`` on Linux (other systems:
      ``--format avfoundation`` on macOS, ``--format dshow`` with ``video=NAME`` on Windows);
      also live;
    * a folder of images (JPEG/PNG/BMP/WebP, sorted by name), one frame every
      ``1/image_fps`` seconds.

Frames are optionally sampled to ``fps`` (for each tick ``t0 + k/fps`` of a grid anchored at the
source's first frame, the frame whose pts is closest to the tick; a source frame is never sent
twice), resized to fit ``max_width`` x ``max_height`` (aspect kept, never enlarged) and
JPEG-encoded. The source's audio (or a separate ``audio_path`` file, aligned at t=0 of every
pass when ``loops`` > 1) is
resampled to 16 kHz mono and cut into ``chunk_ms`` chunks on a grid anchored at the audio's
first sample. Every message is keyed by the stream id (one stream -> one partition, in order);
its Kafka timestamp is the presentation time on the wall clock of this run
(``now_at_first_record + pts - first_pts``).

Pacing: ``speed=None`` sends as fast as possible; ``speed=1.0`` sleeps to match the pts
(real time); ``speed=X`` plays X times faster.

Resume rule
    Before sending, the tail of the partition that the stream id hashes to (the producer's own
    partitioner) is read on the frames and on the audio topic, at most ``resume_window``
    messages back from the high watermark (taken from a fetch response: ListOffsets "latest"
    is wrong on the embedded broker), widening the window until a record of the stream (keyed by
    the stream id and naming it in its body; anything else is skipped) is found or the
    partition's start is reached. Sequence numbers continue at ``last_seq + 1``
    (frames and audio separately).

    * File and folder sources are deterministic: the sampling grid and the audio chunk grid
      are the same on every run, so a restarted producer skips source frames whose pts is
      ``<=`` the last published frame's pts and audio chunks whose pts is ``<=`` the last
      published chunk's pts; an interrupted run followed by a restart publishes exactly what
      one uninterrupted run would have.
    * Live sources (URLs, devices) restart their own clock: their timeline is shifted so the
      first new frame lands one frame interval after the last published pts (audio likewise
      after the last chunk's end). Nothing is skipped.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, cast

import numpy as np
import typer

if TYPE_CHECKING:  # imported where used: `streamvqa --help` stays quick
    from streamvqa import connect
    from streamvqa.schemas import AudioChunk, Frame, Limits
    from streamvqa.settings import Settings

__all__ = [
    "AUDIO_RATE",
    "IMAGE_SUFFIXES",
    "LastRecord",
    "ProduceError",
    "ProduceOptions",
    "ProduceReport",
    "find_last",
    "high_watermark",
    "produce",
    "produce_command",
    "sample_times",
]

AUDIO_RATE = 16_000
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
_LIVE_PREFIXES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://", "udp://", "tcp://", "srt://")


class ProduceError(RuntimeError):
    """A source could not be read or the broker refused records."""


@dataclass(frozen=True)
class ProduceOptions:
    """What to send and how fast. ``limit`` counts frames published by this run."""

    stream_id: str
    fps: float | None = None  # frame sampling; None: every source frame
    max_width: int | None = None
    max_height: int | None = None
    jpeg_quality: int = 85
    speed: float | None = None  # None: as fast as possible; 1.0: real time
    start_s: float = 0.0  # skip source time before this
    limit: int | None = None  # at most this many frames in this run
    loops: int = 1  # play a file/folder this many times (timeline continues)
    audio: bool = True  # publish the source's audio stream, if it has one
    audio_path: Path | None = None  # a separate audio file muxed into the stream (at t=0 of each loop)
    chunk_ms: int = 1000
    sample_format: str = "f32le"  # or "s16le"
    image_fps: float = 1.0  # frame rate of a folder of images
    input_format: str | None = None  # FFmpeg input format (v4l2, avfoundation, dshow, ...)
    av_options: dict[str, str] = field(default_factory=dict)  # FFmpeg input options
    resume: bool = True
    resume_window: int = 1000  # messages read back from the end per step

    def __post_init__(self) -> None:
        from streamvqa.schemas import validate_id

        validate_id(self.stream_id, "stream_id")  # InvalidField (a ValueError) naming it
        checks = {
            "fps": self.fps is None or self.fps > 0,
            "speed": self.speed is None or self.speed > 0,
            "max_width": self.max_width is None or self.max_width >= 1,
            "max_height": self.max_height is None or self.max_height >= 1,
            "jpeg_quality": 1 <= self.jpeg_quality <= 100,
            "start_s": self.start_s >= 0,
            "limit": self.limit is None or self.limit >= 0,
            "loops": self.loops >= 1,
            "chunk_ms": 10 <= self.chunk_ms <= 60_000,
            "sample_format": self.sample_format in ("f32le", "s16le"),
            "image_fps": self.image_fps > 0,
            "resume_window": self.resume_window >= 1,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(
                f"invalid produce options: {', '.join(f'{n}={getattr(self, n)!r}' for n in bad)}"
            )


@dataclass
class ProduceReport:
    stream_id: str
    frames: int = 0
    audio_chunks: int = 0
    bytes: int = 0
    elapsed_s: float = 0.0
    first_frame_seq: int = 0  # the seq this run started numbering frames at
    first_audio_seq: int = 0
    last_frame_pts_us: int | None = None
    last_audio_pts_us: int | None = None
    skipped_frames: int = 0  # already published (resume) or before start_s

    def summary(self) -> str:
        rate = self.bytes / 1e6 / self.elapsed_s if self.elapsed_s > 0 else 0.0
        seqs = (
            f"seq {self.first_frame_seq}..{self.first_frame_seq + self.frames - 1}"
            if self.frames
            else f"next seq {self.first_frame_seq}"
        )
        return (
            f"stream {self.stream_id}: {self.frames} frames ({seqs}), {self.audio_chunks} audio chunks, "
            f"{self.bytes / 1e6:.2f} MB in {self.elapsed_s:.2f} s ({rate:.1f} MB/s)"
        )


@dataclass(frozen=True)
class LastRecord:
    """The last record of a stream found on a topic."""

    seq: int
    pts_us: int
    end_us: int  # pts + duration (audio) or pts (frames)
    offset: int


# --------------------------------------------------------------------------- resume


class _Cluster:
    """The two questions kafka-python's partitioners ask of cluster metadata."""

    def __init__(self, topic: str, partitions: set[int]) -> None:
        self._topic, self._partitions = topic, partitions

    def topics(self) -> set[str]:
        return {self._topic}

    def partitions_for_topic(self, topic: str) -> set[int]:
        return self._partitions

    def available_partitions_for_topic(self, topic: str) -> set[int]:
        return self._partitions


def partition_for(producer: Any, topic: str, key: bytes) -> int:
    """The partition ``producer`` sends ``key`` to on ``topic`` (its configured partitioner)."""
    partitions = producer.partitions_for(topic)
    if not partitions:
        raise ProduceError(f"topic {topic!r} does not exist or has no partitions")
    return producer.config["partitioner"].partition(
        topic, key, key, None, None, _Cluster(topic, set(partitions))
    )


def find_last(
    consumer_factory: Callable[[], Any],
    topic: str,
    partition: int,
    stream_id: str,
    record_type: type[Frame] | type[AudioChunk],
    window: int = 1000,
    timeout_s: float = 30.0,
) -> LastRecord | None:
    """The record of ``stream_id`` with the highest seq near the end of ``topic``/``partition``.

    Reads ``[high - window, high)``, then twice as far back, ... until a record of the stream
    turns up or the partition's first offset is reached. Only a message keyed ``stream_id`` whose
    record decodes and names ``stream_id`` counts: messages with another key, that do not decode,
    or whose record is of another stream than their key says are ignored (one such message must
    not stop a stream from resuming).
    """
    from kafka import TopicPartition

    tp = TopicPartition(topic, partition)
    key = stream_id.encode()
    consumer = consumer_factory()
    try:
        consumer.assign([tp])
        begin = int(consumer.beginning_offsets([tp])[tp])
        high = high_watermark(consumer, tp, begin, timeout_s)
        stop, span = high, window
        while stop > begin:
            start = max(begin, stop - span)
            best = _scan_range(consumer, tp, start, stop, key, record_type, timeout_s)
            if best is not None:
                return best
            stop, span = start, span * 2
        return None
    finally:
        consumer.close()


def high_watermark(consumer: Any, tp: Any, begin: int | None = None, timeout_s: float = 30.0) -> int:
    """The end of partition ``tp`` (assigned to ``consumer``), from a fetch response: ListOffsets
    "latest" is wrong on the embedded broker. ``begin``: where to fetch from (default: the
    partition's first offset). Leaves the consumer positioned somewhere at or after ``begin``."""
    if begin is None:
        begin = int(consumer.beginning_offsets([tp])[tp])
    consumer.seek(tp, begin)
    deadline = time.monotonic() + timeout_s
    while True:
        consumer.poll(timeout_ms=100, max_records=1)
        high = consumer.highwater(tp)
        if high is not None:
            return int(high)
        if time.monotonic() > deadline:
            raise ProduceError(f"no fetch response from {tp.topic}/{tp.partition} in {timeout_s} s")


def _scan_range(consumer, tp, start, stop, key, record_type, timeout_s) -> LastRecord | None:
    from streamvqa.schemas import SchemaError, decode

    consumer.seek(tp, start)
    best: LastRecord | None = None
    deadline = time.monotonic() + timeout_s
    while consumer.position(tp) < stop:
        if time.monotonic() > deadline:
            raise ProduceError(f"could not read {tp.topic}/{tp.partition} up to offset {stop}")
        for message in consumer.poll(timeout_ms=200, max_records=500).get(tp, []):
            if message.offset >= stop or message.key != key:
                continue
            try:
                record = decode(message.value, record_type)
            except SchemaError:
                continue
            if record.stream_id.encode() != key:  # the body names another stream than the key
                continue
            if best is None or record.seq > best.seq:
                best = LastRecord(record.seq, record.pts_us, _end_us(record), message.offset)
    return best


def _end_us(record: Frame | AudioChunk) -> int:
    if hasattr(record, "sample_rate"):
        audio = cast("AudioChunk", record)  # only AudioChunk has a sample rate
        width = audio.channels * (2 if audio.sample_format == "s16le" else 4)
        return audio.pts_us + len(audio.payload) // width * 1_000_000 // audio.sample_rate
    return record.pts_us


# --------------------------------------------------------------------------- sources


@dataclass(frozen=True, slots=True)
class _VideoEvent:
    pts_us: int
    image: Any  # av.VideoFrame, PIL path or ndarray: turned into RGB only when sent


@dataclass(frozen=True, slots=True)
class _AudioEvent:
    pts_us: int
    samples: np.ndarray  # float32 mono 16 kHz


def is_live(source: str) -> bool:
    return source.startswith(_LIVE_PREFIXES) or source.startswith("/dev/")


def _open(source: str, options: ProduceOptions):
    import av

    fmt = options.input_format
    if fmt is None and source.startswith("/dev/video"):
        fmt = "v4l2"
    try:
        return av.open(source, format=fmt, options=dict(options.av_options) or None)
    except (av.FFmpegError, OSError) as err:
        raise ProduceError(f"cannot open {source!r}: {err}") from err


def _us(pts: int | None, time_base: Fraction | None) -> int | None:
    if pts is None or time_base is None:
        return None
    return round(pts * time_base * 1_000_000)


def _container_events(source: str, options: ProduceOptions, video: bool, audio: bool) -> Iterator[Any]:
    """Video frames and 16 kHz mono audio blocks of one container, pts relative to its start."""
    import av

    container = _open(source, options)
    try:
        streams = []
        vstream = container.streams.video[0] if video and container.streams.video else None
        astream = container.streams.audio[0] if audio and container.streams.audio else None
        streams = [s for s in (vstream, astream) if s is not None]
        if not streams:
            return
        if vstream is not None:
            vstream.thread_type = "AUTO"
        origin = (container.start_time or 0) if container.start_time is not None else 0  # AV_TIME_BASE = us
        resampler = av.AudioResampler(format="flt", layout="mono", rate=AUDIO_RATE) if astream else None
        audio_next: int | None = None  # pts of the next resampled sample (us)
        fallback = itertools.count()
        for packet in container.demux(*streams):
            try:
                frames = packet.decode()
            except av.FFmpegError:
                continue  # a damaged packet: skip it, as players do
            for frame in frames:
                if packet.stream is vstream:
                    pts = _us(frame.pts, frame.time_base)
                    if pts is None:
                        rate = vstream.average_rate or 25
                        pts = round(next(fallback) * 1_000_000 / float(rate))
                    yield _VideoEvent(max(0, pts - origin), frame)
                else:
                    assert resampler is not None  # there is an audio stream
                    for block in resampler.resample(frame):
                        samples = block.to_ndarray().reshape(-1).astype(np.float32, copy=False)
                        if audio_next is None:
                            first = _us(frame.pts, frame.time_base)
                            audio_next = max(0, (first or 0) - origin)
                        yield _AudioEvent(audio_next, samples)
                        audio_next += len(samples) * 1_000_000 // AUDIO_RATE
        if resampler is not None:
            for block in resampler.resample(None):
                samples = block.to_ndarray().reshape(-1).astype(np.float32, copy=False)
                yield _AudioEvent(audio_next or 0, samples)
    except av.FFmpegError as err:
        raise ProduceError(f"error reading {source!r}: {err}") from err
    finally:
        container.close()


def _image_events(folder: Path, image_fps: float) -> Iterator[_VideoEvent]:
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise ProduceError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    for index, path in enumerate(paths):
        yield _VideoEvent(round(index * 1_000_000 / image_fps), path)


def _source_events(source: str, options: ProduceOptions) -> Iterator[Any]:
    """One pass over the source: video events, and audio events of the source itself or of the
    separate ``audio_path`` file (from the pass's t=0: with ``loops`` it plays again each pass)."""
    path = Path(source)
    if not is_live(source) and path.is_dir():
        events: Iterator[Any] = _image_events(path, options.image_fps)
    else:
        if not is_live(source) and not path.exists():
            raise ProduceError(f"no such file or folder: {source}")
        events = _container_events(
            source, options, video=True, audio=options.audio and options.audio_path is None
        )
    if options.audio_path is not None and options.audio:
        events = heapq.merge(
            events, _file_audio_events(Path(options.audio_path), options), key=lambda e: e.pts_us
        )
    yield from events


def sample_times(pts_us: Iterable[int], fps: float | None) -> list[int]:
    """Indexes of the frames that fps sampling keeps (see the module docstring)."""
    return [event.image for event in _sample((_VideoEvent(p, i) for i, p in enumerate(pts_us)), fps)]


def _sample(events: Iterable[Any], fps: float | None) -> Iterator[Any]:
    """Keep, for each tick of a ``1/fps`` grid anchored at the first video frame, the video
    frame closest to it (the earlier one on a tie), each at most once; audio passes through."""
    if fps is None:
        yield from events
        return
    interval = 1_000_000 / fps
    tick: float | None = None
    prev: _VideoEvent | None = None
    last_sent: _VideoEvent | None = None
    for event in events:
        if not isinstance(event, _VideoEvent):
            yield event
            continue
        pts = event.pts_us
        if tick is None:
            tick = pts
        while pts >= tick:
            chosen = event
            if prev is not None and tick - prev.pts_us <= pts - tick:
                chosen = prev
            if chosen is not last_sent:
                last_sent = chosen
                yield chosen
            tick += interval
        prev = event


def _timeline(source: str, options: ProduceOptions) -> Iterator[Any]:
    """Sampled video events and audio blocks over all loops, on one continuous timeline and
    one sampling grid. Loop ``k+1`` starts where loop ``k`` ends: one frame interval after
    its last frame, or at the end of its audio if that is later."""
    return _sample(_loops(source, options), options.fps)


def _loops(source: str, options: ProduceOptions) -> Iterator[Any]:
    offset = 0
    for _ in range(1 if is_live(source) else options.loops):
        loop = _Loop(offset)
        yield from loop.shift(_source_events(source, options))
        offset = loop.end(round(1_000_000 / (options.fps or options.image_fps)))


class _Loop:
    """Shifts one pass over the source by ``offset`` and notes where it ends."""

    def __init__(self, offset: int) -> None:
        self.offset = offset
        self.video_end: int | None = None  # last frame's pts
        self.audio_end = offset
        self.last_video: int | None = None
        self.intervals: list[int] = []

    def shift(self, events: Iterator[Any]) -> Iterator[Any]:
        for event in events:
            if isinstance(event, _VideoEvent):
                if self.last_video is not None and len(self.intervals) < 64:
                    self.intervals.append(event.pts_us - self.last_video)
                self.last_video = event.pts_us
                event = _VideoEvent(event.pts_us + self.offset, event.image)
                self.video_end = max(self.video_end or 0, event.pts_us)
            else:
                event = _AudioEvent(event.pts_us + self.offset, event.samples)
                self.audio_end = max(
                    self.audio_end, event.pts_us + len(event.samples) * 1_000_000 // AUDIO_RATE
                )
            yield event

    def end(self, default_step: int) -> int:
        step = int(np.median(self.intervals)) if self.intervals else default_step
        video = self.video_end + step if self.video_end is not None else self.offset
        return max(video, self.audio_end)


# --------------------------------------------------------------------------- sending


def _rgb(image: Any, max_w: int | None, max_h: int | None) -> np.ndarray:
    """An RGB uint8 array of a frame, fitted into max_w x max_h (aspect kept, not enlarged)."""
    if isinstance(image, Path):
        from PIL import Image

        with Image.open(image) as opened:
            picture = opened.convert("RGB")
            width, height = _fit(picture.width, picture.height, max_w, max_h)
            if (width, height) != picture.size:
                picture = picture.resize((width, height), Image.Resampling.BILINEAR)
            return np.asarray(picture)
    width, height = _fit(image.width, image.height, max_w, max_h)
    if (width, height) != (image.width, image.height):
        return image.to_ndarray(format="rgb24", width=width, height=height)
    return image.to_ndarray(format="rgb24")


def _fit(width: int, height: int, max_w: int | None, max_h: int | None) -> tuple[int, int]:
    scale = min(1.0, (max_w or width) / width, (max_h or height) / height)
    if scale >= 1.0:
        return width, height
    return max(1, round(width * scale)), max(1, round(height * scale))


class _AudioChunker:
    """Cuts a float32 sample stream into fixed chunks on a grid anchored at its first sample.

    A block whose pts is more than ``max_jump_us`` away from where the stream stands (a new
    loop, a hole in a live source) ends the current grid: the partial chunk goes out and a
    new grid starts at the block."""

    def __init__(self, chunk_samples: int, max_jump_us: int = 20_000) -> None:
        self.chunk_samples = chunk_samples
        self.max_jump_us = max_jump_us
        self.buffer: list[np.ndarray] = []
        self.buffered = 0
        self.emitted = 0  # samples emitted since the grid's anchor
        self.anchor_us: int | None = None

    def push(self, pts_us: int, samples: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        if self.anchor_us is not None:
            expected = self.anchor_us + (self.emitted + self.buffered) * 1_000_000 // AUDIO_RATE
            if abs(pts_us - expected) > self.max_jump_us:
                yield from self.flush()
        if self.anchor_us is None:
            self.anchor_us = pts_us
        self.buffer.append(samples)
        self.buffered += len(samples)
        while self.buffered >= self.chunk_samples:
            yield self._take(self.chunk_samples)

    def flush(self) -> Iterator[tuple[int, np.ndarray]]:
        if self.buffered:
            yield self._take(self.buffered)
        self.anchor_us = None
        self.emitted = 0

    def _take(self, n: int) -> tuple[int, np.ndarray]:
        data = np.concatenate(self.buffer) if len(self.buffer) > 1 else self.buffer[0]
        chunk, rest = data[:n], data[n:]
        self.buffer = [rest] if len(rest) else []
        self.buffered = len(rest)
        assert self.anchor_us is not None  # set by the first push, before anything is buffered
        pts = self.anchor_us + self.emitted * 1_000_000 // AUDIO_RATE
        self.emitted += n
        return pts, chunk


def _pcm(samples: np.ndarray, sample_format: str) -> bytes:
    if sample_format == "s16le":
        return (np.clip(samples, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()
    return np.ascontiguousarray(samples, dtype="<f4").tobytes()


def _file_audio_events(path: Path, options: ProduceOptions) -> Iterator[_AudioEvent]:
    if not path.is_file():
        raise ProduceError(f"no such audio file: {path}")
    yield from _container_events(str(path), options, video=False, audio=True)


class _closing:
    """Close a generator (and the containers it holds open) when leaving the block."""

    def __init__(self, events: Iterator[Any]) -> None:
        self.events = events

    def __enter__(self) -> Iterator[Any]:
        return self.events

    def __exit__(self, *exc: object) -> None:
        close = getattr(self.events, "close", None)
        if close is not None:
            close()


def _progress(enabled: bool, total: int | None, label: str):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"),
    ]
    progress = Progress(*columns, disable=not enabled, transient=False)
    task = progress.add_task(label, total=total, info="")
    return progress, task


def _estimate_frames(source: str, options: ProduceOptions) -> int | None:
    """Frames this run should send, when a file says how long it is (progress bar total)."""
    try:
        path = Path(source)
        if is_live(source):
            return options.limit
        if path.is_dir():
            count = sum(1 for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            duration = count / options.image_fps
            per_loop = count if options.fps is None else math.ceil(duration * options.fps)
        else:
            import av

            with av.open(source) as container:
                if not container.streams.video:
                    return options.limit
                stream = container.streams.video[0]
                frames = stream.frames or 0
                duration = (container.duration or 0) / 1_000_000
                if options.fps is None:
                    per_loop = frames or round(duration * float(stream.average_rate or 25))
                else:
                    per_loop = math.ceil(duration * options.fps)
        total = per_loop * options.loops
        return min(total, options.limit) if options.limit is not None else total
    except Exception:
        return options.limit


def produce(
    settings: Settings,
    source: str | Path,
    options: ProduceOptions,
    *,
    endpoints: connect.Endpoints | None = None,
    frames_topic: str | None = None,
    audio_topic: str | None = None,
    progress: bool = False,
    limits: Limits | None = None,
    epoch_ms: int | None = None,
) -> ProduceReport:
    """Publish ``source`` to the frames (and audio) topic; returns what was sent.

    ``frames_topic``/``audio_topic`` default to the settings' topics. See the module
    docstring for the sampling, pacing and resume rules. ``epoch_ms``: the wall clock (ms)
    of pts 0 in the records' Kafka timestamps (default: now at the first record), so a caller
    can ask questions "at stream time t" (``asked_at_us = epoch_ms * 1000 + t``).
    """
    from streamvqa import connect
    from streamvqa.media import encode_jpeg
    from streamvqa.schemas import AudioChunk, Frame, encode

    source = str(source)
    if not is_live(source) and not Path(source).exists():
        raise ProduceError(f"no such file or folder: {source}")
    if options.audio_path is not None and not Path(options.audio_path).is_file():
        raise ProduceError(f"no such audio file: {options.audio_path}")
    endpoints = endpoints or connect.resolve_endpoints(settings)
    frames_topic = frames_topic or settings.topics.frames
    audio_topic = audio_topic or settings.topics.audio
    key = options.stream_id.encode()
    report = ProduceReport(stream_id=options.stream_id)
    live = is_live(source)
    clock = time.perf_counter()

    producer = connect.producer(settings, endpoints, linger_ms=20)
    errors: list[BaseException] = []
    try:
        last_frame = last_audio = None
        if options.resume:
            factory = lambda: connect.consumer(settings, endpoints, group_id=None)  # noqa: E731
            last_frame = find_last(
                factory,
                frames_topic,
                partition_for(producer, frames_topic, key),
                options.stream_id,
                Frame,
                options.resume_window,
            )
            last_audio = find_last(
                factory,
                audio_topic,
                partition_for(producer, audio_topic, key),
                options.stream_id,
                AudioChunk,
                options.resume_window,
            )
        frame_seq = last_frame.seq + 1 if last_frame else 0
        audio_seq = last_audio.seq + 1 if last_audio else 0
        report.first_frame_seq, report.first_audio_seq = frame_seq, audio_seq

        # Resume: files skip what was sent; live sources shift their clock past it.
        start_us = round(options.start_s * 1_000_000)
        skip_video_until = last_frame.pts_us if (last_frame and not live) else None
        skip_audio_until = last_audio.pts_us if (last_audio and not live) else None
        video_shift = audio_shift = 0
        first_video = first_audio = None

        events: Iterator[Any] = _timeline(source, options)

        chunker = _AudioChunker(options.chunk_ms * AUDIO_RATE // 1000)
        wall0: float | None = None
        pts0: int | None = None
        estimate = _estimate_frames(source, dataclasses.replace(options, limit=None))

        def total() -> int | None:
            """Frames this run will send, as far as is known (the progress bar's total)."""
            if estimate is None:
                return options.limit
            left = max(0, estimate - report.skipped_frames)
            return min(left, options.limit) if options.limit is not None else left

        def on_error(err: BaseException) -> None:
            errors.append(err)

        def send(topic: str, record: Frame | AudioChunk, due_us: int) -> None:
            """Send ``record`` once the paced clock reaches ``due_us`` (stream time)."""
            nonlocal wall0, pts0, epoch_ms
            if options.speed is not None:
                if wall0 is None or pts0 is None:  # both or neither
                    wall0, pts0 = time.perf_counter(), due_us
                delay = wall0 + (due_us - pts0) / 1e6 / options.speed - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            if epoch_ms is None:
                epoch_ms = time.time_ns() // 1_000_000 - record.pts_us // 1000
            value = encode(record, limits)
            report.bytes += len(value)
            producer.send(
                topic, key=key, value=value, timestamp_ms=epoch_ms + record.pts_us // 1000
            ).add_errback(on_error)
            if errors:
                raise ProduceError(f"the broker refused a record: {errors[0]}")

        def audio_out(pts: int, samples: np.ndarray) -> None:
            nonlocal audio_seq
            if skip_audio_until is not None and pts <= skip_audio_until:
                return
            if pts < start_us:
                return
            chunk = AudioChunk(
                stream_id=options.stream_id,
                seq=audio_seq,
                pts_us=pts + audio_shift,
                sample_rate=AUDIO_RATE,
                channels=1,
                sample_format=options.sample_format,
                payload=_pcm(samples, options.sample_format),
            )
            # A chunk exists once its last sample does: paced by its end, like a live microphone.
            send(audio_topic, chunk, _end_us(chunk))
            report.audio_chunks += 1
            report.last_audio_pts_us = pts + audio_shift
            audio_seq += 1

        bar, task = _progress(progress, total(), options.stream_id)
        with bar, _closing(events):
            for event in events:
                if isinstance(event, _AudioEvent):
                    if live and last_audio is not None and first_audio is None:
                        first_audio = event.pts_us
                        audio_shift = last_audio.end_us - first_audio
                    for pts, chunk in chunker.push(event.pts_us, event.samples):
                        audio_out(pts, chunk)
                    continue
                if options.limit is not None and report.frames >= options.limit:
                    break
                if event.pts_us < start_us or (
                    skip_video_until is not None and event.pts_us <= skip_video_until
                ):
                    report.skipped_frames += 1
                    bar.update(task, total=total())
                    continue
                if live and last_frame is not None and first_video is None:
                    first_video = event.pts_us
                    video_shift = last_frame.pts_us + round(1_000_000 / (options.fps or 25)) - first_video
                rgb = _rgb(event.image, options.max_width, options.max_height)
                pts = event.pts_us + video_shift
                send(
                    frames_topic,
                    Frame(
                        stream_id=options.stream_id,
                        seq=frame_seq,
                        pts_us=pts,
                        codec="jpeg",
                        width=int(rgb.shape[1]),
                        height=int(rgb.shape[0]),
                        payload=encode_jpeg(rgb, options.jpeg_quality),
                    ),
                    pts,
                )
                frame_seq += 1
                report.frames += 1
                report.last_frame_pts_us = pts
                bar.update(task, advance=1, info=f"pts {pts / 1e6:.2f} s, {report.audio_chunks} audio chunks")
            else:
                # The source ended: the last partial audio chunk goes out too.
                for pts, chunk in chunker.flush():
                    audio_out(pts, chunk)
        producer.flush(timeout=60)
        if errors:
            raise ProduceError(f"the broker refused a record: {errors[0]}")
    finally:
        producer.close(timeout=10)
        report.elapsed_s = time.perf_counter() - clock
    return report


# --------------------------------------------------------------------------- command


def produce_command(
    source: Annotated[
        str, typer.Argument(help="Video file, folder of images, URL (rtsp/http) or device (/dev/video0).")
    ],
    stream_id: Annotated[str, typer.Option("--stream-id", "-s", help="Stream id (the Kafka key).")],
    data_dir: Annotated[
        Path | None, typer.Option("--data-dir", help="Project data folder (default: settings).")
    ] = None,
    fps: Annotated[
        float | None, typer.Option(min=0.001, help="Sample frames to this rate (closest frame per tick).")
    ] = None,
    max_width: Annotated[int | None, typer.Option(min=1, help="Shrink frames to at most this width.")] = None,
    max_height: Annotated[
        int | None, typer.Option(min=1, help="Shrink frames to at most this height.")
    ] = None,
    quality: Annotated[int, typer.Option(min=1, max=100, help="JPEG quality.")] = 85,
    realtime: Annotated[
        bool, typer.Option("--realtime", help="Pace sending to the presentation times.")
    ] = False,
    speed: Annotated[
        float | None,
        typer.Option(min=0.001, help="Pace at SPEED x real time (default: as fast as possible)."),
    ] = None,
    start: Annotated[float, typer.Option(min=0.0, help="Skip source time before START seconds.")] = 0.0,
    limit: Annotated[int | None, typer.Option(min=0, help="Send at most LIMIT frames in this run.")] = None,
    loops: Annotated[int, typer.Option(min=1, help="Play a file or folder this many times.")] = 1,
    audio: Annotated[
        Path | None, typer.Option("--audio", help="A separate audio file to mux in (aligned at t=0).")
    ] = None,
    no_audio: Annotated[bool, typer.Option("--no-audio", help="Do not publish audio.")] = False,
    chunk_ms: Annotated[int, typer.Option(min=10, max=60_000, help="Audio chunk length (ms).")] = 1000,
    sample_format: Annotated[str, typer.Option(help="Audio sample format: f32le or s16le.")] = "f32le",
    image_fps: Annotated[float, typer.Option(min=0.001, help="Frame rate of a folder of images.")] = 1.0,
    input_format: Annotated[
        str | None, typer.Option("--format", help="FFmpeg input format (v4l2, avfoundation, dshow).")
    ] = None,
    av_option: Annotated[
        list[str] | None, typer.Option(help="FFmpeg input option NAME=VALUE (repeatable).")
    ] = None,
    no_resume: Annotated[
        bool, typer.Option("--no-resume", help="Number from 0 instead of continuing the stream.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    frames_topic: Annotated[str | None, typer.Option(help="Frames topic (default: settings).")] = None,
    audio_topic: Annotated[str | None, typer.Option(help="Audio topic (default: settings).")] = None,
) -> None:
    """Publish a video source to the frames and audio topics (resumes a stream after a restart)."""
    from rich.console import Console

    from streamvqa.cli_ids import checked_id
    from streamvqa.infra.local.process import StackError
    from streamvqa.schemas import SchemaError
    from streamvqa.settings import Settings

    stream_id = checked_id(stream_id, "--stream-id")
    console = Console(stderr=True)
    av_options = {}
    for item in av_option or []:
        name, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"expected NAME=VALUE, got {item!r}", param_hint="--av-option")
        av_options[name] = value
    try:
        options = ProduceOptions(
            stream_id=stream_id,
            fps=fps,
            max_width=max_width,
            max_height=max_height,
            jpeg_quality=quality,
            speed=speed if speed is not None else (1.0 if realtime else None),
            start_s=start,
            limit=limit,
            loops=loops,
            audio=not no_audio,
            audio_path=audio,
            chunk_ms=chunk_ms,
            sample_format=sample_format,
            image_fps=image_fps,
            input_format=input_format,
            av_options=av_options,
            resume=not no_resume,
        )
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err
    try:
        settings = Settings(data_dir=data_dir) if data_dir is not None else Settings()
        report = produce(
            settings, source, options, progress=not quiet, frames_topic=frames_topic, audio_topic=audio_topic
        )
    except (ProduceError, StackError, SchemaError, FileNotFoundError) as err:
        console.print(f"[red]error:[/] {err}")
        raise typer.Exit(1) from err
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: run the same command again to resume the stream")
        raise typer.Exit(130) from None
    typer.echo(report.summary())
