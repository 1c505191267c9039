"""MemoryStage: a stream's memory and its answers.

It reads the memory topic, where a stream's VisualNotes, SpeechNotes and forwarded Queries meet
in one partition, in order:

- a SpeechNote's text is prefilled into the stream's KV memory (``[12.3-15.0 s] ...``); a
  visual scene change becomes a short note there too; every VisualNote's pooled feature joins
  the stream's visual index (for "when did this appear?");
- a Query is held until both sources have caught up with it: the frame watermark (the wall
  clock of the last frame noted) and, if the stream has audio, the audio watermark have passed
  its ``asked_at_us`` (a question sees the stream up to when it was asked, whatever the stages'
  lags), or until ``hold_timeout_us`` passed (a heartbeat tick: a source that stopped, or a
  stream nobody has seen: answered "unknown stream");
- a text question is answered from the KV memory (retrieval of the relevant blocks, then
  decoding), an image question by cosine retrieval over the visual index. Each Answer carries
  its evidence time ranges (best first) and a latency breakdown.

State per stream: the KV memory (written content-addressed to the object store when it
changed; the snapshot holds its key), the visual index, the watermarks, the held questions and
the ids of the last answered ones (a question asked twice is answered once).
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

import numpy as np
import torch

from streamvqa.operators.io.records import OUTPUT_ID_HEADER, KafkaRecord, Output, scoped_id
from streamvqa.operators.kv import BlockMismatch
from streamvqa.operators.model_guard import CallPolicy, ModelCallFailed, ModelGuard
from streamvqa.schemas import (
    Answer,
    EvidenceSpan,
    Limits,
    ManifestBlock,
    ManifestFrame,
    MemoryManifest,
    Query,
    SpeechNote,
    StageLatency,
    VisualNote,
    decode,
    decode_any,
    encode,
    make_dead_letter,
)
from streamvqa.schemas.errors import WrongRecordType
from streamvqa.storage.keys import content_hash, stream_prefix

from .common import now_us, read_tagged_blob, tagged_blob, wall_us

if TYPE_CHECKING:
    from streamvqa.operators.lm.memory import StreamKV

_STATE = b"streamvqa.memory-stage/1"
_CHUNK = b"streamvqa.visual-index/1"
INDEX_CHUNK_FRAMES = (
    512  # the visual index is snapshotted in sealed, content-addressed chunks of this many frames
)
_COLUMNS = ("seqs", "pts", "tiers", "scores", "tokens", "hashes")
MANIFEST_MAX_ENTRIES = 10_000  # a manifest lists the most recent frames and blocks, this many of each
SYSTEM_ID = "streamvqa"
KEEP_ANSWERED = 1024  # ids of answered questions remembered per stream (duplicates answered once)


@dataclass(frozen=True)
class MemoryStageConfig:
    hold_timeout_us: int = 10_000_000
    image_match_threshold: float = 0.6
    image_match_margin: float = 0.08  # spans within this similarity of the best one are reported too
    scene_note_gap_us: int = 5_000_000  # at most one scene-change note per this much stream time
    max_spans: int = 3
    # Text enters the memory in stream-time order once every source passed it. Until a stream's
    # first audio note its frames' text waits (for audio that may come later), entering the memory
    # at the stream's questions, or once this many notes are waiting (a stream without audio).
    expect_audio: bool = True
    max_pending_without_audio: int = 256


@dataclass
class Held:
    data: bytes  # the encoded Query
    query_id: str
    asked_at_us: int
    received_us: int  # wall clock when it reached the memory topic
    source: tuple[str, int, int] = ("", -1, -1)  # (topic, partition, offset) of its memory-topic record


@dataclass
class MemoryState:
    stream_id: str
    kv: StreamKV | None = None
    kv_version: int = 0  # bumped whenever ``kv`` changes
    kv_saved: tuple[int, str] | None = None  # (version, object key) of the last persisted kv
    frames_wall_us: int = -1
    audio_wall_us: int = -1
    last_frame_seq: int = -1
    heard_us: int = -1
    last_scene_note_us: int = -(1 << 62)
    frame_pts_us: int = -1  # the last frame noted (stream time)
    offset_us: int | None = None  # wall clock minus stream time (the producer's clock origin)
    seqs: list[int] = field(default_factory=list)
    pts: list[int] = field(default_factory=list)
    tiers: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    hashes: list[str] = field(default_factory=list)
    # text waiting for both sources to pass it: (start_us, kind, seq, text, start_us, end_us)
    pending: list[tuple[int, int, int, str, int, int]] = field(default_factory=list)
    # (capacity, D) float16, rows [0, len(seqs)) used: grown by doubling, not copied every frame
    features: np.ndarray | None = None
    held: list[Held] = field(default_factory=list)
    answered: list[str] = field(default_factory=list)
    utterances: int = 0
    # object keys of the visual index's sealed chunks (rows [i * INDEX_CHUNK_FRAMES, ...)): a
    # snapshot names them and carries only the open tail, so its size stays flat over a long run
    index_chunks: list[str] = field(default_factory=list)

    @property
    def seen(self) -> bool:
        return self.frames_wall_us >= 0 or self.audio_wall_us >= 0


class MemoryStage:
    """Per stream: notes into memory, questions held for their sources, then answered.

    ``memory``: a :class:`~streamvqa.operators.lm.memory.KVMemory` (its store writes blocks
    through to the object store); ``image_encoder``: a vision encoder whose pooled feature lives
    in the same space as the frame stage's; ``objects``: the object store (KV state, manifests).
    Models are built by ``load`` on first use, so a stage that only holds questions is cheap.
    """

    name = "memory"

    def __init__(
        self,
        load: Callable[[], tuple[object, object]],
        answers_topic: str,
        objects=None,
        config: MemoryStageConfig | None = None,
        limits: Limits | None = None,
        calls: CallPolicy | None = None,
        dead_letter_topic: str | None = None,
    ) -> None:
        self._load = load
        self._models: tuple[object, object] | None = None
        self.answers_topic = answers_topic
        self.objects = objects
        self.config = config or MemoryStageConfig()
        self.limits = limits or Limits()
        self.dead_letter_topic = dead_letter_topic
        # the answer calls; prefills are not retried in place (a failed one may have changed the
        # KV memory half-way): they fail the run, which restarts from the committed state
        self.lm_guard = ModelGuard("language-model", calls)
        self.image_guard = ModelGuard("image-encoder", calls)

    @property
    def memory(self):
        return self.models[0]

    @property
    def image_encoder(self):
        return self.models[1]

    @property
    def models(self) -> tuple[object, object]:
        if self._models is None:
            self._models = self._load()
        return self._models

    # -- state -------------------------------------------------------------------
    def initial_state(self, stream_id: str) -> MemoryState:
        return MemoryState(stream_id)

    def encode_state(self, state: MemoryState) -> bytes:
        kv_key = None
        if state.kv is not None:
            if state.kv_saved is None or state.kv_saved[0] != state.kv_version:
                blob = state.kv.to_bytes()
                key = f"{stream_prefix(state.stream_id)}memory/kv-state/{content_hash(blob)[:32]}"
                if self.objects is None:
                    raise RuntimeError("the memory stage needs an object store to snapshot its KV memory")
                self.objects.put(key, blob)
                state.kv_saved = (state.kv_version, key)
            kv_key = state.kv_saved[1]
        self._seal_index_chunks(state)
        sealed = len(state.index_chunks) * INDEX_CHUNK_FRAMES
        head_columns, feats = _index_rows(state, sealed, len(state.seqs))
        head = {
            "stream_id": state.stream_id,
            "kv_key": kv_key,
            "kv_version": state.kv_version,
            "frames_wall_us": state.frames_wall_us,
            "audio_wall_us": state.audio_wall_us,
            "last_frame_seq": state.last_frame_seq,
            "heard_us": state.heard_us,
            "last_scene_note_us": state.last_scene_note_us,
            "frame_pts_us": state.frame_pts_us,
            "offset_us": state.offset_us,
            **head_columns,
            "index_chunks": state.index_chunks,
            "pending": state.pending,
            "dim": 0 if state.features is None else int(state.features.shape[1]),
            "held": [
                [base64.b64encode(h.data).decode(), h.query_id, h.asked_at_us, h.received_us, list(h.source)]
                for h in state.held
            ],
            "answered": state.answered,
            "utterances": state.utterances,
        }
        return tagged_blob(_STATE, head, feats)

    def decode_state(self, data: bytes) -> MemoryState:
        from streamvqa.operators.lm.memory import StreamKV

        head, feats = read_tagged_blob(_STATE, data, "memory stage state")
        state = MemoryState(head["stream_id"])
        if head["kv_key"] is not None:
            # verified on read: a state may only name its own stream's memory
            if not head["kv_key"].startswith(stream_prefix(state.stream_id)):
                raise BlockMismatch(f"the state of stream {state.stream_id!r} names {head['kv_key']!r}")
            state.kv = StreamKV.from_bytes(self.objects.get(head["kv_key"]), self.memory.store)
            if state.kv.stream_id != state.stream_id:
                raise BlockMismatch(
                    f"the state of stream {state.stream_id!r} holds the memory of {state.kv.stream_id!r}"
                )
            state.kv_version = head["kv_version"]
            state.kv_saved = (state.kv_version, head["kv_key"])
        for name in (
            "frames_wall_us",
            "audio_wall_us",
            "last_frame_seq",
            "heard_us",
            "last_scene_note_us",
            "frame_pts_us",
            "offset_us",
            "answered",
            "utterances",
        ):
            setattr(state, name, head[name])
        state.pending = [tuple(p) for p in head["pending"]]
        state.index_chunks = list(head.get("index_chunks", []))
        parts = [self._read_index_chunk(state.stream_id, key) for key in state.index_chunks]
        parts.append(({c: head[c] for c in _COLUMNS}, feats))
        for c in _COLUMNS:
            setattr(state, c, [x for columns, _ in parts for x in columns[c]])
        if head["dim"]:
            state.features = (
                np.frombuffer(b"".join(f for _, f in parts), "<f2").reshape(-1, head["dim"]).copy()
            )
        state.held = [
            Held(base64.b64decode(d), q, a, r, tuple(rest[0]) if rest else ("", -1, -1))
            for d, q, a, r, *rest in head["held"]
        ]
        return state

    def _seal_index_chunks(self, state: MemoryState) -> None:
        """Write every full chunk of the visual index not written yet (content-addressed: a replay
        writes the same key again, harmlessly)."""
        while (len(state.index_chunks) + 1) * INDEX_CHUNK_FRAMES <= len(state.seqs):
            if self.objects is None:
                raise RuntimeError("the memory stage needs an object store to snapshot a long visual index")
            lo = len(state.index_chunks) * INDEX_CHUNK_FRAMES
            blob = tagged_blob(_CHUNK, *_index_rows(state, lo, lo + INDEX_CHUNK_FRAMES))
            key = f"{stream_prefix(state.stream_id)}memory/visual-index/{content_hash(blob)[:32]}"
            self.objects.put(key, blob)
            state.index_chunks.append(key)

    def _read_index_chunk(self, stream_id: str, key: str) -> tuple[dict, bytes]:
        """A sealed chunk, verified: its key is under the stream's prefix and names its content."""
        if not key.startswith(f"{stream_prefix(stream_id)}memory/visual-index/"):
            raise BlockMismatch(f"the state of stream {stream_id!r} names {key!r}")
        blob = self.objects.get(key)
        if not blob.startswith(_CHUNK) or content_hash(blob)[:32] != key.rsplit("/", 1)[-1]:
            raise BlockMismatch(f"visual index chunk {key!r} does not match its content hash")
        return read_tagged_blob(_CHUNK, blob, "visual index chunk")

    # -- processing --------------------------------------------------------------
    def process(self, state: MemoryState, record: KafkaRecord) -> tuple[MemoryState, list[Output]]:
        item = decode_any(record.value, self.limits)  # SchemaError -> dead letter
        if not isinstance(item, (VisualNote, SpeechNote, Query)):
            raise WrongRecordType(f"the memory topic carries notes and queries, not a {type(item).__name__}")
        if item.stream_id != state.stream_id:
            raise WrongRecordType(
                f"a {type(item).__name__} of stream {item.stream_id!r} keyed {record.key!r}"
            )
        if isinstance(item, VisualNote):
            self._visual(state, item)
        elif isinstance(item, SpeechNote):
            self._speech(state, item)
        elif isinstance(item, Query):
            if item.query_id not in state.answered and all(h.query_id != item.query_id for h in state.held):
                state.held.append(
                    Held(
                        record.value,
                        item.query_id,
                        item.asked_at_us,
                        wall_us(record),
                        (record.topic, record.partition, record.offset),
                    )
                )
        self._flush(state)
        return state, self._release(state, None)

    def tick(self, state: MemoryState, now: int) -> tuple[MemoryState, list[Output]]:
        if not any(now - h.received_us >= self.config.hold_timeout_us for h in state.held):
            return state, []
        return state, self._release(state, now)

    # -- notes -------------------------------------------------------------------
    def _open(self, state: MemoryState, start_us: int) -> None:
        if state.kv is None:
            state.kv = self.memory.open(state.stream_id, start_us=start_us)
            state.kv_version += 1

    def _prefill(self, state: MemoryState, text: str, start_us: int, end_us: int) -> None:
        self._open(state, start_us)
        state.kv = self.memory.prefill_text(state.kv, text, start_us, end_us)
        state.kv_version += 1

    def _visual(self, state: MemoryState, n: VisualNote) -> None:
        if n.seq <= state.last_frame_seq:
            return
        vec: np.ndarray = np.asarray(n.feature, np.float32)
        vec = (vec / max(float(np.linalg.norm(vec)), 1e-12)).astype(np.float16)[None]
        if state.features is not None and state.features.shape[1] != vec.shape[1]:
            raise WrongRecordType(
                f"feature of width {vec.shape[1]}, the stream's are {state.features.shape[1]}"
            )
        state.last_frame_seq = n.seq
        state.frames_wall_us = max(state.frames_wall_us, n.wall_us)
        used = len(state.seqs)
        if state.features is None:
            state.features = np.empty((64, vec.shape[1]), np.float16)
        elif used == len(state.features):
            state.features = np.concatenate([state.features, np.empty_like(state.features)])
        state.features[used] = vec[0]
        state.seqs.append(n.seq)
        state.pts.append(n.pts_us)
        state.tiers.append(n.tier)
        state.scores.append(0.0 if n.score is None else float(n.score))
        state.tokens.append(n.tokens)
        state.hashes.append(n.content_hash)
        state.frame_pts_us = max(state.frame_pts_us, n.pts_us)
        if state.offset_us is None:
            state.offset_us = n.wall_us - n.pts_us
        scene = n.tier == "clear" and n.reason in ("first", "above")
        if scene and n.pts_us - state.last_scene_note_us >= self.config.scene_note_gap_us:
            state.last_scene_note_us = n.pts_us
            what = "The video starts." if n.reason == "first" else "The picture changes: a new scene."
            state.pending.append(
                (n.pts_us, 0, n.seq, f"[{n.pts_us / 1e6:.1f} s] {what}\n", n.pts_us, n.pts_us)
            )

    def _speech(self, state: MemoryState, n: SpeechNote) -> None:
        state.audio_wall_us = max(state.audio_wall_us, n.wall_us)
        if n.end_us <= state.heard_us and n.text:
            return  # a replayed utterance
        # the audio has been noted up to here: to the end, or to where an utterance still open began
        state.heard_us = max(state.heard_us, n.end_us if n.open_since_us is None else n.open_since_us)
        if state.offset_us is None:
            state.offset_us = n.wall_us - n.end_us  # the note's wall clock is its chunk's end
        if n.text:
            state.utterances += 1
            state.pending.append(
                (
                    n.start_us,
                    1,
                    n.seq,
                    f"[{n.start_us / 1e6:.1f}-{n.end_us / 1e6:.1f} s] Speech: {n.text}\n",
                    n.start_us,
                    n.end_us,
                )
            )

    def _flush(self, state: MemoryState, everything: bool = False, upto: int | None = None) -> None:
        """Prefill the pending text that every source of the stream has passed, in stream-time
        order, never past the time of a question still held: what the KV memory holds when a
        question is answered, and in which order, depends on the stream, not on how the stages'
        notes interleaved on the memory topic (a restarted run builds the same memory)."""
        if not state.pending:
            return
        if upto is not None:
            self._prefill_ready(state, upto, speech_until=upto)
            return
        # Every source the stream is expected to have must have reported: one that has not may only
        # be late (its stage lags), and text of the other would enter the memory out of order. A
        # source that never comes (audio-only, or video without audio) holds the text until a
        # question takes it (or until too much waits).
        expected_missing = state.frames_wall_us < 0 or (self.config.expect_audio and state.audio_wall_us < 0)
        if (
            not everything
            and expected_missing
            and len(state.pending) <= self.config.max_pending_without_audio
        ):
            return
        marks = []
        if state.frames_wall_us >= 0:
            marks.append(state.frame_pts_us)
        if state.audio_wall_us >= 0:
            marks.append(state.heard_us)
        limit = (1 << 62) if everything or not marks else min(marks)
        speech_until = None
        if not everything:
            held = [t for t in (self._stream_time(state, h) for h in state.held) if t is not None]
            limit = min([limit, *held])
            speech_until = min(held, default=None)
        self._prefill_ready(state, limit, speech_until)

    def _prefill_ready(self, state: MemoryState, limit: int, speech_until: int | None = None) -> None:
        """Prefill, in stream-time order, the pending text that starts by ``limit``; an utterance
        that goes on past ``speech_until`` (a held question's time) waits: a question sees the
        utterances that ended by its time, and never one it was asked in the middle of (whether
        that one's transcript has come yet or not depends on the stages' timing)."""

        def ready(p) -> bool:
            return p[0] <= limit and (speech_until is None or p[1] != 1 or p[5] <= speech_until)

        now = sorted(p for p in state.pending if ready(p))
        if not now:
            return
        state.pending = [p for p in state.pending if not ready(p)]
        for _, _, _, text, start, end in now:
            self._prefill(state, text, start, end)

    @staticmethod
    def _stream_time(state: MemoryState, h: Held) -> int | None:
        """The stream time a question was asked at (None before the stream's clock is known)."""
        return None if state.offset_us is None else h.asked_at_us - state.offset_us

    # -- questions -----------------------------------------------------------------
    def _ready(self, state: MemoryState, h: Held, now: int | None) -> bool:
        if now is not None and now - h.received_us >= self.config.hold_timeout_us:
            return True
        if state.frames_wall_us < 0:
            return False  # no frame yet: wait (an audio-only stream is released by the timeout)
        if state.frames_wall_us < h.asked_at_us:
            return False
        if state.audio_wall_us < 0:
            # no audio yet: it may only be late (its stage lags), so with speech on the question waits
            # for it; a stream without audio is answered when the hold times out
            return not self.config.expect_audio
        return state.audio_wall_us >= h.asked_at_us

    def _release(self, state: MemoryState, now: int | None) -> list[Output]:
        outputs, keep = [], []
        for h in sorted(state.held, key=lambda h: (h.asked_at_us, h.query_id)):
            if self._ready(state, h, now):
                at = self._stream_time(state, h)
                if now is not None or at is None:  # the hold timed out (a source stopped): what came
                    self._flush(state, everything=True)
                else:  # exactly the text up to the question's time
                    self._flush(state, upto=at)
                try:
                    answer = self._answer(state, h, at)
                except (
                    ModelCallFailed
                ) as err:  # retried already: the asker is told, the question dead-lettered
                    answer = self._failed(state, h, err)
                    outputs += self._dead_letter(state, h, err)
                # keyed by the query id for readers; identified by stream and query id for the ledger
                identity = scoped_id(state.stream_id, "answer", h.query_id).encode()
                outputs.append(
                    Output(
                        self.answers_topic,
                        h.query_id.encode(),
                        encode(answer),
                        headers=((OUTPUT_ID_HEADER, identity),),
                        partition_key=state.stream_id.encode(),
                    )
                )
                state.answered = [*state.answered, h.query_id][-KEEP_ANSWERED:]
            else:
                keep.append(h)
        if outputs:
            state.held = keep
            self._write_manifest(state)
        return outputs

    def _answer(self, state: MemoryState, h: Held, at: int | None = None) -> Answer:
        query = decode(h.data, Query, self.limits)
        released = now_us()
        latency = [StageLatency(stage="wait", ms=max(0.0, (released - h.received_us) / 1000))]
        if not state.seen:
            text = f"unknown stream {state.stream_id!r}: no frames or audio of it have reached the pipeline"
            evidence, model_id = (), SYSTEM_ID
        elif query.image is not None:
            text, evidence, model_id, timings = self._image_answer(state, query, at)
            latency += [StageLatency(stage=k, ms=v) for k, v in timings.items()]
        elif state.kv is None:
            text, evidence, model_id = "Nothing has been said or noted in this stream yet.", (), SYSTEM_ID
        else:
            text, evidence, model_id, timings = self._text_answer(state, query)
            latency += [StageLatency(stage=k, ms=v) for k, v in timings.items()]
        total = sum(s.ms for s in latency)
        return Answer(
            query_id=query.query_id,
            stream_id=query.stream_id,
            text=text,
            model_id=model_id,
            answered_at_us=now_us(),
            evidence=tuple(evidence),
            latency=(*latency, StageLatency(stage="total", ms=total)),
        )

    def _failed(self, state: MemoryState, h: Held, err: ModelCallFailed) -> Answer:
        wait = max(0.0, (now_us() - h.received_us) / 1000)
        return Answer(
            query_id=h.query_id,
            stream_id=state.stream_id,
            model_id=SYSTEM_ID,
            answered_at_us=now_us(),
            text=f"This question could not be answered: {err}",
            latency=(StageLatency(stage="wait", ms=wait), StageLatency(stage="total", ms=wait)),
        )

    def _dead_letter(self, state: MemoryState, h: Held, err: ModelCallFailed) -> list[Output]:
        if self.dead_letter_topic is None:
            return []
        topic, partition, offset = h.source
        letter = make_dead_letter(
            err,
            source_topic=topic,
            source_partition=partition,
            source_offset=offset,
            payload=h.data,
            key=state.stream_id.encode(),
            limits=self.limits,
        )
        return [
            Output(
                self.dead_letter_topic,
                scoped_id(state.stream_id, "question", h.query_id).encode(),
                encode(letter),
                partition_key=state.stream_id.encode(),
            )
        ]

    def _text_answer(self, state: MemoryState, query: Query):
        memory = self.memory
        question = query.text
        if query.options:
            question += " Options: " + "; ".join(query.options) + ". Answer with one option."
        # Everything goes to the index first, so the question scores every block (the recent ones
        # too) and its evidence names the blocks it was answered from.
        memory.spill(state.kv, keep_tokens=0)
        state.kv_version += 1
        answer = self.lm_guard.call(
            lambda: memory.answer(state.kv, question), what=f"question {query.query_id}"
        )
        spans = sorted(answer.evidence, key=lambda e: -e.score)
        evidence = [EvidenceSpan(start_us=e.start_us, end_us=e.end_us, score=float(e.score)) for e in spans]
        t = answer.timings_ms
        timings = {
            "retrieve": t.get("query", 0.0) + t.get("score", 0.0) + t.get("fetch", 0.0),
            "prefill": max(
                0.0, t.get("ttft", 0.0) - t.get("query", 0.0) - t.get("score", 0.0) - t.get("fetch", 0.0)
            ),
            "decode": t.get("decode", 0.0),
        }
        return answer.text.strip(), evidence, memory.model_id, timings

    def _image_answer(self, state: MemoryState, query: Query, at: int | None = None):
        from streamvqa.schemas import SchemaError

        from .frames import decode_image

        encoder = self.image_encoder
        t0 = time.perf_counter()
        try:
            pixels = decode_image(cast(bytes, query.image), "image")  # _answer checked it is there
        except SchemaError as err:  # the query stage checks this; a crafted memory-topic message may not be
            return f"The example image could not be used: {err}", [], SYSTEM_ID, {}

        def encode_image():
            with torch.inference_mode():
                return encoder.encode(pixels[None]).pooled[0].float().cpu().numpy()

        vec = self.image_guard.call(encode_image, what=f"the image of question {query.query_id}")
        t1 = time.perf_counter()
        name = getattr(encoder, "name", "vision-encoder")
        if state.features is None:
            return "No frame of this stream has been seen yet.", [], name, {"encode": (t1 - t0) * 1000}
        vec = vec / max(float(np.linalg.norm(vec)), 1e-12)
        upto = len(state.pts) if at is None else int(np.searchsorted(np.asarray(state.pts), at, side="right"))
        upto = max(upto, 1)  # frames up to the question's time (at least the first)
        sims = state.features[:upto].astype(np.float32) @ vec.astype(np.float32)
        spans = match_spans(
            sims, state.pts[:upto], self.config.image_match_threshold, self.config.image_match_margin
        )
        spans = spans[: self.config.max_spans]
        timings = {"encode": (t1 - t0) * 1000, "match": (time.perf_counter() - t1) * 1000}
        best = int(np.argmax(sims))
        if not spans:
            text = (
                f"No frame of this stream looks like this image (best similarity {sims[best]:.2f} "
                f"at {state.pts[best] / 1e6:.1f} s)."
            )
            return text, [], name, timings
        where = ", ".join(f"{s.start_us / 1e6:.1f}-{s.end_us / 1e6:.1f} s" for s in spans)
        text = f"It appeared at {where} (best similarity {spans[0].score:.2f})."
        return text, spans, name, timings

    def _write_manifest(self, state: MemoryState) -> None:
        """The stream's memory as a MemoryManifest (what lives where, in bytes) for reports and
        operators; overwritten after every answer. Not state: nothing reads it back."""
        if self.objects is None or state.kv is None:
            return
        manifest = manifest_of(state, self.memory.store)
        self.objects.put(f"{stream_prefix(state.stream_id)}memory/manifest", encode(manifest))


def manifest_of(state: MemoryState, store=None) -> MemoryManifest:
    """A stream's memory: its frames (tier, tokens, score, content hash) and KV blocks (time range,
    bytes, content hash; the tier ``store`` holds it in, else "object" for spilled blocks), the
    most recent ``MANIFEST_MAX_ENTRIES`` of each (it is rewritten at every answer: a stream that
    runs for weeks must not make it grow without end); ``total_tokens`` counts everything."""
    kv = state.kv
    blocks = []
    if kv is not None:
        per_token = _bytes_per_token(kv)
        for s in kv.index[-MANIFEST_MAX_ENTRIES:]:
            tiers = store.where(s.key) if store is not None else []
            blocks.append(
                ManifestBlock(
                    block_index=s.block_index,
                    start_us=s.start_us,
                    end_us=max(s.end_us, s.start_us),
                    tier=_tier_name(tiers[0]) if tiers else "object",
                    nbytes=s.num_tokens * per_token,
                    key=s.key.path,
                    content_hash=s.block_hash,
                )
            )
        for b in [kv.sink, *kv.window]:
            if b is not None:
                blocks.append(
                    ManifestBlock(
                        block_index=b.block_index,
                        start_us=b.start_us,
                        end_us=b.end_us,
                        tier="gpu" if b.device.type == "cuda" else "cpu",
                        nbytes=b.nbytes,
                        key="",
                        content_hash=b.content_hash(),
                    )
                )
    recent = slice(-MANIFEST_MAX_ENTRIES, None)
    frames = tuple(
        ManifestFrame(seq=q, pts_us=p, tier=t, tokens=k, score=c, content_hash=h)
        for q, p, t, k, c, h in zip(
            state.seqs[recent],
            state.pts[recent],
            state.tiers[recent],
            state.tokens[recent],
            state.scores[recent],
            state.hashes[recent],
            strict=True,
        )
    )
    return MemoryManifest(
        stream_id=state.stream_id,
        generation=state.kv_version,
        updated_at_us=now_us(),
        token_budget=0,
        total_tokens=sum(state.tokens)
        + (
            sum(b.num_tokens for b in [kv.sink, *kv.window] if b is not None)
            + sum(s.num_tokens for s in kv.index)
            if kv is not None
            else 0
        ),
        frames=frames,
        kv_blocks=tuple(blocks),
    )


def _index_rows(state: MemoryState, lo: int, hi: int) -> tuple[dict, bytes]:
    """Rows [lo, hi) of the visual index: its columns, and its features as float16 bytes."""
    columns = {c: getattr(state, c)[lo:hi] for c in _COLUMNS}
    feats = b"" if state.features is None else state.features[lo:hi].astype("<f2").tobytes()
    return columns, feats


def state_from_snapshot(data: bytes, objects, kv_store) -> MemoryState:
    """A memory stage state from its snapshot bytes without loading any model (tools, tests)."""
    stage = MemoryStage(lambda: (_StoreOnly(kv_store), None), answers_topic="-", objects=objects)
    return stage.decode_state(data)


class _StoreOnly:
    def __init__(self, store) -> None:
        self.store = store


def _bytes_per_token(kv) -> int:
    block = kv.sink or (kv.window[0] if kv.window else None)
    if block is None or not block.num_tokens:
        return 0
    return (block.keys.numel() * block.keys.element_size() * 2) // block.num_tokens


def _tier_name(name: str) -> str:
    for tier in ("gpu", "cpu", "disk", "object"):
        if tier in name:
            return tier
    return "object"


def match_spans(sims: np.ndarray, pts: list[int], threshold: float, margin: float) -> list[EvidenceSpan]:
    """Runs of consecutive frames similar to the query (>= max(threshold, best - margin)), best
    first; a run ends where the next frame begins (or one frame interval after the last)."""
    if len(sims) == 0:
        return []
    cut = max(threshold, float(sims.max()) - margin)
    step = int(np.median(np.diff(pts))) if len(pts) > 1 else 1_000_000
    spans, i = [], 0
    while i < len(sims):
        if sims[i] < cut:
            i += 1
            continue
        j = i
        while j + 1 < len(sims) and sims[j + 1] >= cut:
            j += 1
        end = pts[j + 1] if j + 1 < len(pts) else pts[j] + step
        spans.append(
            EvidenceSpan(start_us=pts[i], end_us=max(end, pts[i]), score=float(sims[i : j + 1].max()))
        )
        i = j + 1
    return sorted(spans, key=lambda s: -s.score)
