"""The main video-QA pipeline end to end on the embedded stack: sustained ingest, concurrent
real-time streams and question latency, each beside a baseline, in one run.

Setup: a private embedded stack (temporary data dir, ``memory://`` broker), private topics and
consumer group, ``streamvqa run pipeline`` as a process of its own (FnApiRunner, every model in
process: DINOv2-S with the STC cache, silero-vad + Whisper tiny.en, SmolLM2-135M, MiniLM). A
warm-up stream (15 s of the demo stream with speech, then one question) loads every model before
anything is timed. A background reader follows the memory topic (read_committed: a note counts
once the pipeline's transaction that wrote it is committed) and stamps each note with the wall
time it was read.

1. Sustained ingest, frames only: S streams of F frames (demo frames, 320 x 240 JPEG, no audio)
   published at once as fast as possible; frames/s from the first send to the last VisualNote of
   those streams read back (total, per stream, per core). Baseline: the same records (read back
   from the frames topic) through ``FrameStage.process`` in this process (the operator alone:
   decode, DINOv2 + STC cache, CurveStream, pruning, keyframe puts to the object store), timed
   per call after a warm-up. Ratio pipeline / bare: what Kafka, the exactly-once commits, the
   notes and the memory stage cost.
2. Concurrent streams at 1 fps: N = floor(sustained frames/s) (capped), N producer threads paced
   in real time (speed 1.0); lag of each note = read time - the frame's wall time (VisualNote
   wall_us: the producer's clock at the frame's pts). p50/p95 lag; bounded when the p95 of the
   last third (by frame time) is at most 2x the first third's and below 3 s, with every note in.
   If not, N-1 streams too. Baseline: the per-frame budget (1/N s) against the bare operator's
   mean time per frame.
3. Question latency: the demo stream with speech (45 s at 1 fps) published as fast as possible;
   once its transcripts are in, Q text questions asked one after another with ``streamvqa.ask``
   (asked at the stream's watermark, so the memory stage holds none of them). Client wall time
   per question against the model part of the answer (retrieve + prefill + decode from its
   latency breakdown); ratio end-to-end / model.

Run: ``python -m bench pipeline [--quick]`` or ``python bench/pipeline_bench.py [--quick]``.
Writes bench/out/pipeline_bench.json.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

OUT = Path(__file__).resolve().parent / "out"
console = Console()

QUICK = {"streams": 2, "frames": 20, "cap": 3, "seconds": 20, "questions": 6}
FULL = {"streams": 4, "frames": 60, "cap": 12, "seconds": 60, "questions": 20}
WARMUP_FRAMES = 15  # with audio: the first utterance (1-11 s) is transcribed, so Whisper is loaded


class BenchError(RuntimeError):
    pass


# ------------------------------------------------------------------------- helpers
def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return float(np.percentile(np.asarray(values, dtype=float), q))


def _r(x: float | None, nd: int = 2) -> float | None:
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else round(float(x), nd)


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
    )


@dataclass
class Note:
    seq: int
    pts_us: int
    wall_us: int
    read_s: float  # time.time() when read back
    encode_ms: float


@dataclass
class Speech:
    start_us: int
    end_us: int
    wall_us: int
    text: str
    read_s: float


@dataclass
class NoteWatcher:
    """Follows the memory topic (all partitions, from the beginning) in a thread of its own."""

    settings: object
    endpoints: object
    visual: dict[str, list[Note]] = field(default_factory=dict)
    speech: dict[str, list[Speech]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="bench-notes", daemon=True)

    def start(self) -> NoteWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        from kafka import TopicPartition

        from streamvqa import connect
        from streamvqa.schemas import SpeechNote, VisualNote, decode_any

        try:
            consumer = connect.consumer(self.settings, self.endpoints, group_id=None)
            try:
                topic = self.settings.topics.memory
                parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
                consumer.assign(parts)
                consumer.seek_to_beginning(*parts)
                while not self._stop.is_set():
                    batch = consumer.poll(timeout_ms=50)
                    now = time.time()
                    for messages in batch.values():
                        for m in messages:
                            try:
                                item = decode_any(m.value)
                            except Exception:
                                continue
                            with self._lock:
                                if isinstance(item, VisualNote):
                                    self.visual.setdefault(item.stream_id, []).append(
                                        Note(item.seq, item.pts_us, item.wall_us, now, item.encode_ms)
                                    )
                                elif isinstance(item, SpeechNote):
                                    self.speech.setdefault(item.stream_id, []).append(
                                        Speech(item.start_us, item.end_us, item.wall_us, item.text, now)
                                    )
            finally:
                consumer.close()
        except BaseException as err:  # reported by the main thread
            self.error = err

    def notes(self, stream_id: str) -> list[Note]:
        with self._lock:
            return list(self.visual.get(stream_id, ()))

    def speech_notes(self, stream_id: str) -> list[Speech]:
        with self._lock:
            return list(self.speech.get(stream_id, ()))

    def count(self, stream_ids: list[str]) -> int:
        with self._lock:
            return sum(len({n.seq for n in self.visual.get(s, ())}) for s in stream_ids)


class Run:
    """The stack, topics, pipeline process and note reader of one benchmark run."""

    def __init__(self, tmp: Path) -> None:
        from streamvqa.settings import Settings

        self.tmp = tmp
        self.tag = uuid.uuid4().hex[:6]
        self.settings = Settings(data_dir=tmp / "data", local={"broker_storage": "memory"})
        self.stack = None
        self.pipeline = None
        self.watcher: NoteWatcher | None = None
        self.log_path = tmp / "pipeline.log"
        self.threads: list[threading.Thread] = []

    def up(self) -> None:
        from streamvqa import connect
        from streamvqa.infra.local.stack import LocalStack
        from streamvqa.infra.provision import ensure_topics

        self.stack = LocalStack(self.settings)
        self.stack.up()
        topics = self.settings.topics.model_copy(
            update={
                name: f"pb-{self.tag}.{name}"
                for name in ("frames", "audio", "queries", "answers", "dead_letter", "memory")
            }
        )
        self.settings = self.settings.model_copy(update={"topics": topics})
        self.endpoints = connect.resolve_endpoints(self.settings)
        admin = connect.admin(self.settings, self.endpoints)
        try:
            ensure_topics(admin, topics)
        finally:
            admin.close()
        self.watcher = NoteWatcher(self.settings, self.endpoints).start()

    def start_pipeline(self) -> None:
        from streamvqa.demo import start_pipeline

        self.pipeline = start_pipeline(self.settings, self.log_path, group=f"bench-{self.tag}")

    def check(self) -> None:
        if self.pipeline is not None and self.pipeline.poll() is not None:
            raise BenchError(f"the pipeline exited ({self.pipeline.returncode}):\n{self.log_tail()}")
        if self.watcher is not None and self.watcher.error is not None:
            raise BenchError(f"the note reader failed: {self.watcher.error!r}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def down(self) -> None:
        import logging

        from streamvqa.demo import stop_pipeline

        if self.pipeline is not None:
            try:
                stop_pipeline(self.pipeline)
            except Exception as err:
                console.log(f"[red]stopping the pipeline failed[/]: {err!r}")
        if self.watcher is not None:
            self.watcher.stop()
        logging.getLogger("kafka").setLevel(logging.CRITICAL)  # producer threads still alive complain
        if self.stack is not None:
            self.stack.down()

    # -- producing ------------------------------------------------------------------
    def produce_async(self, source: Path, options, epoch_ms: int | None = None) -> dict:
        """Publish in a daemon thread; the returned dict gets 'report' or 'error'."""
        from streamvqa.produce import produce

        box: dict = {}

        def target() -> None:
            try:
                box["report"] = produce(
                    self.settings, source, options, endpoints=self.endpoints, epoch_ms=epoch_ms
                )
            except BaseException as err:
                box["error"] = err

        thread = threading.Thread(target=target, name=f"bench-produce-{options.stream_id}", daemon=True)
        box["thread"] = thread
        self.threads.append(thread)
        thread.start()
        return box

    def wait_notes(
        self,
        stream_ids: list[str],
        expected: int,
        timeout_s: float,
        progress=None,
        task=None,
        producers: list[dict] = (),
    ) -> int:
        deadline = time.monotonic() + timeout_s
        got = 0
        while time.monotonic() < deadline:
            self.check()
            for box in producers:
                if "error" in box:
                    raise BenchError(f"a producer failed: {box['error']!r}") from box["error"]
            got = self.watcher.count(stream_ids)
            if progress is not None:
                progress.update(task, completed=got)
            if got >= expected:
                return got
            time.sleep(0.02)
        return got


# ------------------------------------------------------------------------- phases
def warm_up(run: Run, media) -> dict:
    """15 s of the demo stream with speech, then one question: every model loaded."""
    from streamvqa.ask import ask
    from streamvqa.produce import ProduceOptions

    sid = f"warm-{run.tag}"
    t0 = time.perf_counter()
    epoch_ms = time.time_ns() // 1_000_000
    box = run.produce_async(
        media.frames_dir,
        ProduceOptions(
            stream_id=sid,
            image_fps=media.fps,
            audio_path=media.audio_path,
            speed=None,
            resume=False,
            limit=WARMUP_FRAMES,
        ),
        epoch_ms=epoch_ms,
    )
    with console.status("warm-up: the pipeline loads its models (DINOv2, Whisper, SmolLM2, MiniLM)"):
        got = run.wait_notes([sid], WARMUP_FRAMES, 900, producers=[box])
        if got < WARMUP_FRAMES:
            raise BenchError(f"warm-up: {got} of {WARMUP_FRAMES} notes in 900 s\n{run.log_tail()}")
        notes_s = time.perf_counter() - t0
        answer = ask(
            run.settings,
            sid,
            media.questions[0].text,
            asked_at_us=epoch_ms * 1000 + 10_000_000,
            timeout_s=600,
            check_stream=False,
        )
    out = {"notes_s": _r(notes_s, 1), "answered_s": _r(time.perf_counter() - t0, 1), "answer": answer.text}
    console.log(
        f"[bold]warm-up[/]: {WARMUP_FRAMES} frames noted after {out['notes_s']} s, "
        f"first answer after {out['answered_s']} s: {answer.text!r}"
    )
    return out


def ingest(run: Run, media, streams: int, frames: int) -> dict:
    from streamvqa.produce import ProduceOptions

    per_loop = len(list(media.frames_dir.glob("*.jpg")))
    sids = [f"ingest-{run.tag}-{i}" for i in range(streams)]
    total = streams * frames
    with _progress() as progress:
        task = progress.add_task(f"ingest {streams} x {frames} frames", total=total, info="")
        t0 = time.time()
        boxes = [
            run.produce_async(
                media.frames_dir,
                ProduceOptions(
                    stream_id=sid,
                    image_fps=1.0,
                    speed=None,
                    audio=False,
                    resume=False,
                    limit=frames,
                    loops=math.ceil(frames / per_loop),
                ),
            )
            for sid in sids
        ]
        got = run.wait_notes(sids, total, 600, progress, task, producers=boxes)
    if got < total:
        raise BenchError(f"ingest: {got} of {total} notes in 600 s\n{run.log_tail()}")
    notes = [n for sid in sids for n in run.watcher.notes(sid)]
    last = max(n.read_s for n in notes)
    first = min(n.read_s for n in notes)
    send_s = (
        max(b["report"].elapsed_s for b in boxes if "report" in b)
        if all("report" in b for b in boxes)
        else None
    )
    elapsed = last - t0
    fps = total / elapsed
    cores = os.cpu_count() or 1
    return {
        "streams": streams,
        "frames_per_stream": frames,
        "frames": total,
        "stream_ids": sids,
        "elapsed_s": _r(elapsed, 3),
        "first_note_after_s": _r(first - t0, 3),
        "publish_s": _r(send_s, 3),
        "fps": _r(fps),
        "fps_per_stream": _r(fps / streams),
        "fps_per_core": _r(fps / cores),
        "pipeline_encode_ms_mean": _r(statistics.fmean(n.encode_ms for n in notes)),
        "pipeline_encode_ms_p50": _r(_pct([n.encode_ms for n in notes], 50)),
    }


def bare(run: Run, stream_ids: list[str], expected: int) -> dict:
    """The same frame records through FrameStage.process in this process."""
    import torch
    from kafka import TopicPartition

    from streamvqa import connect
    from streamvqa.operators.io.records import KafkaRecord
    from streamvqa.pipelines.video_qa.graph import StageFactories
    from streamvqa.schemas import VisualNote, decode

    keys = {s.encode() for s in stream_ids}
    consumer = connect.consumer(run.settings, run.endpoints, group_id=None)
    records: list[KafkaRecord] = []
    warm: list[KafkaRecord] = []
    try:
        topic = run.settings.topics.frames
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        deadline = time.monotonic() + 60
        while len(records) < expected and time.monotonic() < deadline:
            for messages in consumer.poll(timeout_ms=200).values():
                for m in messages:
                    rec = KafkaRecord(
                        m.topic, m.partition, m.offset, m.key, m.value, m.timestamp, tuple(m.headers or ())
                    )
                    if m.key in keys:
                        records.append(rec)
                    elif m.key is not None and m.key.startswith(b"warm-"):
                        warm.append(rec)
    finally:
        consumer.close()
    if len(records) < expected:
        raise BenchError(f"bare: read back {len(records)} of {expected} frame records")
    with console.status("bare FrameStage: loading the encoder in this process"):
        stage = StageFactories(run.settings).frames()
        states: dict[bytes, object] = {}
        for rec in warm:  # warm-up on another stream (its own STC cache), like the pipeline's
            state = states.get(rec.key) or stage.initial_state(rec.key.decode())
            states[rec.key], _ = stage.process(state, rec)
    states = {}
    times, encode_ms = [], []
    with _progress() as progress:
        task = progress.add_task("bare FrameStage.process", total=len(records), info="")
        for rec in records:
            state = states.get(rec.key) or stage.initial_state(rec.key.decode())
            t0 = time.perf_counter()
            state, outputs = stage.process(state, rec)
            times.append(time.perf_counter() - t0)
            states[rec.key] = state
            encode_ms += [decode(o.value, VisualNote).encode_ms for o in outputs]
            progress.advance(task)
    total_s = sum(times)
    return {
        "frames": len(records),
        "torch_threads": torch.get_num_threads(),
        "fps": _r(len(records) / total_s),
        "ms_mean": _r(1000 * statistics.fmean(times)),
        "ms_p50": _r(1000 * _pct(times, 50)),
        "ms_p95": _r(1000 * _pct(times, 95)),
        "encode_ms_mean": _r(statistics.fmean(encode_ms)) if encode_ms else None,
        "encode_ms_p50": _r(_pct(encode_ms, 50)) if encode_ms else None,
        "ms_per_frame": [_r(1000 * t, 1) for t in times],
    }


def concurrent(run: Run, media, n: int, seconds: int, label: str) -> dict:
    from streamvqa.produce import ProduceOptions

    per_loop = len(list(media.frames_dir.glob("*.jpg")))
    sids = [f"live{label}-{run.tag}-{i}" for i in range(n)]
    total = n * seconds
    rss = RssSampler(run.pipeline.pid).start()
    with _progress() as progress:
        task = progress.add_task(f"{n} streams at 1 fps for {seconds} s", total=total, info="")
        boxes = [
            run.produce_async(
                media.frames_dir,
                ProduceOptions(
                    stream_id=sid,
                    image_fps=1.0,
                    speed=1.0,
                    audio=False,
                    resume=False,
                    limit=seconds,
                    loops=math.ceil(seconds / per_loop),
                ),
            )
            for sid in sids
        ]
        got = run.wait_notes(sids, total, seconds + max(60, seconds), progress, task, producers=boxes)
    samples = rss.stop()
    notes = sorted((n_ for sid in sids for n_ in run.watcher.notes(sid)), key=lambda x: x.wall_us)
    lags = [x.read_s - x.wall_us / 1e6 for x in notes]
    third = max(1, len(lags) // 3)
    first, last = lags[:third], lags[-third:]
    p95_first, p95_last = _pct(first, 95), _pct(last, 95)
    bounded = bool(got >= total and p95_last <= 2 * p95_first and p95_last < 3.0)
    return {
        "streams": n,
        "seconds": seconds,
        "frames": total,
        "noted": got,
        "lag_p50_s": _r(_pct(lags, 50), 3),
        "lag_p95_s": _r(_pct(lags, 95), 3),
        "lag_max_s": _r(max(lags), 3),
        "lag_p95_first_third_s": _r(p95_first, 3),
        "lag_p95_last_third_s": _r(p95_last, 3),
        "bounded": bounded,
        # the pipeline process's resident memory over the run (MB): first, last third's max, max
        "rss_first_mb": _r(samples[0] if samples else None, 1),
        "rss_last_third_max_mb": _r(max(samples[-max(1, len(samples) // 3) :]) if samples else None, 1),
        "rss_max_mb": _r(max(samples) if samples else None, 1),
    }


class RssSampler:
    """Resident memory (MB) of a process and its children, sampled every second from /proc."""

    def __init__(self, pid: int) -> None:
        self.pid, self.samples = pid, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def stop(self) -> list[float]:
        self._stop.set()
        self._thread.join(5)
        return self.samples

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            total = 0
            for pid in [self.pid, *_children(self.pid)]:
                try:
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                        if line.startswith("VmRSS:"):
                            total += int(line.split()[1])
                except OSError:
                    continue
            if total:
                self.samples.append(total / 1024)


def _children(pid: int) -> list[int]:
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    out = [int(k) for k in kids]
    for k in list(out):
        out += _children(k)
    return out


def questions(run: Run, media, count: int) -> dict:
    from streamvqa.ask import ask
    from streamvqa.produce import ProduceOptions

    sid = f"qa-{run.tag}"
    frames = len(list(media.frames_dir.glob("*.jpg")))
    speech_end_us = int(media.utterances[-1][1] * 1e6) - 1_000_000
    epoch_ms = time.time_ns() // 1_000_000
    t0 = time.perf_counter()
    box = run.produce_async(
        media.frames_dir,
        ProduceOptions(
            stream_id=sid, image_fps=media.fps, audio_path=media.audio_path, speed=None, resume=False
        ),
        epoch_ms=epoch_ms,
    )
    with console.status(
        f"question stream: {frames} frames + {media.duration_s:.0f} s of speech, "
        "waiting for the notes and transcripts"
    ):
        run.wait_notes([sid], frames, 300, producers=[box])
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            run.check()
            heard = max((s.end_us for s in run.watcher.speech_notes(sid)), default=-1)
            if heard >= speech_end_us:
                break
            time.sleep(0.1)
        else:
            console.log("[yellow]the last utterance was not transcribed within 300 s; asking anyway[/]")
    ready_s = time.perf_counter() - t0
    notes, speech = run.watcher.notes(sid), run.watcher.speech_notes(sid)
    # asked at the stream's watermark: both sources have passed it, so no question is held
    asked_at = min(max(n.wall_us for n in notes), max((s.wall_us for s in speech), default=2**62))
    texts = [q.text for q in media.questions if q.image_from is None]
    rows = []
    with _progress() as progress:
        task = progress.add_task(f"{count} questions", total=count, info="")
        for i in range(count):
            run.check()
            text = texts[i % len(texts)]
            c0 = time.perf_counter()
            answer = ask(run.settings, sid, text, asked_at_us=asked_at, timeout_s=300, check_stream=False)
            wall_ms = (time.perf_counter() - c0) * 1000
            stages = {s.stage: s.ms for s in answer.latency}
            model_ms = sum(stages.get(k, 0.0) for k in ("retrieve", "prefill", "decode"))
            rows.append(
                {
                    "question": text,
                    "answer": answer.text,
                    "client_ms": _r(wall_ms, 1),
                    "model_ms": _r(model_ms, 1),
                    "stages_ms": {k: _r(v, 1) for k, v in stages.items()},
                }
            )
            progress.update(task, advance=1, info=f"{wall_ms:.0f} ms (model {model_ms:.0f})")
    client = [r["client_ms"] for r in rows]
    model = [r["model_ms"] for r in rows]
    total = [r["stages_ms"].get("total", 0.0) for r in rows]
    return {
        "stream_s": media.duration_s,
        "ready_after_s": _r(ready_s, 1),
        "speech_notes": sum(1 for s in speech if s.text),
        "questions": count,
        "client_ms_p50": _r(_pct(client, 50), 1),
        "client_ms_p95": _r(_pct(client, 95), 1),
        "model_ms_p50": _r(_pct(model, 50), 1),
        "model_ms_p95": _r(_pct(model, 95), 1),
        "pipeline_total_ms_p50": _r(_pct(total, 50), 1),
        "ratio_p50": _r(_pct(client, 50) / _pct(model, 50)),
        "ratio_p95": _r(_pct(client, 95) / _pct(model, 95)),
        "answers": rows,
    }


# ------------------------------------------------------------------------- main
def _on_sigterm(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def live_pipeline(prefix: str, results: dict) -> Iterator[tuple[Run, object]]:
    """(run, demo media): a private stack, the pipeline process, warmed up (results["warm_up"]);
    everything stopped and removed after, the pipeline's log tail shown on a failure."""
    from streamvqa.demo_media import build_demo_media

    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    run = Run(tmp)
    t_start = time.perf_counter()
    try:
        with console.status("starting the embedded stack and the demo media"):
            run.up()
            media = build_demo_media(tmp / "media", scene_s=15.0, fps=1.0)
        results["stack_up_s"] = _r(time.perf_counter() - t_start, 1)
        run.start_pipeline()
        console.log(f"[bold]pipeline[/] started (pid {run.pipeline.pid}), topics pb-{run.tag}.*")
        results["warm_up"] = warm_up(run, media)
        yield run, media
    except BaseException:
        console.log(f"[red]failed[/]; pipeline log tail:\n{run.log_tail()}")
        raise
    finally:
        run.down()
        signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(tmp, ignore_errors=True)


def main(quick: bool = False) -> dict:
    import torch

    p = QUICK if quick else FULL
    cores = os.cpu_count() or 1
    results: dict = {
        "quick": quick,
        "params": p,
        "machine": {
            "node": platform.node(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpu_count": cores,
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
        },
    }
    t_start = time.perf_counter()
    with live_pipeline("svqa-pb-", results) as (run, media):
        ing = ingest(run, media, p["streams"], p["frames"])
        results["ingest"] = ing
        console.log(
            f"[bold]ingest[/]: {ing['frames']} frames in {ing['elapsed_s']} s = {ing['fps']} frames/s"
        )
        b = bare(run, ing.pop("stream_ids"), ing["frames"])
        results["bare"] = b
        results["ingest"]["ratio_pipeline_vs_bare"] = _r(ing["fps"] / b["fps"])
        console.log(f"[bold]bare FrameStage[/]: {b['fps']} frames/s ({b['ms_mean']} ms per frame)")

        n = max(1, min(p["cap"], math.floor(ing["fps"])))
        runs = [concurrent(run, media, n, p["seconds"], "")]
        if not runs[0]["bounded"] and n > 1:
            console.log(f"[yellow]{n} streams not sustained[/]: trying {n - 1}")
            runs.append(concurrent(run, media, n - 1, p["seconds"], "b"))
        for r in runs:
            r["budget_ms"] = _r(1000 / r["streams"], 1)
            r["bare_ms_mean"] = b["ms_mean"]
            r["ratio_bare_vs_budget"] = _r(b["ms_mean"] / r["budget_ms"])
        results["concurrent"] = {"n_from_ingest": math.floor(ing["fps"]), "cap": p["cap"], "runs": runs}

        results["questions"] = questions(run, media, p["questions"])
    results["total_s"] = _r(time.perf_counter() - t_start, 1)
    OUT.mkdir(exist_ok=True)
    (OUT / "pipeline_bench.json").write_text(json.dumps(results, indent=2))
    _print(results, cores)
    return results


def _print(results: dict, cores: int) -> None:
    ing, b, q = results["ingest"], results["bare"], results["questions"]
    s = ing["streams"]
    table = Table(
        title=f"video-QA pipeline vs baselines ({'quick' if results['quick'] else 'full'}, "
        f"{cores} cores, torch threads {results['machine']['torch_threads']})"
    )
    for column in ("figure", "pipeline", "baseline", "ratio"):
        table.add_column(column)
    table.add_row(
        f"ingest frames/s ({s} x {ing['frames_per_stream']})",
        f"{ing['fps']}",
        f"{b['fps']} (bare FrameStage)",
        f"{ing['ratio_pipeline_vs_bare']}",
    )
    table.add_row(
        "  per stream", f"{ing['fps_per_stream']}", f"{_r(b['fps'] / s)}", f"{ing['ratio_pipeline_vs_bare']}"
    )
    table.add_row(
        "  per core", f"{ing['fps_per_core']}", f"{_r(b['fps'] / cores)}", f"{ing['ratio_pipeline_vs_bare']}"
    )
    table.add_row(
        "  encoder ms/frame",
        f"{ing['pipeline_encode_ms_mean']}",
        f"{b['encode_ms_mean']}",
        f"{_r(ing['pipeline_encode_ms_mean'] / b['encode_ms_mean']) if b['encode_ms_mean'] else '-'}",
    )
    for r in results["concurrent"]["runs"]:
        table.add_row(
            f"{r['streams']} streams @ 1 fps, {r['seconds']} s: lag p50 / p95 s",
            f"{r['lag_p50_s']} / {r['lag_p95_s']}",
            f"budget {r['budget_ms']} ms vs bare {r['bare_ms_mean']} ms/frame",
            f"{r['ratio_bare_vs_budget']}",
        )
        table.add_row(
            "  bounded (p95 first -> last third, noted)",
            f"{'yes' if r['bounded'] else 'NO'} ({r['lag_p95_first_third_s']} -> "
            f"{r['lag_p95_last_third_s']} s, {r['noted']}/{r['frames']})",
            "",
            "",
        )
        table.add_row(
            "  pipeline RSS MB (first, last third max, max)",
            f"{r['rss_first_mb']}, {r['rss_last_third_max_mb']}, {r['rss_max_mb']}",
            "",
            "",
        )
    table.add_row(
        f"question ms p50 ({q['questions']} asked)",
        f"{q['client_ms_p50']} (client)",
        f"{q['model_ms_p50']} (model)",
        f"{q['ratio_p50']}",
    )
    table.add_row("question ms p95", f"{q['client_ms_p95']}", f"{q['model_ms_p95']}", f"{q['ratio_p95']}")
    console.print(table)
    console.print(f"wrote {OUT / 'pipeline_bench.json'} ({results['total_s']} s)")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main(quick="--quick" in sys.argv)
