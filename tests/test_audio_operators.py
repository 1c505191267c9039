"""Audio operators (VAD, ASR) on real speech from the moonshine-voice wheel, without Beam.

beckett.wav (9.96 s, 16 kHz) says: "Ever tried, ever failed. No matter. Try again.
Fail again. Fail better." (Whisper tiny.en's transcript of it.)
"""

from __future__ import annotations

import importlib.util
from functools import cache
from pathlib import Path

import numpy as np
import pytest

from streamvqa.operators.audio import (
    SpeechSegment,
    SpeechToText,
    Transcriber,
    VadConfig,
    VadState,
    VoiceActivity,
)
from streamvqa.schemas import AudioChunk

RATE = 16_000
PAD_S = 2.0
ORIGIN_US = 5_000_000  # the stream's clock where the test audio starts


@cache
def _speech(name: str) -> np.ndarray:
    import av

    spec = importlib.util.find_spec("moonshine_voice")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("speech WAVs come from the moonshine-voice wheel")
    path = Path(spec.submodule_search_locations[0]) / "assets" / name
    resampler = av.AudioResampler(format="flt", layout="mono", rate=RATE)
    blocks = []
    with av.open(str(path)) as container:
        for frame in container.decode(audio=0):
            blocks.extend(b.to_ndarray().reshape(-1) for b in resampler.resample(frame))
    blocks.extend(b.to_ndarray().reshape(-1) for b in resampler.resample(None))
    return np.concatenate(blocks).astype(np.float32)


@cache
def _padded() -> np.ndarray:
    """2 s of silence + 2 s of faint noise, beckett.wav, then 2 s of noise + 2 s of silence."""
    rng = np.random.default_rng(7)
    noise = (rng.standard_normal(int(PAD_S * RATE)) * 0.003).astype(np.float32)
    silence = np.zeros(int(PAD_S * RATE), np.float32)
    return np.concatenate([silence, noise, _speech("beckett.wav"), noise, silence])


SPEECH_START_US = ORIGIN_US + int(2 * PAD_S * 1e6)
SPEECH_END_US = SPEECH_START_US + round(len(_speech("beckett.wav")) / RATE * 1e6)


def _run(vad: VoiceActivity, audio: np.ndarray, sizes, state: VadState | None = None):
    """Feed ``audio`` in pieces of the given sizes (cycled) with their pts; returns segments."""
    state = state or vad.initial_state("mic")
    segments, position, i = [], 0, 0
    while position < len(audio):
        size = sizes[i % len(sizes)]
        piece = audio[position : position + size]
        out, state = vad.process(state, piece, ORIGIN_US + position * 1_000_000 // RATE)
        segments += out
        position, i = position + size, i + 1
    out, state = vad.flush(state)
    return segments + out, state


def _spans(segments) -> list[tuple[int, int]]:
    return [(s.start_us, s.end_us) for s in segments]


def test_vad_finds_speech_inside_the_speech_and_none_in_silence_or_noise() -> None:
    vad = VoiceActivity()
    segments, _ = _run(vad, _padded(), [len(_padded())])
    assert len(segments) >= 4  # six phrases, separated by pauses
    for s in segments:  # (the WAV ends with a click: a short segment may end just after it)
        assert SPEECH_START_US - 120_000 <= s.start_us < SPEECH_END_US and s.end_us <= SPEECH_END_US + 400_000
        assert len(s.samples) == round((s.end_us - s.start_us) * RATE / 1e6)
        assert s.stream_id == "mic" and s.samples.dtype == np.float32
    covered = sum(s.end_us - s.start_us for s in segments) / 1e6
    assert 4.0 < covered < 9.9  # most of the speech, not the pauses
    # The segment's samples are the stream's samples at its times.
    first = segments[0]
    offset = (first.start_us - ORIGIN_US) * RATE // 1_000_000
    np.testing.assert_array_equal(first.samples, _padded()[offset : offset + len(first.samples)])
    quiet = np.concatenate([_padded()[: int(2 * PAD_S * RATE)]] * 2)
    assert _run(vad, quiet, [RATE])[0] == []


def test_chunking_does_not_change_the_segments() -> None:
    vad = VoiceActivity()
    whole, _ = _run(vad, _padded(), [len(_padded())])
    by_second, _ = _run(vad, _padded(), [RATE])
    ragged, _ = _run(vad, _padded(), [5_923, 511, 16_000, 1, 33_333])
    assert _spans(by_second) == _spans(whole) == _spans(ragged)
    for a, b in zip(whole, ragged, strict=True):
        np.testing.assert_array_equal(a.samples, b.samples)


def test_audio_chunk_records_and_replayed_chunks() -> None:
    vad = VoiceActivity()
    audio = _padded()
    pcm = (np.clip(audio, -1, 1) * 32767).round().astype("<i2")
    chunks = [
        AudioChunk(
            stream_id="mic",
            seq=i,
            pts_us=ORIGIN_US + i * 1_000_000,
            sample_rate=RATE,
            channels=1,
            sample_format="s16le",
            payload=pcm[i * RATE : (i + 1) * RATE].tobytes(),
        )
        for i in range(-(-len(pcm) // RATE))
    ]
    state, segments = vad.initial_state("mic"), []
    for chunk in chunks[:5] + chunks[3:]:  # chunks 3 and 4 arrive twice (an at-least-once replay)
        out, state = vad.process_chunk(state, chunk)
        segments += out
    out, state = vad.flush(state)
    reference, _ = _run(vad, audio, [RATE])
    assert [(round(a / 1e3), round(b / 1e3)) for a, b in _spans(segments + out)] == [
        (round(a / 1e3), round(b / 1e3)) for a, b in _spans(reference)
    ]
    with pytest.raises(ValueError, match="44100 Hz"):
        vad.process_chunk(
            state,
            AudioChunk(
                stream_id="mic",
                seq=99,
                pts_us=0,
                sample_rate=44_100,
                channels=1,
                sample_format="s16le",
                payload=b"\0\0",
            ),
        )


def test_snapshot_and_restore_mid_stream_give_the_same_segments() -> None:
    vad = VoiceActivity()
    audio = _padded()
    reference, _ = _run(vad, audio, [RATE])
    # Stop in the middle of a phrase (an open segment, a partial window pending).
    cut = int(2 * PAD_S * RATE) + int(0.5 * RATE) + 100
    first, state = _run_until(vad, audio[:cut])
    assert state.triggered and state.pending.size
    restored = VadState.from_bytes(state.to_bytes())
    assert restored.to_bytes() == state.to_bytes()
    rest, _ = vad.process(restored, audio[cut:], ORIGIN_US + cut * 1_000_000 // RATE)
    end, _ = vad.flush(_)
    assert _spans(first + rest + end) == _spans(reference)


def _run_until(vad, audio):
    state = vad.initial_state("mic")
    out, state = vad.process(state, audio, ORIGIN_US)
    return out, state


def test_long_speech_is_cut_at_the_maximum_segment_length() -> None:
    vad = VoiceActivity(VadConfig(max_segment_s=3.0))
    segments, _ = _run(vad, _speech("two_cities.wav")[: 20 * RATE], [RATE])
    assert segments and max(s.end_us - s.start_us for s in segments) <= 3_000_000
    assert any(s.end_us - s.start_us > 3_000_000 - 32_000 for s in segments)
    starts = [s.start_us for s in segments]
    assert starts == sorted(starts)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_samples_are_refused_and_the_state_is_unchanged(bad) -> None:
    vad = VoiceActivity()
    _, state = _run_until(vad, _padded()[: int(4.5 * RATE) + 77])
    before = state.to_bytes()
    piece = _padded()[int(4.5 * RATE) + 77 : int(5.5 * RATE)].copy()
    piece[1234] = bad
    with pytest.raises(ValueError, match=r"non-finite sample.*1234"):
        vad.process(state, piece, ORIGIN_US + int(4.5 * RATE + 77) * 1_000_000 // RATE)
    assert state.to_bytes() == before
    with pytest.raises(ValueError, match="1-D"):
        vad.process(state, np.zeros((2, 100), np.float32))
    assert state.to_bytes() == before


@pytest.mark.slow
def test_speech_to_text_transcribes_on_the_stream_clock() -> None:
    stt = SpeechToText()
    state = stt.initial_state("mic")
    audio = _padded()
    transcripts = []
    for i in range(0, len(audio), RATE):
        out, state = stt.process(state, audio[i : i + RATE], ORIGIN_US + i * 1_000_000 // RATE)
        transcripts += out
    out, state = stt.flush(state)
    transcripts += out
    text = " ".join(t.text for t in transcripts).lower()
    for word in ("ever", "tried", "failed", "matter", "try", "again", "fail", "better"):
        assert word in text, text
    for t in transcripts:
        assert SPEECH_START_US - 120_000 <= t.start_us < SPEECH_END_US and t.end_us <= SPEECH_END_US + 400_000
        assert t.stream_id == "mic" and np.isfinite(t.avg_logprob) and t.avg_logprob < 0
        assert t.words and all(t.start_us <= w.start_us <= w.end_us <= t.end_us for w in t.words)
    words = [w for t in transcripts for w in t.words]
    assert [w.start_us for w in words] == sorted(w.start_us for w in words)


def test_transcriber_refuses_non_finite_samples_before_loading_the_model() -> None:
    samples = np.zeros(RATE, np.float32)
    samples[10] = np.nan
    with pytest.raises(ValueError, match=r"NaN/inf"):
        Transcriber().transcribe(SpeechSegment("mic", 0, 1_000_000, samples))
