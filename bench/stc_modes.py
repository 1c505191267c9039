"""STC-Cacher modes on the pipeline's path: one frame per call, the demo stream (2 fps).

For plain DINOv2-S (the baseline) and the STC presets the pipeline offers (fixed, adaptive,
scene; ``PipelineSettings.stc_mode``): time per frame (best of two interleaved passes), how well the
CurveStream scores over the cached features follow the plain ones (correlation), the pooled
features' cosine to the plain ones, and which frames CurveStream routes to clear memory (the scene
cuts are frames 30 and 60).

    python -m bench stc-modes
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import track
from rich.table import Table

OUT = Path(__file__).parent / "out"


def _features(encoder, frames, per_stream: bool):
    """Pooled features, seconds per frame and the mean reused fraction of one pass over the frames
    (a per-stream encoder starts the pass with an empty cache)."""
    out, skipped = [], []
    if per_stream:
        encoder.drop_stream("s")
    t0 = time.perf_counter()
    for f in frames:
        o = encoder.encode(f[None], stream_id="s") if per_stream else encoder.encode(f[None])
        out.append(o.pooled[0].float().numpy())
        if per_stream:
            skipped.append(encoder.last_stats[-1].skipped_fraction)
    return (
        np.array(out),
        (time.perf_counter() - t0) / len(frames),
        float(np.mean(skipped)) if skipped else 0.0,
    )


def _route(features):
    from streamvqa.operators.curvature.operator import CurveStream, frames_from_features

    _, steps = CurveStream().run(frames_from_features(features))
    return np.array([s.decision.score for s in steps]), [
        i for i, s in enumerate(steps) if s.decision.tier == "clear"
    ]


def main(quick: bool = False) -> None:
    from streamvqa.demo_media import build_demo_media
    from streamvqa.media import decode_jpeg
    from streamvqa.operators.vision import build_encoder

    console = Console(width=160)
    with tempfile.TemporaryDirectory() as tmp:
        media = build_demo_media(Path(tmp), scene_s=15.0, fps=2.0)
        frames = [decode_jpeg(p.read_bytes()) for p in sorted(media.frames_dir.glob("*.jpg"))]
    from streamvqa.operators.vision import STCCacheConfig
    from streamvqa.operators.vision.stc_cache import PRESETS  # the PipelineSettings.stc_mode choices

    encoders = {"plain": (build_encoder("dinov2-s-imgfocus"), False)}
    for mode in PRESETS:
        encoders[mode] = (build_encoder("stc-dinov2-s-imgfocus", config=STCCacheConfig.preset(mode)), True)
    runs: dict[str, list] = {name: [] for name in encoders}
    passes = 1 if quick else 2
    for _ in track(range(passes), description="passes (every encoder in turn)"):
        for name, (encoder, per_stream) in encoders.items():  # interleaved: drift hits every encoder alike
            runs[name].append(_features(encoder, frames, per_stream))
    for name, r in runs.items():
        assert all(np.array_equal(r[0][0], other[0]) for other in r[1:]), f"{name}: passes differ"
    plain = runs["plain"][0][0]
    plain_scores, plain_clear = _route(plain)
    rows = {}
    for name, r in runs.items():
        feats, skipped = r[0][0], r[0][2]
        sec = min(x[1] for x in r)
        scores, clear = _route(feats)
        ok = ~np.isnan(scores) & ~np.isnan(plain_scores)
        cos = (feats * plain).sum(1) / np.linalg.norm(feats, axis=1) / np.linalg.norm(plain, axis=1)
        rows[name] = {
            "ms_per_frame": sec * 1000,
            "ms_per_pass": [x[1] * 1000 for x in r],
            "score_corr": float(np.corrcoef(scores[ok], plain_scores[ok])[0, 1]),
            "cos_mean": float(cos.mean()),
            "cos_min": float(cos.min()),
            "skipped": skipped,
            "clear": clear,
            "clear_missed": sorted(set(plain_clear) - set(clear)),
            "clear_extra": sorted(set(clear) - set(plain_clear)),
        }
    table = Table(
        "encoder",
        "ms/frame",
        "speed vs plain",
        "ViT work reused",
        "score corr",
        "cos mean/min",
        "clear frames",
        title=f"STC modes, {len(frames)} demo frames at 2 fps, one frame per call, "
        f"best of {passes} interleaved passes",
    )
    for name, r in rows.items():
        table.add_row(
            name,
            f"{r['ms_per_frame']:.0f}",
            f"{rows['plain']['ms_per_frame'] / r['ms_per_frame']:.2f}x",
            f"{r['skipped']:.0%}",
            f"{r['score_corr']:.2f}",
            f"{r['cos_mean']:.3f}/{r['cos_min']:.3f}",
            ", ".join(map(str, r["clear"])),
        )
    console.print(table)
    OUT.mkdir(exist_ok=True)
    (OUT / "stc_modes.json").write_text(json.dumps(rows, indent=2))
