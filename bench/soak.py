"""Soak: the main pipeline under a sustained load of real-time streams with speech and questions,
for many minutes; is memory bounded and is the lag flat?

Setup as ``bench pipeline`` (a private embedded stack, the pipeline as its own process with every
model in process, warmed up first). Then N streams of the demo media (frames at 1 fps and its
speech, looped, paced in real time) for M minutes, and a question every ``ask_every_s`` seconds
to one stream after another, asked "now" (so the memory stage holds it until both sources have
caught up, as a live user's question would be). Sampled through the run:

- the pipeline process's resident memory (RSS, every second, children included);
- each VisualNote's lag (read back from the memory topic minus the frame's wall time);
- each answer's client latency.

The baseline is the run's own start: every figure of the last third of the run beside the
first third (after the warm-up), and the ratio. The KV store's in-process tiers fill up to their
budgets (``pipeline.kv_device_bytes`` + ``kv_host_bytes``) over the first minutes, so memory is
judged on the middle third against the last. Bounded when RSS's last-third max is within 5 % of
the middle third's, the lag p95 of the last third at most 1.5x the first's, every frame noted
and every question answered. Writes bench/out/soak.json and bench/out/soak.png.

Run: ``python -m bench soak [--quick]`` (full: 4 streams for 30 minutes; quick: 2 for 3) or
``python -m bench.soak --streams N --minutes M``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import threading
import time

from bench.pipeline_bench import (
    OUT,
    BenchError,
    RssSampler,
    Run,
    _pct,
    _progress,
    _r,
    console,
    live_pipeline,
)

QUICK = {"streams": 2, "minutes": 3.0, "ask_every_s": 20.0}
FULL = {"streams": 4, "minutes": 30.0, "ask_every_s": 20.0}


def _asker(
    run: Run, sids: list[str], texts: list[str], every_s: float, stop: threading.Event, rows: list
) -> None:
    from streamvqa.ask import ask

    i = 0
    while not stop.wait(every_s):
        sid, text = sids[i % len(sids)], texts[i % len(texts)]
        i += 1
        t0 = time.time()
        try:
            answer = ask(run.settings, sid, text, timeout_s=120, check_stream=False)
            stages = {s.stage: round(s.ms, 1) for s in answer.latency}
            rows.append(
                {
                    "at_s": t0,
                    "stream": sid,
                    "ms": (time.time() - t0) * 1000,
                    "text": answer.text,
                    "evidence": len(answer.evidence),
                    "stages_ms": stages,
                }
            )
        except Exception as err:  # counted as unanswered
            rows.append({"at_s": t0, "stream": sid, "ms": None, "error": repr(err)})


def soak(run: Run, media, streams: int, minutes: float, ask_every_s: float) -> dict:
    from streamvqa.produce import ProduceOptions

    seconds = int(minutes * 60)
    per_loop = len(list(media.frames_dir.glob("*.jpg")))
    sids = [f"soak-{run.tag}-{i}" for i in range(streams)]
    rss = RssSampler(run.pipeline.pid).start()
    t_start = time.time()
    boxes = [
        run.produce_async(
            media.frames_dir,
            ProduceOptions(
                stream_id=sid,
                image_fps=1.0,
                audio_path=media.audio_path,
                speed=1.0,
                resume=False,
                limit=seconds,
                loops=math.ceil(seconds / per_loop),
            ),
        )
        for sid in sids
    ]
    stop, answers = threading.Event(), []
    texts = [q.text for q in media.questions if q.image_from is None]
    asker = threading.Thread(target=_asker, args=(run, sids, texts, ask_every_s, stop, answers), daemon=True)
    asker.start()
    total = streams * seconds
    with _progress() as progress:
        task = progress.add_task(
            f"{streams} streams at 1 fps with speech for {minutes:g} min", total=total, info=""
        )
        deadline = time.monotonic() + seconds + 120
        while time.monotonic() < deadline:
            got = run.wait_notes(sids, total, 5.0, producers=boxes)
            mb = rss.samples[-1] if rss.samples else 0
            progress.update(task, completed=got, info=f"RSS {mb:.0f} MB, {len(answers)} answers")
            if got >= total:
                break
    stop.set()
    asker.join(150)
    samples = rss.stop()
    for box in boxes:
        if "error" in box:
            raise BenchError(f"a producer failed: {box['error']!r}")

    notes = sorted((n for sid in sids for n in run.watcher.notes(sid)), key=lambda n: n.wall_us)
    speech = [s for sid in sids for s in run.watcher.speech_notes(sid) if s.text]
    lag = [(n.wall_us / 1e6 - t_start, n.read_s - n.wall_us / 1e6) for n in notes]
    third = seconds / 3
    first_lags = [v for t, v in lag if t < third]
    last_lags = [v for t, v in lag if t >= 2 * third]
    n3 = max(1, len(samples) // 3)
    first_rss, middle_rss, last_rss = samples[:n3], samples[n3 : 2 * n3] or samples[:n3], samples[-n3:]
    answered = [a for a in answers if a.get("ms") is not None]
    first_ms = [a["ms"] for a in answered if a["at_s"] - t_start < third]
    last_ms = [a["ms"] for a in answered if a["at_s"] - t_start >= 2 * third]
    result = {
        "streams": streams,
        "minutes": minutes,
        "frames": total,
        "noted": run.watcher.count(sids),
        "utterances_noted": len(speech),
        "questions": len(answers),
        "answered": len(answered),
        "lag_p95_first_third_s": _r(_pct(first_lags, 95), 3),
        "lag_p95_last_third_s": _r(_pct(last_lags, 95), 3),
        "lag_p50_s": _r(_pct([v for _, v in lag], 50), 3),
        "lag_max_s": _r(max((v for _, v in lag), default=None), 3),
        "rss_first_third_max_mb": _r(max(first_rss), 1) if samples else None,
        "rss_middle_third_max_mb": _r(max(middle_rss), 1) if samples else None,
        "rss_last_third_max_mb": _r(max(last_rss), 1) if samples else None,
        "rss_max_mb": _r(max(samples), 1) if samples else None,
        "answer_ms_p50_first_third": _r(_pct(first_ms, 50), 1),
        "answer_ms_p50_last_third": _r(_pct(last_ms, 50), 1),
        "answer_ms_p95": _r(_pct([a["ms"] for a in answered], 95), 1),
    }
    result["ratio_rss_last_vs_first"] = _r(max(last_rss) / max(first_rss), 3) if samples else None
    # the KV tiers fill up to their budgets over the first minutes; after that memory must be flat
    result["ratio_rss_last_vs_middle"] = _r(max(last_rss) / max(middle_rss), 3) if samples else None
    result["ratio_lag_p95_last_vs_first"] = _r(_pct(last_lags, 95) / _pct(first_lags, 95), 3)
    result["bounded"] = bool(
        result["noted"] >= total
        and len(answered) == len(answers)
        and (result["ratio_rss_last_vs_middle"] or 9) <= 1.05
        and (result["ratio_lag_p95_last_vs_first"] or 9) <= 1.5
    )
    result["kv_mb_by_tier"] = _kv_by_tier(run, sids)
    _plot(samples, lag, answered, t_start, result)
    result["series"] = {"rss_mb": [_r(x, 1) for x in samples], "answers": answers}
    return result


def _kv_by_tier(run: Run, sids: list[str]) -> dict[str, float]:
    """MB of the streams' KV blocks per tier, from their last memory manifests (written at each
    answer): what the pipeline's KV store holds in process (gpu = device tier, cpu = host tier)
    and what is only in the object store."""
    from streamvqa import connect
    from streamvqa.schemas import MemoryManifest, decode
    from streamvqa.storage.keys import stream_prefix

    objects = connect.object_store(run.settings, run.endpoints)
    out: dict[str, float] = {}
    for sid in sids:
        try:
            manifest = decode(objects.get(f"{stream_prefix(sid)}memory/manifest"), MemoryManifest)
        except Exception:  # no answer yet for this stream
            continue
        for b in manifest.kv_blocks:
            out[b.tier] = out.get(b.tier, 0.0) + b.nbytes / 2**20
    return {k: _r(v, 1) for k, v in sorted(out.items())}


def _plot(
    samples: list[float], lag: list[tuple[float, float]], answered: list[dict], t_start: float, result: dict
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    axes[0].plot([i / 60 for i in range(len(samples))], samples, lw=1)
    axes[0].set_ylabel("pipeline RSS (MB)")
    axes[0].set_ylim(0, max(samples, default=1) * 1.15)
    axes[1].scatter([t / 60 for t, _ in lag], [v for _, v in lag], s=2, alpha=0.4)
    axes[1].set_ylabel("note lag (s)")
    axes[2].scatter([(a["at_s"] - t_start) / 60 for a in answered], [a["ms"] / 1000 for a in answered], s=10)
    axes[2].set_ylabel("answer latency (s)")
    axes[2].set_xlabel("minutes into the run")
    fig.suptitle(
        f"soak: {result['streams']} streams at 1 fps with speech, {result['minutes']:g} min "
        f"(RSS last/middle third {result['ratio_rss_last_vs_middle']}, "
        f"lag p95 {result['ratio_lag_p95_last_vs_first']})"
    )
    fig.tight_layout()
    OUT.mkdir(exist_ok=True)
    fig.savefig(OUT / "soak.png", dpi=110)
    plt.close(fig)


def main(quick: bool = False, streams: int | None = None, minutes: float | None = None) -> dict:
    import platform

    import torch

    p = dict(QUICK if quick else FULL)
    p["streams"] = streams or p["streams"]
    p["minutes"] = minutes or p["minutes"]
    results: dict = {
        "params": p,
        "machine": {
            "node": platform.node(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
        },
    }
    t0 = time.perf_counter()
    with live_pipeline("svqa-soak-", results) as (run, media):
        results["soak"] = soak(run, media, p["streams"], p["minutes"], p["ask_every_s"])
    results["total_s"] = _r(time.perf_counter() - t0, 1)
    OUT.mkdir(exist_ok=True)
    (OUT / "soak.json").write_text(json.dumps(results, indent=2))
    _print(results["soak"])
    return results


def _print(s: dict) -> None:
    from rich.table import Table

    table = Table(title=f"soak: {s['streams']} streams at 1 fps with speech, {s['minutes']:g} min")
    for column in ("figure", "first third", "last third", "ratio"):
        table.add_column(column)
    table.add_row(
        "pipeline RSS max (MB)",
        f"{s['rss_first_third_max_mb']}",
        f"{s['rss_last_third_max_mb']}",
        f"{s['ratio_rss_last_vs_first']}",
    )
    table.add_row(
        "  middle third -> last third",
        f"{s['rss_middle_third_max_mb']}",
        f"{s['rss_last_third_max_mb']}",
        f"{s['ratio_rss_last_vs_middle']}",
    )
    table.add_row(
        "note lag p95 (s)",
        f"{s['lag_p95_first_third_s']}",
        f"{s['lag_p95_last_third_s']}",
        f"{s['ratio_lag_p95_last_vs_first']}",
    )
    table.add_row(
        "answer latency p50 (ms)", f"{s['answer_ms_p50_first_third']}", f"{s['answer_ms_p50_last_third']}", ""
    )
    table.add_row("frames noted / sent", f"{s['noted']} / {s['frames']}", "", "")
    table.add_row("questions answered / asked", f"{s['answered']} / {s['questions']}", "", "")
    table.add_row("utterances transcribed", f"{s['utterances_noted']}", "", "")
    table.add_row("KV blocks MB by tier at the end", f"{s['kv_mb_by_tier']}", "", "")
    table.add_row("bounded", "yes" if s["bounded"] else "NO", "", "")
    console.print(table)
    console.print(f"wrote {OUT / 'soak.json'} and {OUT / 'soak.png'}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--streams", type=int)
    parser.add_argument("--minutes", type=float)
    args = parser.parse_args()
    main(quick=args.quick, streams=args.streams, minutes=args.minutes)
