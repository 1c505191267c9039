"""The encoder on Ray Serve: frames/s with and without ``@serve.batch``, and the per-call overhead of
the remote model handler against the in-process one, in one run.

Setup: a private local Ray + Serve (:mod:`streamvqa.operators.serve.local`) with two apps of the
same stateless encoder (``tiny-test`` ViT: 2 blocks, width 32, 112 px input, 196 patches; frames
224 x 224 RGB, 150 KB each), one replica each with 1 CPU: ``bench-b16`` (``@serve.batch``
max_batch_size 16, 5 ms wait) and ``bench-b1`` (max_batch_size 1).

- Throughput: ``frames`` single-frame requests through a deployment handle, at most 32 in flight
  (as concurrent callers would), and all submitted at once (a flood: the router queues what is
  over ``max_ongoing_requests``), frames/s from first submit to last reply; and the in-process stage
  (1 torch thread, like a replica) on the same frames one by one and in batches of 16.
- Overhead: ``calls`` sequential single-frame calls through :class:`RemoteEncoderHandler`
  (``bench-b1``) and :class:`LocalEncoderHandler`; median latency of each, the difference (the
  per-call cost of going through Serve) and the ratio.

Run: ``python -m bench serve [--quick]`` or ``python bench/serve_bench.py``. Writes
bench/out/serve_bench.json. Tiny model on purpose: it measures the serving path, not the model.
"""

from __future__ import annotations

import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

OUT = Path(__file__).resolve().parent / "out"


def _throughput(handle, frames: np.ndarray, window: int | None = None, streams: int = 8) -> float:
    """Single-frame requests, at most ``window`` in flight (None: all submitted at once)."""
    from collections import deque

    window = window or len(frames)
    t0 = time.perf_counter()
    pending: deque = deque()
    for i in range(len(frames)):
        if len(pending) >= window:
            pending.popleft().result(timeout_s=300)
        pending.append(handle.encode.remote(f"bench-{i % streams}", frames[i : i + 1], None))
    while pending:
        pending.popleft().result(timeout_s=300)
    return len(frames) / (time.perf_counter() - t0)


def _median_ms(fn, calls: int) -> float:
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times)


def run(frames: int = 256, calls: int = 60, image_size: int = 112, keep_cluster: bool = False) -> dict:
    """Start a cluster, measure, stop it; returns (and prints) the figures."""
    from ray import serve

    from streamvqa.operators.serve import deployments, local
    from streamvqa.operators.serve.handlers import (
        FrameBatch,
        LocalEncoderHandler,
        RemoteEncoderHandler,
        ServeClientSettings,
    )
    from streamvqa.operators.serve.stages import EncoderStage, EncoderStageConfig

    config = EncoderStageConfig(image_size=image_size)
    batch = np.random.default_rng(0).integers(0, 256, (frames, 224, 224, 3), dtype=np.uint8)
    data_dir = Path(tempfile.mkdtemp(prefix="svqa-sb-"))
    results: dict = {
        "frames": frames,
        "calls": calls,
        "image_size": image_size,
        "machine": platform.machine(),
    }
    t_start = time.perf_counter()
    local.up(data_dir, num_cpus=2)
    try:
        local.connect(data_dir)
        local.start_serve()
        results["cluster_start_s"] = round(time.perf_counter() - t_start, 1)
        for name, size in (("bench-b16", 16), ("bench-b1", 1)):
            d = deployments.DeploySettings(num_cpus=1, max_batch_size=size, max_ongoing_requests=64)
            serve.run(
                deployments.EncoderDeployment.options(**d.options()).bind(config, size, 0.005),
                name=name,
                route_prefix=None,
            )
        results["deploy_s"] = round(time.perf_counter() - t_start - results["cluster_start_s"], 1)
        for name in ("bench-b16", "bench-b1"):
            handle = serve.get_app_handle(name)
            _throughput(handle, batch[:32])  # warm-up
            tag = name.removeprefix("bench-")
            results[f"serve_fps_{tag}"] = round(_throughput(handle, batch, window=32), 1)
            results[f"serve_fps_{tag}_flood"] = round(_throughput(handle, batch), 1)

        torch.set_num_threads(1)  # like a replica with num_cpus=1
        stage = EncoderStage(config)
        stage.encode("w", batch[:4])
        t0 = time.perf_counter()
        for i in range(len(batch)):
            stage.encode("s", batch[i : i + 1])
        results["local_fps_b1"] = round(len(batch) / (time.perf_counter() - t0), 1)
        t0 = time.perf_counter()
        for i in range(0, len(batch), 16):
            stage.encode("s", batch[i : i + 16])
        results["local_fps_b16"] = round(len(batch) / (time.perf_counter() - t0), 1)

        remote = RemoteEncoderHandler(
            ServeClientSettings(mode="remote", data_dir=str(data_dir), encoder_app="bench-b1")
        )
        local_h = LocalEncoderHandler(config)
        r_model, l_model = remote.load_model(), local_h.load_model()
        one = [FrameBatch("over", batch[:1])]
        for _ in range(5):
            remote.run_inference(one, r_model)
            local_h.run_inference(one, l_model)
        results["remote_call_ms"] = round(_median_ms(lambda: remote.run_inference(one, r_model), calls), 2)
        results["local_call_ms"] = round(_median_ms(lambda: local_h.run_inference(one, l_model), calls), 2)
    finally:
        if not keep_cluster:
            local.down(data_dir)
            shutil.rmtree(data_dir, ignore_errors=True)
    results["batching_speedup"] = round(results["serve_fps_b16"] / results["serve_fps_b1"], 2)
    results["remote_overhead_ms"] = round(results["remote_call_ms"] - results["local_call_ms"], 2)
    results["remote_vs_local_ratio"] = round(results["remote_call_ms"] / results["local_call_ms"], 1)
    results["total_s"] = round(time.perf_counter() - t_start, 1)
    OUT.mkdir(exist_ok=True)
    (OUT / "serve_bench.json").write_text(json.dumps(results, indent=2))
    print(
        f"encoder on Serve: {results['serve_fps_b16']} frames/s with @serve.batch(16), "
        f"{results['serve_fps_b1']} without ({results['batching_speedup']}x) with 32 calls in flight; "
        f"all {frames} submitted at once: {results['serve_fps_b16_flood']} vs {results['serve_fps_b1_flood']}; "
        f"in-process "
        f"{results['local_fps_b1']} frames/s one by one, {results['local_fps_b16']} in batches of 16\n"
        f"per call (1 frame, median of {calls}): remote handler {results['remote_call_ms']} ms, "
        f"in-process {results['local_call_ms']} ms: overhead {results['remote_overhead_ms']} ms "
        f"({results['remote_vs_local_ratio']}x)"
    )
    print(json.dumps(results))
    return results


def main(quick: bool = False) -> None:
    run(frames=96 if quick else 256, calls=20 if quick else 60)


if __name__ == "__main__":
    main()
