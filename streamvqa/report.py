"""The demo report: one HTML page plus PNG figures (matplotlib, Agg backend).

``write_report(data, out_dir)`` writes ``timeline.png``, ``memory.png``, ``latency.png``,
keyframe thumbnails under ``keyframes/``, question images under ``questions/`` and
``report.html`` which ties them together. Plain HTML with a small inline style: no JS, no
network, nothing external. All times in the data model are int microseconds of stream time.
"""

from __future__ import annotations

import html
import itertools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.patches import Rectangle

TIER_COLORS = {"clear": "#1f77b4", "fuzzy": "#ff7f0e"}
OTHER_TIER_COLOR = "#7f7f7f"
KV_TIER_ORDER = ("gpu", "cpu", "disk", "object")
VISUAL_BAR_LABEL = "visual (clear+fuzzy)"
DASH = "\u2013"  # en dash, for ranges
MARK_HIT, MARK_MISS, MARK_NONE = "\u2713", "\u2717", DASH
SPEECH_LABEL_CHARS = 24


# --------------------------------------------------------------------------- data model


@dataclass(frozen=True)
class FramePoint:
    """One frame as CurveStream routed it."""

    seq: int
    pts_us: int
    tier: str  # "clear" | "fuzzy"
    reason: str
    score: float | None
    threshold: float | None
    tokens: int
    memory_tokens: int
    cached_fraction: float
    encode_ms: float
    keyframe_key: str


@dataclass(frozen=True)
class SpeechSpan:
    start_us: int
    end_us: int
    text: str


@dataclass(frozen=True)
class EvidencePoint:
    start_us: int
    end_us: int
    score: float


@dataclass(frozen=True)
class QuestionPoint:
    query_id: str
    text: str
    asked_at_us: int
    has_image: bool
    answer: str
    evidence: tuple[EvidencePoint, ...]
    latency: tuple[tuple[str, float], ...]  # (stage name, ms)
    expected: tuple[int, int] | None = None  # time range the answer should use, if known
    image_jpeg: bytes | None = None


@dataclass(frozen=True)
class Scene:
    name: str
    start_us: int
    end_us: int


@dataclass(frozen=True)
class Keyframe:
    seq: int
    pts_us: int
    jpeg: bytes


@dataclass(frozen=True)
class ReportData:
    stream_id: str
    frames: tuple[FramePoint, ...] = ()
    speech: tuple[SpeechSpan, ...] = ()
    questions: tuple[QuestionPoint, ...] = ()
    scenes: tuple[Scene, ...] = ()
    keyframes: tuple[Keyframe, ...] = ()
    kv_tiers: dict[str, int] = field(default_factory=dict)  # bytes of KV-cache memory per tier
    visual_token_bytes: int = 0  # bytes of one visual token
    dead_letters: tuple[tuple[str, str], ...] = ()  # (reason, detail)
    summary: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------- helpers


def _s(us: int | float) -> float:
    """Microseconds to seconds."""
    return us / 1e6


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    unit, scale = byte_unit(n)
    return f"{n / scale:.0f} {unit}" if unit == "B" else f"{n / scale:.1f} {unit}"


def byte_unit(n: float) -> tuple[str, int]:
    """The binary unit (name, scale) that shows ``n`` bytes with a small number."""
    for power, unit in ((4, "TiB"), (3, "GiB"), (2, "MiB"), (1, "KiB")):
        if abs(n) >= 1024**power:
            return unit, 1024**power
    return "B", 1


def overlaps(evidence: tuple[EvidencePoint, ...], expected: tuple[int, int] | None) -> bool | None:
    """Whether any evidence range meets the expected range; None when nothing is expected.

    Ranges are half-open [start, end); a zero-length evidence range counts when its instant
    lies inside the expected range.
    """
    if expected is None:
        return None
    lo, hi = expected
    for ev in evidence:
        if ev.start_us == ev.end_us:
            if lo <= ev.start_us < hi or lo == hi == ev.start_us:
                return True
        elif max(ev.start_us, lo) < min(ev.end_us, hi):
            return True
    return False


def overlap_mark(q: QuestionPoint) -> str:
    hit = overlaps(q.evidence, q.expected)
    return MARK_NONE if hit is None else (MARK_HIT if hit else MARK_MISS)


def scene_of(pts_us: int, scenes: tuple[Scene, ...]) -> str | None:
    """Name of the first scene whose [start, end) holds ``pts_us``."""
    for sc in scenes:
        if sc.start_us <= pts_us < sc.end_us:
            return sc.name
    return None


def visual_memory_bytes(data: ReportData) -> int:
    """Visual memory at the last frame (by pts), in bytes."""
    if not data.frames:
        return 0
    last = max(data.frames, key=lambda f: (f.pts_us, f.seq))
    return last.memory_tokens * data.visual_token_bytes


def _safe_name(name: str) -> str:
    """A file name made from an id: no separators, no dot-dot, never empty."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", name).strip(".")
    return cleaned or "_"


def _truncate(text: str, n: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "\u2026"


def _no_data(ax: Axes, what: str = "no data") -> None:
    ax.text(0.5, 0.5, what, transform=ax.transAxes, ha="center", va="center", color="#888888")


def _time_range_s(data: ReportData) -> tuple[float, float]:
    times: list[int] = [f.pts_us for f in data.frames]
    times += [t for sp in data.speech for t in (sp.start_us, sp.end_us)]
    times += [t for sc in data.scenes for t in (sc.start_us, sc.end_us)]
    for q in data.questions:
        times.append(q.asked_at_us)
        times += [t for ev in q.evidence for t in (ev.start_us, ev.end_us)]
        if q.expected:
            times += list(q.expected)
    if not times:
        return 0.0, 1.0
    lo, hi = _s(min(times)), _s(max(times))
    pad = max((hi - lo) * 0.02, 0.5)
    return lo - pad, hi + pad


def _save(fig: plt.Figure, path: Path) -> None:
    try:
        fig.savefig(path, dpi=100, bbox_inches="tight")
    finally:
        plt.close(fig)


# --------------------------------------------------------------------------- figures


def plot_timeline(data: ReportData, path: Path) -> None:
    """Stacked panels over stream time: scores, tiers, memory, speech + questions + evidence."""
    frames = sorted(data.frames, key=lambda f: (f.pts_us, f.seq))
    n_rows_d = 1 + len(data.questions)
    fig, axes = plt.subplots(
        4,
        1,
        sharex=True,
        figsize=(12, 8 + 0.3 * n_rows_d),
        gridspec_kw={"height_ratios": [3, 0.6, 1.6, 1.0 + 0.4 * n_rows_d]},
    )
    ax_score, ax_tier, ax_mem, ax_ev = axes
    ax_score.set_xlim(*_time_range_s(data))
    xs = [_s(f.pts_us) for f in frames]

    # (a) curvature score and threshold; NaN leaves a gap in the line.
    if frames:
        scores = [math.nan if f.score is None else f.score for f in frames]
        thresholds = [math.nan if f.threshold is None else f.threshold for f in frames]
        ax_score.plot(xs, scores, color="#555555", linewidth=1, zorder=1, label="score")
        for tier in sorted({f.tier for f in frames}):
            pts = [(x, s) for x, s, f in zip(xs, scores, frames, strict=True) if f.tier == tier]
            ax_score.scatter(
                [p[0] for p in pts],
                [p[1] for p in pts],
                s=14,
                color=TIER_COLORS.get(tier, OTHER_TIER_COLOR),
                zorder=2,
                label=tier,
            )
        ax_score.plot(
            xs, thresholds, linestyle="--", color="#d62728", linewidth=1.2, label="K-sigma threshold"
        )
        ax_score.legend(loc="upper right", fontsize=8)
    else:
        _no_data(ax_score)
    ax_score.set_ylabel("curvature score")
    ax_score.set_title(f"stream {data.stream_id}")
    for sc in data.scenes:
        for ax in axes:
            ax.axvline(_s(sc.start_us), color="#2ca02c", linewidth=1, alpha=0.7)
        ax_score.text(
            _s(sc.start_us),
            0.98,
            f" {_truncate(sc.name, 30)}",
            transform=ax_score.get_xaxis_transform(),
            va="top",
            ha="left",
            fontsize=8,
            color="#2ca02c",
        )

    # (b) tier strip: one cell per frame, as wide as the gap to the next frame.
    if frames:
        gaps = [b - a for a, b in itertools.pairwise(xs) if b > a]
        default_w = sorted(gaps)[len(gaps) // 2] if gaps else 0.1
        for i, f in enumerate(frames):
            w = xs[i + 1] - xs[i] if i + 1 < len(xs) and xs[i + 1] > xs[i] else default_w
            ax_tier.add_patch(Rectangle((xs[i], 0), w, 1, color=TIER_COLORS.get(f.tier, OTHER_TIER_COLOR)))
        ax_tier.set_ylim(0, 1)
    else:
        _no_data(ax_tier)
    ax_tier.set_yticks([])
    ax_tier.set_ylabel("tier", rotation=0, ha="right", va="center")

    # (c) visual memory in bytes.
    if frames:
        mem = [f.memory_tokens * data.visual_token_bytes for f in frames]
        unit, scale = byte_unit(max(mem))
        ax_mem.step(xs, [m / scale for m in mem], where="post", color="#9467bd", label="visual memory")
        ax_mem.set_ylabel(f"memory ({unit})")
        ax_mem.set_ylim(bottom=0)
        ax_mem.legend(loc="upper left", fontsize=8)
    else:
        ax_mem.set_ylabel("memory")
        _no_data(ax_mem)

    # (d) speech row at the top, then one row per question: marker at asked_at, evidence bars,
    # the expected range as an outline.
    if data.speech or data.questions:
        labels = ["speech"] + [f"Q{i}" for i in range(1, len(data.questions) + 1)]
        for sp in data.speech:
            x0, w = _s(sp.start_us), _s(sp.end_us - sp.start_us)
            ax_ev.broken_barh([(x0, w)], (-0.35, 0.7), color="#bcbd22", alpha=0.7)
            ax_ev.text(
                x0, 0, f" {_truncate(sp.text, SPEECH_LABEL_CHARS)}", va="center", fontsize=7, clip_on=True
            )
        cmap = plt.get_cmap("tab10")
        for i, q in enumerate(data.questions, start=1):
            color = cmap((i - 1) % 10)
            for ev in q.evidence:
                alpha = min(max(ev.score, 0.2), 1.0) if math.isfinite(ev.score) else 0.5
                ax_ev.broken_barh(
                    [(_s(ev.start_us), _s(ev.end_us - ev.start_us))], (i - 0.3, 0.6), color=color, alpha=alpha
                )
            if q.expected is not None:
                lo, hi = q.expected
                ax_ev.add_patch(
                    Rectangle(
                        (_s(lo), i - 0.4),
                        _s(hi - lo),
                        0.8,
                        fill=False,
                        edgecolor="black",
                        linestyle="--",
                        linewidth=1.2,
                    )
                )
            ax_ev.plot(
                [_s(q.asked_at_us)], [i], marker="v", color=color, markersize=8, markeredgecolor="black"
            )
            ax_ev.annotate(
                f"Q{i}", (_s(q.asked_at_us), i), xytext=(4, 4), textcoords="offset points", fontsize=8
            )
        ax_ev.set_yticks(range(len(labels)), labels)
        ax_ev.set_ylim(len(labels) - 0.5, -0.5)
    else:
        ax_ev.set_yticks([])
        _no_data(ax_ev)
    ax_ev.set_xlabel("stream time (s)")
    fig.align_ylabels(axes)
    _save(fig, path)


def plot_memory(data: ReportData, path: Path) -> None:
    """Bar chart of KV-cache bytes per tier plus the final visual memory."""
    names = [t for t in KV_TIER_ORDER if t in data.kv_tiers] + sorted(set(data.kv_tiers) - set(KV_TIER_ORDER))
    values = [data.kv_tiers[t] for t in names]
    names.append(VISUAL_BAR_LABEL)
    values.append(visual_memory_bytes(data))
    fig, ax = plt.subplots(figsize=(7, 4))
    if any(values):
        unit, scale = byte_unit(max(values))
        colors = ["#1f77b4"] * (len(names) - 1) + ["#9467bd"]
        bars = ax.bar(names, [v / scale for v in values], color=colors)
        for bar, v in zip(bars, values, strict=True):
            ax.annotate(
                human_bytes(v),
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                xytext=(0, 2),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=8,
            )
        ax.set_ylabel(f"memory ({unit})")
        ax.margins(y=0.12)
    else:
        ax.bar(names, [0] * len(names))
        ax.set_ylabel("memory (B)")
        _no_data(ax)
    ax.set_title("memory per tier")
    ax.tick_params(axis="x", labelrotation=15)
    _save(fig, path)


def plot_latency(data: ReportData, path: Path) -> None:
    """Horizontal stacked bars per question of its latency stages (ms)."""
    stages: list[str] = []
    for q in data.questions:
        for name, _ in q.latency:
            if name not in stages:
                stages.append(name)
    n = len(data.questions)
    fig, ax = plt.subplots(figsize=(9, 1.5 + 0.5 * max(n, 1)))
    if n and stages:
        cmap = plt.get_cmap("tab20")
        colors = {name: cmap(i % 20) for i, name in enumerate(stages)}
        labelled: set[str] = set()
        for i, q in enumerate(data.questions):
            left = 0.0
            for name, ms in q.latency:
                ax.barh(i, ms, left=left, color=colors[name], label=None if name in labelled else name)
                labelled.add(name)
                left += ms
            ax.annotate(
                f"{left:.0f} ms",
                (left, i),
                xytext=(3, 0),
                textcoords="offset points",
                va="center",
                fontsize=8,
            )
        ax.set_yticks(range(n), [f"Q{i}" for i in range(1, n + 1)])
        ax.invert_yaxis()
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
        ax.margins(x=0.1)
    else:
        ax.set_yticks([])
        _no_data(ax)
    ax.set_xlabel("latency (ms)")
    ax.set_title("answer latency per stage")
    _save(fig, path)


# --------------------------------------------------------------------------- HTML

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
img.fig { max-width: 100%; display: block; margin: 0.5em 0; }
.thumbs { display: flex; flex-wrap: wrap; gap: 0.5em; }
figure { margin: 0; text-align: center; font-size: 0.8em; }
figure img, td img { max-width: 160px; display: block; }
.hit { color: #2a2; } .miss { color: #c22; }
.empty { color: #888; font-style: italic; }
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _src(rel: str) -> str:
    return _e(quote(rel))


def _table(headers: list[str], rows: list[list[str]], empty: str) -> str:
    """Table with already-escaped cell HTML."""
    if not rows:
        return f'<p class="empty">{_e(empty)}</p>'
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt_range(start_us: int, end_us: int) -> str:
    return f"{_s(start_us):.1f}{DASH}{_s(end_us):.1f} s"


def _write_keyframes(data: ReportData, out_dir: Path) -> list[tuple[str, list[tuple[Keyframe, str]]]]:
    """Write each keyframe JPEG; return (scene name, [(keyframe, relative path)]) in scene order."""
    kf_dir = out_dir / "keyframes"
    kf_dir.mkdir(parents=True, exist_ok=True)
    groups: dict[str, list[tuple[Keyframe, str]]] = {sc.name: [] for sc in data.scenes}
    other: list[tuple[Keyframe, str]] = []
    for kf in sorted(data.keyframes, key=lambda k: (k.pts_us, k.seq)):
        rel = f"keyframes/{kf.seq:06d}.jpg"
        (out_dir / rel).write_bytes(kf.jpeg)
        name = scene_of(kf.pts_us, data.scenes)
        (other if name is None else groups[name]).append((kf, rel))
    result = [(name, items) for name, items in groups.items() if items]
    if other:
        result.append(("other", other))
    return result


def _questions_html(data: ReportData, out_dir: Path) -> str:
    rows: list[list[str]] = []
    for i, q in enumerate(data.questions, start=1):
        text = _e(q.text)
        if q.image_jpeg:
            rel = f"questions/{_safe_name(q.query_id)}.jpg"
            (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            (out_dir / rel).write_bytes(q.image_jpeg)
            text += f' [image]<br><img src="{_src(rel)}" alt="question image">'
        elif q.has_image:
            text += " [image]"
        evidence = "<br>".join(
            f"{_e(_fmt_range(ev.start_us, ev.end_us))} ({ev.score:.2f})" for ev in q.evidence
        )
        mark = overlap_mark(q)
        cls = {MARK_HIT: "hit", MARK_MISS: "miss"}.get(mark, "")
        expected = "" if q.expected is None else f"<br><small>expected {_e(_fmt_range(*q.expected))}</small>"
        total = sum(ms for _, ms in q.latency)
        rows.append(
            [
                f"Q{i}",
                f"{_s(q.asked_at_us):.1f}",
                text,
                _e(q.answer),
                evidence or '<span class="empty">none</span>',
                f'<span class="{cls}">{mark}</span>{expected}',
                f"{total:.0f}",
            ]
        )
    headers = ["Q#", "asked at (s)", "question", "answer", "evidence", "hits expected", "latency (ms)"]
    return _table(headers, rows, "no questions")


def _keyframes_html(groups: list[tuple[str, list[tuple[Keyframe, str]]]]) -> str:
    if not groups:
        return '<p class="empty">no keyframes</p>'
    parts = []
    for name, items in groups:
        figs = "".join(
            f'<figure><img src="{_src(rel)}" alt="keyframe {kf.seq}">'
            f"<figcaption>{_s(kf.pts_us):.1f} s (#{kf.seq})</figcaption></figure>"
            for kf, rel in items
        )
        parts.append(f'<h3>{_e(name)}</h3><div class="thumbs">{figs}</div>')
    return "".join(parts)


def write_report(data: ReportData, out_dir: Path) -> Path:
    """Write the figures, thumbnails and ``report.html`` under ``out_dir``; return the HTML path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_timeline(data, out_dir / "timeline.png")
    plot_memory(data, out_dir / "memory.png")
    plot_latency(data, out_dir / "latency.png")
    groups = _write_keyframes(data, out_dir)

    summary = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in data.summary.items())
    summary_html = f"<table>{summary}</table>" if summary else '<p class="empty">no summary</p>'
    speech_rows = [
        [f"{_s(sp.start_us):.1f}", f"{_s(sp.end_us):.1f}", _e(sp.text)]
        for sp in sorted(data.speech, key=lambda s: s.start_us)
    ]
    dead_rows = [[_e(reason), _e(detail)] for reason, detail in data.dead_letters]
    title = f"streamvqa report: {data.stream_id}"
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{_e(title)}</title>
<style>{STYLE}</style>
</head>
<body>
<h1>{_e(title)}</h1>
{summary_html}
<h2>Timeline</h2>
<img class="fig" src="timeline.png" alt="timeline: scores, tiers, memory, speech, questions and evidence">
<h2>Memory</h2>
<img class="fig" src="memory.png" alt="memory per tier">
<h2>Latency</h2>
<img class="fig" src="latency.png" alt="latency per question and stage">
<h2>Questions</h2>
{_questions_html(data, out_dir)}
<h2>Speech transcript</h2>
{_table(["start (s)", "end (s)", "text"], speech_rows, "no speech")}
<h2>Keyframes</h2>
{_keyframes_html(groups)}
<h2>Dead letters</h2>
{_table(["reason", "detail"], dead_rows, "no dead letters")}
</body>
</html>
"""
    path = out_dir / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
