"""Voice activity detection over one stream's 16 kHz audio, with explicit state.

:class:`VoiceActivity` runs the Silero VAD ONNX model that ships inside the
``silero-vad`` wheel (loaded offline with onnxruntime, one thread) over the
stream's samples in 512-sample windows (32 ms), carrying everything between
calls in a :class:`VadState`: the samples not yet filling a window, the model's
recurrent state and 64-sample context, a short history for the pre-roll, and
the open speech segment with its samples. ``process(state, ...)`` never changes
the state it is given; it returns the completed segments and a new state, so a
runner can keep, snapshot (:meth:`VadState.to_bytes`) and restore it anywhere.

Because windows always cover the stream's own sample grid (not the chunks'),
the segments do not depend on how the audio was cut into chunks.

Segmentation (Silero's ``VADIterator`` rule, with the segment's samples kept):
speech starts at the first window with probability ``>= threshold``, padded
``speech_pad_ms`` back; it ends after ``min_silence_ms`` of windows below
``threshold - 0.15``, at the first such window plus ``speech_pad_ms``; a segment
that would grow past ``max_segment_s`` is cut at the last window boundary and a new one starts at once; segments
shorter than ``min_speech_ms`` are dropped. :meth:`VoiceActivity.flush` closes
an open segment at the end of the stream.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "SAMPLE_RATE",
    "WINDOW",
    "SpeechSegment",
    "VadConfig",
    "VadState",
    "VoiceActivity",
    "audio_samples",
]

SAMPLE_RATE = 16_000
WINDOW = 512  # samples per model call at 16 kHz (32 ms)
_CONTEXT = 64  # samples of the previous window the model sees again


@dataclass(frozen=True)
class VadConfig:
    threshold: float = 0.5
    min_silence_ms: int = 300
    speech_pad_ms: int = 100
    min_speech_ms: int = 250
    max_segment_s: float = 15.0
    max_gap_ms: int = 2000  # a longer hole in the chunks' timeline closes the segment and re-bases

    def __post_init__(self) -> None:
        if not 0.15 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0.15, 1), got {self.threshold}")
        if self.speech_pad_ms * SAMPLE_RATE // 1000 > self.min_silence_ms * SAMPLE_RATE // 1000 + WINDOW:
            raise ValueError("speech_pad_ms must not exceed min_silence_ms + one window (32 ms)")
        if self.max_segment_s * SAMPLE_RATE < 2 * WINDOW or self.min_speech_ms < 0 or self.max_gap_ms < 0:
            raise ValueError("max_segment_s, min_speech_ms or max_gap_ms out of range")

    @property
    def pad(self) -> int:
        return self.speech_pad_ms * SAMPLE_RATE // 1000


@dataclass(frozen=True)
class SpeechSegment:
    """A completed stretch of speech, times on the stream's clock (microseconds)."""

    stream_id: str
    start_us: int
    end_us: int
    samples: np.ndarray = field(repr=False)  # float32 mono 16 kHz, end_us - start_us long

    @property
    def duration_s(self) -> float:
        return len(self.samples) / SAMPLE_RATE


@dataclass
class VadState:
    """Everything the detector carries between calls (one stream)."""

    stream_id: str = ""
    origin_us: int | None = None  # stream time of sample 0 of the grid
    position: int = 0  # samples consumed into windows (the next window starts here)
    pending: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # < WINDOW samples
    rnn: np.ndarray = field(default_factory=lambda: np.zeros((2, 1, 128), np.float32))
    context: np.ndarray = field(default_factory=lambda: np.zeros(_CONTEXT, np.float32))
    history: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # samples before `position`
    triggered: bool = False
    seg_start: int = 0  # sample index where the open segment starts
    seg_samples: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # seg_start..position
    temp_end: int = 0  # first silent window's end while speech may be ending (0: none)

    _ARRAYS = ("pending", "rnn", "context", "history", "seg_samples")

    def copy(self) -> VadState:
        return dataclasses.replace(self, **{name: getattr(self, name).copy() for name in self._ARRAYS})

    def to_bytes(self) -> bytes:
        """A self-contained snapshot (numpy ``.npz``, no pickle)."""
        scalars = {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in self._ARRAYS
        }
        buffer = io.BytesIO()
        np.savez(
            buffer,
            meta=np.frombuffer(json.dumps(scalars).encode(), np.uint8),
            **{name: getattr(self, name) for name in self._ARRAYS},
        )
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> VadState:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            scalars = json.loads(archive["meta"].tobytes().decode())
            arrays = {name: archive[name].astype(np.float32) for name in cls._ARRAYS}
        return cls(**scalars, **arrays)


@functools.cache
def _session():
    """The Silero VAD ONNX model from the installed silero-vad wheel (no download)."""
    from importlib import resources

    import onnxruntime

    path = resources.files("silero_vad.data").joinpath("silero_vad.onnx")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def audio_samples(chunk) -> np.ndarray:
    """Float32 mono samples of an :class:`AudioChunk` (16 kHz only; channels averaged)."""
    if chunk.sample_rate != SAMPLE_RATE:
        raise ValueError(
            f"audio must be {SAMPLE_RATE} Hz, stream {chunk.stream_id} chunk {chunk.seq} is "
            f"{chunk.sample_rate} Hz (the producer resamples)"
        )
    if chunk.sample_format == "s16le":
        data = np.frombuffer(chunk.payload, "<i2").astype(np.float32) / 32768.0
    elif chunk.sample_format == "f32le":
        data = np.frombuffer(chunk.payload, "<f4").astype(np.float32)
    else:
        raise ValueError(f"unsupported sample format {chunk.sample_format!r}")
    if chunk.channels > 1:
        data = data.reshape(-1, chunk.channels).mean(axis=1)
    return data


class VoiceActivity:
    """The operator: ``(state, samples) -> (completed segments, new state)``."""

    def __init__(self, config: VadConfig | None = None) -> None:
        self.config = config or VadConfig()

    def initial_state(self, stream_id: str) -> VadState:
        return VadState(stream_id=stream_id)

    def process_chunk(self, state: VadState, chunk) -> tuple[list[SpeechSegment], VadState]:
        """An :class:`AudioChunk` record of the state's stream."""
        if state.stream_id and chunk.stream_id != state.stream_id:
            raise ValueError(f"chunk of stream {chunk.stream_id!r} given to the state of {state.stream_id!r}")
        return self.process(state, audio_samples(chunk), chunk.pts_us)

    def process(
        self, state: VadState, samples: np.ndarray, pts_us: int | None = None
    ) -> tuple[list[SpeechSegment], VadState]:
        """Feed the next samples (float, 16 kHz mono) starting at stream time ``pts_us``.

        ``pts_us`` None: right after the previous samples. Samples the state has already
        seen (a replayed chunk) are dropped; a hole up to ``max_gap_ms`` is filled with
        silence, a longer one closes the open segment and re-bases the clock. Raises
        ValueError (state untouched) for non-finite or non-1-D input.
        """
        samples = np.asarray(samples)
        if samples.ndim != 1 or not np.issubdtype(samples.dtype, np.number):
            raise ValueError(
                f"samples must be a 1-D numeric array, got shape {samples.shape} {samples.dtype}"
            )
        samples = samples.astype(np.float32, copy=False)
        bad = np.flatnonzero(~np.isfinite(samples))
        if bad.size:
            raise ValueError(
                f"audio holds {bad.size} non-finite sample(s) (NaN/inf), the first at sample "
                f"{bad[0]}; chunk rejected, state unchanged"
            )
        new = state.copy()
        out: list[SpeechSegment] = []
        if pts_us is not None:
            samples = self._align(new, samples, pts_us, out)
        elif new.origin_us is None:
            new.origin_us = 0
        data = np.concatenate([new.pending, samples]) if new.pending.size else samples
        whole = len(data) // WINDOW * WINDOW
        if whole:
            probs = self._probabilities(new, data[:whole])
            for i, prob in enumerate(probs):
                self._step(new, data[i * WINDOW : (i + 1) * WINDOW], float(prob), out)
        new.pending = data[whole:].copy()
        return out, new

    def flush(self, state: VadState) -> tuple[list[SpeechSegment], VadState]:
        """End of stream: close the open segment at the last full window."""
        new = state.copy()
        out: list[SpeechSegment] = []
        if new.triggered:
            self._close(new, new.position, out)
        return out, new

    # -- internals ---------------------------------------------------------------------

    def open_since_us(self, state: VadState) -> int | None:
        """Stream time where the utterance still open starts (its padding included); None when
        no speech is open."""
        return self._time(state, state.seg_start) if state.triggered else None

    def _time(self, state: VadState, sample: int) -> int:
        return (state.origin_us or 0) + sample * 1_000_000 // SAMPLE_RATE

    def _align(
        self, state: VadState, samples: np.ndarray, pts_us: int, out: list[SpeechSegment]
    ) -> np.ndarray:
        if state.origin_us is None:
            state.origin_us = pts_us
            return samples
        expected = state.position + len(state.pending)  # next sample index
        at = round((pts_us - state.origin_us) * SAMPLE_RATE / 1_000_000)
        if at < expected:  # overlap: drop what was seen
            return samples[expected - at :]
        gap = at - expected
        if gap <= 1:  # rounding
            return samples
        if gap <= self.config.max_gap_ms * SAMPLE_RATE // 1000:
            return np.concatenate([np.zeros(gap, np.float32), samples])
        # A long hole: finish what was open and start a new grid at this chunk.
        if state.triggered:
            self._close(state, state.position, out)
        state.origin_us = pts_us
        state.position = 0
        state.pending = np.zeros(0, np.float32)
        state.history = np.zeros(0, np.float32)
        state.rnn = np.zeros_like(state.rnn)
        state.context = np.zeros_like(state.context)
        return samples

    def _probabilities(self, state: VadState, data: np.ndarray) -> np.ndarray:
        session = _session()
        probs = np.empty(len(data) // WINDOW, np.float32)
        sr = np.array(SAMPLE_RATE, dtype=np.int64)
        context, rnn = state.context, state.rnn
        for i in range(len(probs)):
            window = data[i * WINDOW : (i + 1) * WINDOW]
            x = np.concatenate([context, window])[None, :]
            prob, rnn = session.run(None, {"input": x, "state": rnn, "sr": sr})
            probs[i] = prob.reshape(-1)[0]
            context = window[-_CONTEXT:]
        state.context, state.rnn = context.astype(np.float32).copy(), rnn.astype(np.float32)
        return probs

    def _step(self, state: VadState, window: np.ndarray, prob: float, out: list[SpeechSegment]) -> None:
        cfg = self.config
        start_of_window = state.position
        state.position += WINDOW
        cur = state.position
        if not state.triggered:
            if prob >= cfg.threshold:
                start = max(start_of_window - cfg.pad, start_of_window - len(state.history), 0)
                lead = (
                    state.history[len(state.history) - (start_of_window - start) :]
                    if start < start_of_window
                    else np.zeros(0, np.float32)
                )
                state.triggered, state.seg_start, state.temp_end = True, start, 0
                state.seg_samples = np.concatenate([lead, window])
        else:
            state.seg_samples = np.concatenate([state.seg_samples, window])
            if prob >= cfg.threshold:
                state.temp_end = 0
            elif prob < cfg.threshold - 0.15:
                if not state.temp_end:
                    state.temp_end = cur
                if cur - state.temp_end >= cfg.min_silence_ms * SAMPLE_RATE // 1000:
                    self._close(state, state.temp_end + cfg.pad - WINDOW, out)
            if state.triggered and cur + WINDOW - state.seg_start > round(cfg.max_segment_s * SAMPLE_RATE):
                self._close(state, cur, out)
                state.triggered, state.seg_start = True, cur  # speech goes on: a new segment at once
                state.seg_samples = np.zeros(0, np.float32)
        keep = cfg.pad
        state.history = np.concatenate([state.history, window])[-keep:] if keep else np.zeros(0, np.float32)

    def _close(self, state: VadState, end: int, out: list[SpeechSegment]) -> None:
        end = min(max(end, state.seg_start), state.position)
        samples = state.seg_samples[: end - state.seg_start]
        if len(samples) >= self.config.min_speech_ms * SAMPLE_RATE // 1000:
            out.append(
                SpeechSegment(
                    state.stream_id,
                    self._time(state, state.seg_start),
                    self._time(state, end),
                    samples.copy(),
                )
            )
        state.triggered, state.temp_end = False, 0
        state.seg_samples = np.zeros(0, np.float32)
