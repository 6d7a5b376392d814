"""Kernel correctness and speed on a GPU, recorded in benchmarks/results/kernels_gpu.json.

    python benchmarks/kernels_gpu.py [--out FILE]

Run from the repository root on a CUDA machine; most of the run goes to compiling kernels and
building an 8B-shaped model, and each section's wall time is recorded in the results file
(`seconds`). Sections run in order: the correctness suite compiled for the GPU, then the timings
of trellis_cli/kernel_bench.py (copy bandwidth, GEMV on Llama-3-8B shapes at K=2,3,4 against
float16, large batches, Hadamard, Viterbi, end-to-end decode).
Each section is timed and guarded: a failure is recorded with its error and the next one runs, and
the results file is rewritten after every section, so a run cut short still leaves what it
measured. The file records the date, GPU, torch and triton versions.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, uninstalled

RESULTS = Path(__file__).resolve().parent / "results" / "kernels_gpu.json"


def environment(device: torch.device) -> dict:
    import subprocess

    import triton

    props = torch.cuda.get_device_properties(device)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=Path(__file__).parent).stdout.strip()
    except OSError:  # no git on the machine
        commit = ""
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": commit or None,
            "gpu": props.name, "multiprocessors": props.multi_processor_count,
            "l2_bytes": props.L2_cache_size, "memory_bytes": props.total_memory,
            "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__}


def gemv_configs(device: torch.device, timer, bandwidth: float) -> list[dict]:
    """The GEMV kernel alone over a few block shapes, K=2, to tune the defaults on this GPU; and,
    at the default shape, the same kernel with its table lookups sent to global memory (the
    earlier design), to measure what shared-memory lookups buy."""
    from trellis_cli.kernel_bench import weight_copies
    from trellis_kernels import matmul
    from trellis_kernels.hadamard import rotate_rows
    from trellis_runtime.trellis import TrellisSpec

    rows = []
    for shape in ((4096, 4096), (14336, 4096)):
        backends = weight_copies(TrellisSpec(16, 2, 2, "hyb"), shape, device, seed=2)
        packed = backends[0].codes.numel() * 4
        for batch, configs in ((1, [None, (128, 4, 8), (256, 4, 8), (512, 2, 8), (64, 8, 4),
                                    (128, 4, 4), (32, 16, 8)]),
                               (16, [None, (64, 4, 4), (32, 8, 4), (128, 4, 4), (64, 8, 4)])):
            x = torch.randn(batch, shape[1], device=device)
            rotated = rotate_rows(x, backends[0].input_signs, backends[0].small_in,
                                  torch.float32 if batch == 1 else torch.float16,
                                  norm=backends[0].rotation.norm)
            default = matmul.GEMV_BLOCKS["fma" if batch == 1 else "dot"]
            variants = [(blocks or default, "shared" if blocks is None else None)
                        for blocks in configs] + [(default, "global")]
            for (block_rows, block_tiles, warps), table in variants:
                seconds = timer(lambda i: matmul.gemv_partials(
                    rotated, backends[i].codes, backends[i].code, block_rows=block_rows,
                    block_tiles=block_tiles, num_warps=warps, shared_tables=table != "global"),
                    len(backends))
                label = f" table={table}" if table else ""
                rows.append({"kernel": "gemv_config",
                             "case": f"{shape[0]}x{shape[1]} K=2 rows={batch} "
                                     f"block_rows={block_rows} block_tiles={block_tiles} "
                                     f"warps={warps}{label}",
                             "kernel_us": seconds * 1e6,
                             "copy_fraction": packed / seconds / bandwidth})
    return rows


def hadamard_warps(device: torch.device, timer) -> list[dict]:
    """The rotation kernel's latency for one row at a few warp counts."""
    from trellis_kernels.hadamard import rotate_rows
    from trellis_runtime.hadamard import random_signs, rotation_plan, small_factor

    rows = []
    for n, warp_counts in ((4096, (2, 4, 8)), (14336, (4, 8, 16))):
        small, norm = small_factor(n, device), rotation_plan(n).norm
        signs = random_signs(n, 0).to(device)
        x = torch.randn(1, n, device=device)
        for warps in warp_counts:
            seconds = timer(lambda i: rotate_rows(x, signs, small, num_warps=warps, norm=norm), 32)
            rows.append({"kernel": "hadamard_warps", "case": f"n={n} rows=1 warps={warps}",
                         "kernel_us": seconds * 1e6})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS, help="results file (JSON)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("kernels_gpu: error: needs a CUDA device", file=sys.stderr)
        return 2
    from trellis_cli import kernel_bench as bench
    from trellis_cli.kernel_suite import run_suite

    device = torch.device("cuda")
    timer = bench.GraphTimer()
    record = {"environment": environment(device), "sections": {}}
    bandwidth = {}

    def copy() -> list[dict]:
        bandwidth["bytes_per_s"] = bench.copy_bandwidth(device, timer)
        return [{"kernel": "copy", "case": "device-to-device 2 GiB",
                 "GBps": bandwidth["bytes_per_s"] / 1e9}]

    sections = [
        ("suite", lambda: run_suite(device)),
        ("copy", copy),
        ("gemv", lambda: bench.gemv_rows(device, timer, bandwidth["bytes_per_s"])),
        ("gemv_configs", lambda: gemv_configs(device, timer, bandwidth["bytes_per_s"])),
        ("large_batch", lambda: bench.large_batch_rows(device, timer)),
        ("hadamard", lambda: bench.hadamard_rows(device, timer)),
        ("hadamard_warps", lambda: hadamard_warps(device, timer)),
        ("viterbi", lambda: bench.viterbi_rows(device)),
        ("e2e", lambda: bench.e2e_rows(device)),
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name, run in sections:
        start = time.perf_counter()
        try:
            section = {"rows": run()}
        except Exception as error:  # record it and go on: later sections may still work
            section = {"error": f"{type(error).__name__}: {error}",
                       "traceback": traceback.format_exc(limit=8)}
        section["seconds"] = round(time.perf_counter() - start, 1)
        record["sections"][name] = section
        args.out.write_text(json.dumps(record, indent=1) + "\n")
        print(f"== {name} ({section['seconds']} s)", flush=True)
        if "error" in section:
            print(section["traceback"], flush=True)
        for row in section.get("rows", []):
            print(bench.format_row(row), flush=True)
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
