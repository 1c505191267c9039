"""Audio operators: voice activity detection and speech recognition, with explicit state.

    from streamvqa.operators.audio import SpeechToText

    stt = SpeechToText()
    state = stt.initial_state("cam-1")
    transcripts, state = stt.process_chunk(state, audio_chunk)   # AudioChunk records in order
    transcripts, state = stt.flush(state)                         # end of stream

Plain Python (no Beam): state goes in, outputs and a new state come out, and the
state snapshots to bytes (:meth:`VadState.to_bytes`).
"""

from __future__ import annotations

import numpy as np

from .asr import Transcriber, TranscriptSegment, Word, whisper_model_path
from .vad import SAMPLE_RATE, SpeechSegment, VadConfig, VadState, VoiceActivity, audio_samples

__all__ = [
    "SAMPLE_RATE",
    "SpeechSegment",
    "SpeechToText",
    "Transcriber",
    "TranscriptSegment",
    "VadConfig",
    "VadState",
    "VoiceActivity",
    "Word",
    "audio_samples",
    "whisper_model_path",
]


class SpeechToText:
    """VAD then ASR: completed speech segments of a stream become transcript segments."""

    def __init__(self, vad: VoiceActivity | None = None, transcriber: Transcriber | None = None) -> None:
        self.vad = vad or VoiceActivity()
        self._transcriber = transcriber

    @property
    def transcriber(self) -> Transcriber:
        if self._transcriber is None:  # loads the model only when speech first needs it
            self._transcriber = Transcriber()
        return self._transcriber

    def initial_state(self, stream_id: str) -> VadState:
        return self.vad.initial_state(stream_id)

    def process_chunk(self, state: VadState, chunk) -> tuple[list[TranscriptSegment], VadState]:
        segments, state = self.vad.process_chunk(state, chunk)
        return self._transcribe(segments), state

    def process(
        self, state: VadState, samples: np.ndarray, pts_us: int | None = None
    ) -> tuple[list[TranscriptSegment], VadState]:
        segments, state = self.vad.process(state, samples, pts_us)
        return self._transcribe(segments), state

    def flush(self, state: VadState) -> tuple[list[TranscriptSegment], VadState]:
        segments, state = self.vad.flush(state)
        return self._transcribe(segments), state

    def _transcribe(self, segments: list[SpeechSegment]) -> list[TranscriptSegment]:
        out = []
        for segment in segments:
            transcript = self.transcriber.transcribe(segment)
            if transcript is not None:
                out.append(transcript)
        return out
