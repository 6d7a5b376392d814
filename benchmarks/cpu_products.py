"""The CPU products of a decode step, by code and row count, against the dense float32 copy.

Builds SmolLM2-135M's 210 quantized linears (30 layers of q, k, v, o, gate, up, down) with random
codes, L=12, K=2, for each code the C++ kernel decodes differently: `hyb` (V=2, a 16-lane gather
from the state table), `1mad` and `3inst` (V=1, computed in vector integer arithmetic, no table).
For each row count it times all 210 products from the codes and from the float32 copy that the
backend holds for larger batches, in interleaved rounds (medians of --runs), 2 threads. Thirty
distinct layers, so the float32 copy (424 MB) streams from memory as it does when serving.
Writes benchmarks/results/cpu_products.json.

    .venv/bin/python benchmarks/cpu_products.py [--rows 1 2 8 16] [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from trellis_cli.kernel_suite import random_weight
from trellis_runtime.backend_cpu import CpuBackend, cpu_kernels_loaded, kernels_unavailable_reason
from trellis_runtime.trellis import TrellisSpec

RESULTS = Path(__file__).parent / "results" / "cpu_products.json"
LAYER_SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
LAYERS = 30
SPECS = {"hyb": TrellisSpec(12, 2, 2, "hyb"), "1mad": TrellisSpec(12, 2, 1, "1mad"),
         "3inst": TrellisSpec(12, 2, 1, "3inst")}


def time_all(backends: list[CpuBackend], inputs: dict[int, torch.Tensor]) -> float:
    started = time.perf_counter()
    for backend in backends:
        backend(inputs[backend.in_features])
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 8, 16])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    if not cpu_kernels_loaded():
        raise SystemExit(f"the CPU kernels are unavailable: {kernels_unavailable_reason()}")
    torch.set_num_threads(2)
    shapes = LAYER_SHAPES * LAYERS
    weights = {name: [random_weight(spec, out, inp, seed=i) for i, (out, inp) in enumerate(shapes)]
               for name, spec in SPECS.items()}
    paths = {f"{name} codes": [CpuBackend(w, max_rows=10**6) for w in ws]
             for name, ws in weights.items()}
    paths["float32 copy"] = [CpuBackend(w, max_rows=0) for w in weights["hyb"]]
    rows_ms = {}
    for rows in args.rows:
        inputs = {features: torch.randn(rows, features) for features in (576, 1536)}
        for backends in paths.values():  # warm-up
            time_all(backends, inputs)
        samples = {name: [] for name in paths}
        for _ in range(args.runs):
            for name, backends in paths.items():
                samples[name].append(time_all(backends, inputs) * 1e3)
        rows_ms[rows] = {name: statistics.median(s) for name, s in samples.items()}
        print(f"{rows:>3} rows: " + ", ".join(f"{n} {ms:.1f} ms" for n, ms in rows_ms[rows].items()))
    record = {"date": time.strftime("%Y-%m-%d"),
              "what": "210 products of a SmolLM2-135M decode step, ms",
              "threads": 2, "runs": args.runs, "ms_by_rows": rows_ms}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
