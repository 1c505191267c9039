"""`make bench` / `python -m bench [name ...]`: run the benchmarks under bench/."""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS = {
    "stack": "bench.stack_throughput",
    "passthrough": "bench.kafka_passthrough",
    "curvature": "bench.curvature_eval",
    "stc": "bench.stc_eval",
    "kv": "bench.kv_eval",
    "serve": "bench.serve_bench",
    "pipeline": "bench.pipeline_bench",
    "stc-modes": "bench.stc_modes",
    "soak": "bench.soak",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "names", nargs="*", choices=[*BENCHMARKS, []], help="benchmarks to run (default: all)"
    )
    parser.add_argument("--quick", action="store_true", help="smaller volumes (smoke run)")
    args = parser.parse_args()
    for name in args.names or list(BENCHMARKS):
        importlib.import_module(BENCHMARKS[name]).main(quick=args.quick)


if __name__ == "__main__":
    main()
