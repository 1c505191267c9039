"""AudioStage: decode/validate -> voice activity (silero-vad) -> speech recognition (Whisper
tiny.en via faster-whisper) -> a SpeechNote per utterance on the memory topic.

When no note has been sent for ``progress_us`` of stream time it notes progress (a blank
SpeechNote), so the memory stage knows how far the audio has been heard: a question waits for
it. During speech the mark says since when an utterance is open (``open_since_us``): a question
asked while someone is talking need not wait for them to finish.
State per stream: the VAD state (its open segment included) and the last notes' ends.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from streamvqa.operators.audio import SpeechToText, VadState
from streamvqa.operators.io.records import KafkaRecord, Output, scoped_id
from streamvqa.operators.model_guard import CallPolicy, ModelGuard
from streamvqa.schemas import AudioChunk, Limits, SpeechNote
from streamvqa.schemas.errors import InvalidField

from .common import decode_keyed, note, read_tagged_blob, tagged_blob, wall_us

_STATE = b"streamvqa.audio-stage/1"


@dataclass
class AudioStageState:
    vad: VadState
    last_seq: int = -1
    marked_us: int = -1  # audio noted up to here: every utterance that ended by then is sent
    utterances: int = 0
    reported_us: int = -1  # end of the last note sent (a mark during speech included)

    def to_bytes(self) -> bytes:
        head = {
            "last_seq": self.last_seq,
            "marked_us": self.marked_us,
            "utterances": self.utterances,
            "reported_us": self.reported_us,
        }
        return tagged_blob(_STATE, head, self.vad.to_bytes())


@dataclass
class AudioStage:
    speech: SpeechToText
    memory_topic: str
    progress_us: int = 1_000_000
    limits: Limits = field(default_factory=Limits)
    calls: CallPolicy = field(default_factory=CallPolicy)
    name: str = "audio"

    def __post_init__(self) -> None:
        self.guard = ModelGuard("speech", self.calls)

    def initial_state(self, stream_id: str) -> AudioStageState:
        return AudioStageState(self.speech.initial_state(stream_id))

    def encode_state(self, state: AudioStageState) -> bytes:
        return state.to_bytes()

    def decode_state(self, data: bytes) -> AudioStageState:
        head, body = read_tagged_blob(_STATE, data, "audio stage state")
        vad = VadState.from_bytes(body)
        return AudioStageState(
            vad,
            head["last_seq"],
            head["marked_us"],
            head["utterances"],
            head.get("reported_us", head["marked_us"]),
        )

    def process(self, state: AudioStageState, record: KafkaRecord) -> tuple[AudioStageState, list[Output]]:
        chunk = decode_keyed(record, AudioChunk, self.limits)  # SchemaError -> dead letter
        if chunk.seq <= state.last_seq:
            return state, []
        t0 = time.perf_counter()

        def hear():
            try:
                return self.speech.process_chunk(state.vad, chunk)  # pure: the VAD state is explicit
            except ValueError as err:  # e.g. a sample rate the VAD cannot take: a bad record
                raise InvalidField(str(err), "payload") from err

        transcripts, vad = self.guard.call(hear, what=f"audio chunk {chunk.seq} of {chunk.stream_id}")
        asr_ms = (time.perf_counter() - t0) * 1000
        state = AudioStageState(vad, chunk.seq, state.marked_us, state.utterances, state.reported_us)
        wall = wall_us(record) + _duration_us(chunk)  # the chunk has been heard to its end
        outputs: list[Output] = []
        for t in transcripts:
            # never before the audio already noted (VAD pads segments): the memory stage orders
            # text by start time and has passed everything up to the last note
            start = max(t.start_us, state.marked_us, 0)
            speech = SpeechNote(
                stream_id=chunk.stream_id,
                seq=chunk.seq,
                start_us=start,
                end_us=max(t.end_us, start),
                wall_us=wall,
                text=t.text.strip(),
                avg_logprob=float(t.avg_logprob),
                asr_ms=asr_ms,
            )
            outputs.append(
                note(self.memory_topic, scoped_id(chunk.stream_id, "speech", start), speech, record)
            )
            state.marked_us = max(state.marked_us, t.end_us)
            state.reported_us = max(state.reported_us, t.end_us)
            state.utterances += 1
        heard_us = chunk.pts_us + _duration_us(chunk)
        if heard_us - max(state.reported_us, 0) >= self.progress_us:
            start = max(state.marked_us, 0)
            open_since = self.speech.vad.open_since_us(vad)
            mark = SpeechNote(
                stream_id=chunk.stream_id,
                seq=chunk.seq,
                start_us=start,
                end_us=heard_us,
                wall_us=wall,
                text="",
                # never before what is noted: the utterance's transcript will not start earlier
                open_since_us=None if open_since is None else min(max(open_since, start), heard_us),
            )
            outputs.append(
                note(self.memory_topic, scoped_id(chunk.stream_id, "heard", chunk.seq), mark, record)
            )
            if open_since is None:  # the audio up to here holds no unfinished speech
                state.marked_us = heard_us
            state.reported_us = heard_us
        return state, outputs


def _duration_us(chunk: AudioChunk) -> int:
    from streamvqa.schemas import SAMPLE_FORMATS

    frames = len(chunk.payload) // (chunk.channels * SAMPLE_FORMATS[chunk.sample_format])
    return frames * 1_000_000 // chunk.sample_rate
