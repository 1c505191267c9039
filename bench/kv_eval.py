"""KV memory with SmolLM2-135M-Instruct on long text streams: retrieval vs StreamingLLM vs full context.

A stream of filler text (8k, 32k and 128k tokens) hides facts ("the pass key of the red door is
48213") at several depths. The KV memory prefills it chunk by chunk with at most ``window``
tokens in attention after the sink; blocks leaving the window go GPU/CPU tier -> SeaweedFS (S3)
of the embedded stack. Then each fact is asked for. Measured in one run:

- accuracy with ReKV retrieval (sink + retrieved blocks + window: at most ~2k tokens in
  attention), with the StreamingLLM baseline (sink + window only), and with the full context
  where the model's 8k positions allow it;
- time to first token of a question, against re-prefilling the whole stream;
- process RSS over the stream.

Run: python -m bench kv [--quick]      (figures: bench/RESULTS.md; plot: bench/out/kv_eval.png)
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from streamvqa import connect
from streamvqa.settings import Settings

OUT = Path(__file__).parent / "out"
console = Console()

FILLER = [
    "The grass is green and the sky is blue.",
    "A light wind moves through the trees along the river.",
    "The sun is yellow and the clouds drift slowly to the east.",
    "Somewhere a dog barks, and then the street is quiet again.",
    "The market opens early and closes when the bread is gone.",
    "Rain is expected in the evening, followed by a clear night.",
    "Children walk to school past the old stone bridge.",
    "The library keeps its doors open until late on Thursdays.",
    "A train passes in the distance, right on time as usual.",
    "The garden has roses, tulips and a small lemon tree.",
    "Fishermen return in the afternoon with their nets.",
    "The museum shows paintings of ships and harbours.",
    "Bicycles lean against the wall of the bakery.",
    "The mountain path is steep but the view is worth it.",
    "In autumn the leaves turn red and orange and fall.",
    "The town square has a fountain and a clock tower.",
    "Coffee is served in small cups at the corner cafe.",
    "The lake is calm in the morning and windy after noon.",
    "Snow covers the hills for most of the winter.",
    "The bus stops at every village along the coast road.",
]
SYSTEM = (
    "There is important information hidden inside a lot of irrelevant text. Find it and memorise it. "
    "I will quiz you about the important information there."
)
FACTS = [  # (fact template, question, values): distinct kinds, so a small model cannot mix them up
    (
        "The pass key is {v}. Remember it. {v} is the pass key.",
        "What is the pass key?",
        [str(n) for n in range(31415, 99999, 7919)],
    ),
    (
        "The captain of the ship is named {v}. Her name is {v}.",
        "What is the name of the captain of the ship?",
        ["Marlowe", "Quintana", "Okonkwo", "Lindqvist", "Castellanos", "Abernathy", "Nakamura"],
    ),
    (
        "The secret meeting will take place in {v}. The city is {v}.",
        "In which city will the secret meeting take place?",
        ["Valparaiso", "Trondheim", "Winnipeg", "Ljubljana", "Cartagena", "Tbilisi"],
    ),
]


@dataclass(frozen=True)
class Needle:
    depth: float
    fact_text: str
    question: str
    key: str

    @property
    def fact(self) -> str:
        return f" {self.fact_text} "


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def make_stream(tokenizer, total_tokens: int, needles: list[Needle], chunk_tokens: int, seed: int):
    """Chunks of about ``chunk_tokens`` tokens (sentence boundaries) with needles at their depths."""
    rng = random.Random(seed)
    chunks, current, n_current, total = [], [], 0, 0
    pending = sorted(needles, key=lambda n: n.depth)
    while total < total_tokens:
        if pending and total >= pending[0].depth * total_tokens:
            text = pending.pop(0).fact
        else:
            text = " " + rng.choice(FILLER)
        n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if current and n_current + n > chunk_tokens:  # chunks fit one block: no remainder blocks
            chunks.append("".join(current))
            current, n_current = [], 0
        current.append(text)
        n_current += n
        total += n
    if current:
        chunks.append("".join(current))
    return chunks


def correct(answer: str, needle: Needle) -> bool:
    return needle.key.lower() in answer.lower()


def run_length(
    mem,
    mem_best,
    mem_recompute,
    mem_rekv,
    mem_raw,
    mem_baseline,
    adapter,
    tokenizer,
    length: int,
    depths,
    seed: int,
    progress,
    bar,
    single_fact: bool = True,
) -> dict:
    """One stream per depth holding one fact (``single_fact``), or one stream holding every fact."""
    rng = random.Random(seed)
    needles = []
    for depth, (template, question, values) in zip(depths, rng.sample(FACTS, len(depths)), strict=True):
        value = rng.choice(values)
        needles.append(Needle(depth, template.format(v=value), question, value))
    groups = [[n] for n in needles] if single_fact else [needles]
    rows, streams = [], []
    for g, group in enumerate(groups):
        chunks = make_stream(tokenizer, length, group, mem.config.block_tokens, seed + g)
        state = mem.open(f"kv-eval-{length}-{seed}-{g}", SYSTEM)
        rss = [(0, rss_mb())]
        tokens = 0
        t0 = time.perf_counter()
        for i, chunk in enumerate(chunks):
            mem.prefill_text(state, chunk, i * 1_000_000, (i + 1) * 1_000_000 - 1)
            tokens += len(tokenizer(chunk, add_special_tokens=False)["input_ids"])
            if i % 8 == 0:
                rss.append((tokens, rss_mb()))
            progress.update(bar, advance=1)
        prefill_s = time.perf_counter() - t0
        mem.store.flush()
        rss.append((tokens, rss_mb()))
        streams.append(
            {"tokens": tokens, "prefill_s": prefill_s, "rss": rss, "blocks_spilled": len(state.index)}
        )
        for needle in group:
            rows.append(
                _ask(
                    mem,
                    mem_best,
                    mem_recompute,
                    mem_rekv,
                    mem_raw,
                    mem_baseline,
                    adapter,
                    tokenizer,
                    state,
                    chunks,
                    tokens,
                    needle,
                )
            )
    tokens = streams[0]["tokens"]
    prefill_s = sum(st["prefill_s"] for st in streams) / len(streams)
    return {
        "length": length,
        "tokens": tokens,
        "single_fact": single_fact,
        "blocks_spilled": streams[0]["blocks_spilled"],
        "prefill_s": prefill_s,  # mean over the streams of this length: what re-prefilling costs
        "prefill_tok_s": sum(st["tokens"] for st in streams) / sum(st["prefill_s"] for st in streams),
        "rss": streams[-1]["rss"],  # the last stream of the length: the process has seen all before it
        "streams": streams,
        "rows": rows,
    }


def _ask(
    mem,
    mem_best,
    mem_recompute,
    mem_rekv,
    mem_raw,
    mem_baseline,
    adapter,
    tokenizer,
    state,
    chunks,
    tokens,
    needle,
) -> dict:
    retrieved = mem.answer(state, needle.question, max_new_tokens=24)
    best = mem_best.answer(state, needle.question, max_new_tokens=24)
    recomputed = mem_recompute.answer(state, needle.question, max_new_tokens=24)
    rekv = mem_rekv.answer(state, needle.question, max_new_tokens=24)
    raw = mem_raw.answer(state, needle.question, max_new_tokens=24)
    streaming = mem_baseline.answer(state, needle.question, max_new_tokens=24)
    needle_chunk = next(i for i, c in enumerate(chunks) if needle.key in c)
    evidence_s = [round(e.start_us / 1e6) for e in retrieved.evidence]
    row = {
        "chunks": len(chunks),
        "depth": needle.depth,
        "key": needle.key,
        "retrieval": correct(retrieved.text, needle),
        "retrieval_answer": retrieved.text,
        "best_last": correct(best.text, needle),
        "best_last_answer": best.text,
        "best_last_ttft_ms": best.timings_ms["ttft"],
        "recompute": correct(recomputed.text, needle),
        "recompute_answer": recomputed.text,
        "recompute_ttft_ms": recomputed.timings_ms["ttft"],
        "rekv": correct(rekv.text, needle),
        "rekv_answer": rekv.text,
        "rekv_evidence_s": [round(e.start_us / 1e6) for e in rekv.evidence],
        "rekv_raw": correct(raw.text, needle),
        "rekv_raw_evidence_s": [round(e.start_us / 1e6) for e in raw.evidence],
        "streamingllm": correct(streaming.text, needle),
        "streamingllm_answer": streaming.text,
        "ttft_ms": retrieved.timings_ms["ttft"],
        "timings_ms": retrieved.timings_ms,
        "evidence_s": evidence_s,
        "needle_chunk": needle_chunk,
        # Retrieval quality apart from the model's reading: the fact's chunk was in the context.
        "needle_in_context": needle_chunk in evidence_s or needle_chunk >= len(chunks) - window_chunks(state),
        "rekv_needle_in_context": needle_chunk in [round(e.start_us / 1e6) for e in rekv.evidence]
        or needle_chunk >= len(chunks) - window_chunks(state),
        "context_tokens": retrieved.context_tokens,
        "tiers": sorted({e.tier for e in retrieved.evidence}),
    }
    if tokens + 64 < adapter.max_positions:
        row.update(full_context(adapter, tokenizer, mem, chunks, needle))
    return row


def window_chunks(state) -> int:
    return len({b.start_us for b in state.window})


def full_context(adapter, tokenizer, mem, chunks, needle) -> dict:
    text = mem.prompt.sink(SYSTEM) + "".join(chunks) + mem.prompt.question(needle.question)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    t0 = time.perf_counter()
    out = adapter.forward(adapter.embed(ids), torch.arange(len(ids)), logits="last")
    ttft = (time.perf_counter() - t0) * 1000
    token_ids, cache, logits, pos = [], out.cache, out.logits, len(ids)
    eos = mem._eos_ids()
    for _ in range(24):
        token = int(logits[-1].argmax())
        if token in eos:
            break
        token_ids.append(token)
        nxt = adapter.forward(
            adapter.embed(torch.tensor([token])),
            torch.tensor([pos]),
            logits="last",
            cache=cache,
            return_kv=False,
        )
        logits, cache, pos = nxt.logits, nxt.cache, pos + 1
    answer = tokenizer.decode(token_ids, skip_special_tokens=True)
    return {"full": correct(answer, needle), "full_answer": answer, "full_ttft_ms": ttft}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    runs = results["runs"]
    labels = [f"{r['length'] // 1000}k" for r in runs]
    x = range(len(runs))
    methods = (
        (-0.48, "best_last", "retrieval, re-prefilled, best block last"),
        (-0.36, "recompute", "retrieval, re-prefilled in time order"),
        (-0.24, "retrieval", "centred ReKV + MiniLM (stored KV)"),
        (-0.12, "rekv", "centred ReKV"),
        (0.0, "rekv_raw", "ReKV (paper's query)"),
        (0.12, "streamingllm", "StreamingLLM sinks+window"),
        (0.24, "full", "full context"),
        (0.36, "needle_in_context", "fact retrieved (hit rate)"),
    )
    for offset, method, name in methods:
        acc = []
        for r in runs:
            vals = [row[method] for row in r["rows"] if method in row]
            acc.append(100 * sum(vals) / len(vals) if vals else float("nan"))
        axes[0].bar([i + offset for i in x], acc, width=0.11, label=name)
    axes[0].set_xticks(list(x), labels)
    axes[0].set_ylabel("accuracy (%)")
    axes[0].set_title("pass keys found")
    axes[0].legend(fontsize=8)
    ttft = [sum(row["ttft_ms"] for row in r["rows"]) / len(r["rows"]) / 1000 for r in runs]
    reprefill = [r["prefill_s"] for r in runs]
    axes[1].plot(labels, ttft, "o-", label="time to first token (memory)")
    axes[1].plot(labels, reprefill, "s--", label="re-prefill the whole stream")
    axes[1].set_yscale("log")
    axes[1].set_ylabel("seconds")
    axes[1].set_title("question latency")
    axes[1].legend(fontsize=8)
    for r, label in zip(runs, labels, strict=True):
        xs, ys = zip(*r["rss"], strict=True)
        axes[2].plot([v / 1000 for v in xs], ys, label=label)
    axes[2].set_xlabel("stream tokens (k)")
    axes[2].set_ylabel("process RSS (MB)")
    axes[2].set_title("memory over the stream")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(quick: bool = False) -> dict:
    from streamvqa.infra.local.stack import LocalStack
    from streamvqa.operators.kv import ObjectTier, TieredStore, cpu_tier, gpu_tier
    from streamvqa.operators.lm.features import MiniLMEmbedder
    from streamvqa.operators.lm.memory import KVMemory, KVMemoryConfig
    from streamvqa.operators.lm.model import DecoderAdapter
    from streamvqa.operators.lm.smollm2 import MODEL_ID, load_smollm2

    torch.set_num_threads(os.cpu_count() or 1)
    lengths = [2_000, 8_000] if quick else [8_000, 32_000, 128_000]
    depths = [0.1, 0.5, 0.9]
    window, block, retrieve = 512, 128, 512
    model, tokenizer = load_smollm2()
    adapter = DecoderAdapter(model, model_id=MODEL_ID)
    results: dict = {
        "machine": f"{platform.node()} {os.cpu_count()} cores, torch {torch.__version__}, float32",
        "config": {"window": window, "block": block, "retrieve": retrieve, "depths": depths},
        "runs": [],
    }
    with tempfile.TemporaryDirectory(prefix="svqa-kv-") as tmp:
        settings = Settings(data_dir=Path(tmp))
        stack = LocalStack(settings)
        stack.up()
        try:
            endpoints = connect.resolve_endpoints(settings)
            object_store = connect.object_store(settings, endpoints)
            store = TieredStore(
                [(gpu_tier(), 24 << 20), (cpu_tier(), 48 << 20), (ObjectTier(object_store), None)],
                backpressure_timeout_s=600,
            )
            cfg = KVMemoryConfig(window_tokens=window, block_tokens=block, retrieve_tokens=retrieve)
            mem = KVMemory(adapter, store, tokenizer=tokenizer, config=cfg, embedder=MiniLMEmbedder())
            rekv = KVMemory(adapter, store, tokenizer=tokenizer, config=cfg)
            re_cfg = KVMemoryConfig(
                window_tokens=window, block_tokens=block, retrieve_tokens=retrieve, answer_context="recompute"
            )
            recompute = KVMemory(adapter, store, tokenizer=tokenizer, config=re_cfg, embedder=mem.embedder)
            best_cfg = dataclasses.replace(re_cfg, context_order="best_last")
            best = KVMemory(adapter, store, tokenizer=tokenizer, config=best_cfg, embedder=mem.embedder)
            raw_cfg = KVMemoryConfig(
                window_tokens=window, block_tokens=block, retrieve_tokens=retrieve, center_query=False
            )
            raw = KVMemory(adapter, store, tokenizer=tokenizer, config=raw_cfg)
            base_cfg = KVMemoryConfig(window_tokens=window, block_tokens=block, retrieve_tokens=0)
            baseline = KVMemory(adapter, store, tokenizer=tokenizer, config=base_cfg)
            with Progress(console=console) as progress:
                for length in lengths:
                    bar = progress.add_task(
                        f"stream {length // 1000}k tokens", total=len(depths) * (length // 110 + 1)
                    )
                    run = run_length(
                        mem,
                        best,
                        recompute,
                        rekv,
                        raw,
                        baseline,
                        adapter,
                        tokenizer,
                        length,
                        depths,
                        7,
                        progress,
                        bar,
                    )
                    results["runs"].append(run)
                    OUT.mkdir(exist_ok=True)  # after each length: a long run keeps what it measured
                    (OUT / "kv_eval.json").write_text(json.dumps(results, indent=2, default=str))
                    progress.update(bar, completed=progress.tasks[bar].total)
            results["store"] = store.stats()
            store.close()
        finally:
            stack.down()
    _report(results)
    OUT.mkdir(exist_ok=True)
    (OUT / "kv_eval.json").write_text(json.dumps(results, indent=2, default=str))
    plot(results, OUT / "kv_eval.png")
    (OUT / "kv_eval.md").write_text(markdown(results) + "\n")
    return results


def _report(results: dict) -> None:
    table = Table(title="KV memory, SmolLM2-135M-Instruct: pass keys in long streams")
    for col in (
        "length",
        "depth",
        "best last",
        "recompute",
        "ReKV+MiniLM",
        "ReKV",
        "ReKV raw",
        "StreamingLLM",
        "full",
        "TTFT ms",
        "evidence s (needle s)",
    ):
        table.add_column(col)
    for run in results["runs"]:
        for row in run["rows"]:
            table.add_row(
                f"{run['tokens']}",
                f"{row['depth']:.1f}",
                "yes" if row["best_last"] else f"no: {row['best_last_answer'][:30]!r}",
                "yes" if row["recompute"] else f"no: {row['recompute_answer'][:30]!r}",
                "yes" if row["retrieval"] else "no",
                "yes" if row["rekv"] else "no",
                "yes" if row["rekv_raw"] else "no",
                "yes" if row["streamingllm"] else "no",
                {True: "yes", False: "no"}.get(row.get("full"), "n/a"),
                f"{row['ttft_ms']:.0f}",
                f"{row['evidence_s']} ({row['needle_chunk']})",
            )
    console.print(table)
    summary = Table(title="per length")
    for col in (
        "tokens",
        "prefill tok/s",
        "re-prefill s",
        "mean TTFT s",
        "TTFT / TTFT(first)",
        "RSS MB first->last",
    ):
        summary.add_column(col)
    first_ttft = None
    for run in results["runs"]:
        ttft = sum(r["ttft_ms"] for r in run["rows"]) / len(run["rows"]) / 1000
        first_ttft = first_ttft or ttft
        summary.add_row(
            str(run["tokens"]),
            f"{run['prefill_tok_s']:.0f}",
            f"{run['prefill_s']:.1f}",
            f"{ttft:.2f}",
            f"{ttft / first_ttft:.2f}",
            f"{run['rss'][1][1]:.0f} -> {run['rss'][-1][1]:.0f}",
        )
    console.print(summary)


METHODS = (
    ("best_last", "retrieval, context re-prefilled, best block last"),
    ("recompute", "retrieval, context re-prefilled in time order"),
    ("retrieval", "retrieval, stored KV (centred ReKV + MiniLM)"),
    ("rekv", "centred ReKV, stored KV"),
    ("rekv_raw", "ReKV with the paper's query, stored KV"),
    ("streamingllm", "StreamingLLM sinks + window"),
    ("full", "full context (fits 8k only)"),
    ("needle_in_context", "retrieval hit (centred ReKV + MiniLM): the fact's block in the context"),
    ("rekv_needle_in_context", "retrieval hit (centred ReKV alone)"),
)


def markdown(results: dict) -> str:
    """The tables of bench/RESULTS.md, from a run's JSON."""
    runs = results["runs"]
    lines = [
        "| method | " + " | ".join(f"{r['tokens'] // 1000}k" for r in runs) + " |",
        "|---|" + "---|" * len(runs),
    ]
    for key, name in METHODS:
        cells = []
        for r in runs:
            vals = [row[key] for row in r["rows"] if row.get(key) is not None]
            cells.append(f"{sum(vals)}/{len(vals)}" if vals else "n/a")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| stream | prefill tok/s | re-prefill s | TTFT s, stored KV (mean) | TTFT s, recompute, best last (mean) "
        "| TTFT / TTFT at 8k (stored, recompute) | RSS MB at 8k tokens -> end (max) |",
        "|---|---|---|---|---|---|---|",
    ]
    first = None
    for r in runs:
        ttft = sum(row["ttft_ms"] for row in r["rows"]) / len(r["rows"]) / 1000
        ttft_re = sum(row["best_last_ttft_ms"] for row in r["rows"]) / len(r["rows"]) / 1000
        first = first or (ttft, ttft_re)
        rss = r["rss"]
        at8 = next((v for t, v in rss if t >= 8000), rss[-1][1])
        peak = max(v for _, v in rss)
        lines.append(
            f"| {r['tokens']} | {r['prefill_tok_s']:.0f} | {r['prefill_s']:.1f} | {ttft:.2f} | {ttft_re:.2f} | "
            f"{ttft / first[0]:.2f}, {ttft_re / first[1]:.2f} | {at8:.0f} -> {rss[-1][1]:.0f} ({peak:.0f}, "
            f"{100 * (peak / at8 - 1):+.1f} %) |"
        )
    return "\n".join(lines)
