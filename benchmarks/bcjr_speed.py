"""Soft-trellis (BCJR) speed: one training step's forward + backward over a layer's tiles.

CPU: L=12 hyb, tail-biting and free, the torch backend (the reference) and the C++ backend (what
QAT uses here) side by side on the same tiles: seconds per 1,000 tiles for each, their ratio, their
parity (max |diff| / max |ref| of the output and the input gradient) and the projection to one
SmolLM2-135M decoder layer (13,824 tiles) per training step; then the C++ backend's time against
its chunk size (tiles per call; qat/soft_trellis.py CPP_CHUNK_TILES is chosen from it).
CUDA: L=16 hyb, a whole SmolLM2-135M layer, the fused Triton kernels against the eager torch
backend on the same GPU (CUDA events), their ratio, and their parity (max |diff| / max |ref|).

Warm-up first, then the median of --rounds. Results go to benchmarks/results/bcjr_speed.json, one
section per device kind, so CPU and GPU numbers measured on different machines live side by side.

    .venv/bin/python benchmarks/bcjr_speed.py [--device cpu|cuda] [--tiles N] [--rounds R]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from qat.soft_trellis import soft_reconstruct
from trellis_cli.kernel_suite import max_rel_err
from trellis_runtime.codes import state_values
from trellis_runtime.trellis import TrellisSpec

RESULTS = Path(__file__).parent / "results" / "bcjr_speed.json"
# q, k, v, o, gate, up, down of a SmolLM2-135M decoder layer, in 16x16 tiles.
SMOLLM2_LAYER_TILES = (576 * 576 * 2 + 192 * 576 * 2 + 1536 * 576 * 3) // 256
TEMPERATURE = 0.1


def inputs(spec: TrellisSpec, tiles: int, device: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    table = torch.randn(512, 2, generator=gen).half()  # a unit-variance hyb table
    values = state_values(spec, table).to(device)
    x = torch.randn(tiles, 256, generator=gen).to(device)
    grad = torch.randn(tiles, 256, generator=gen).to(device)
    return x, values, grad


class Timer:
    """Wall clock on CPU, CUDA events on a GPU."""

    def __init__(self, device: str) -> None:
        self.cuda = device == "cuda"

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, a, b) -> float:
        if self.cuda:
            b.synchronize()
            return a.elapsed_time(b) / 1000
        return b - a


def step(x, values, grad, spec, boundary, backend, timer, chunk=None):
    """One forward + backward; returns (forward s, backward s, output, input gradient)."""
    xi = x.clone().requires_grad_()
    t0 = timer.mark()
    out = soft_reconstruct(xi, values, spec, TEMPERATURE, boundary, chunk, backend=backend)
    t1 = timer.mark()
    out.backward(grad)
    t2 = timer.mark()
    return timer.seconds(t0, t1), timer.seconds(t1, t2), out.detach(), xi.grad


def measure(spec, tiles, device, boundary, backend, rounds, chunk=None):
    x, values, grad = inputs(spec, tiles, device)
    timer = Timer(device)
    step(x[:8], values, grad[:8], spec, boundary, backend, timer)  # warm-up (kernel compile)
    runs = [step(x, values, grad, spec, boundary, backend, timer, chunk) for _ in range(rounds)]
    fwd = statistics.median(r[0] for r in runs)
    bwd = statistics.median(r[1] for r in runs)
    return {"forward_s": fwd, "backward_s": bwd, "step_s": fwd + bwd}, runs[-1][2:]


def cpu_row(spec, tiles, boundary, backend, rounds, chunk=None):
    row, result = measure(spec, tiles, "cpu", boundary, backend, rounds, chunk)
    row["per_1k_tiles_s"] = row["step_s"] * 1000 / tiles
    row["smollm2_layer_step_s"] = row["step_s"] * SMOLLM2_LAYER_TILES / tiles
    return row, result


def cpu_section(tiles: int, rounds: int) -> dict:
    spec = TrellisSpec(state_bits=12, bits=2, vec=2, code="hyb")
    rows = {}
    for boundary in ("tail_biting", "free"):
        row = {}
        for backend in ("torch", "cpp"):
            row[backend], result = cpu_row(spec, tiles, boundary, backend, rounds)
            print(f"cpu L=12 {boundary:<12} {backend:<5} {tiles} tiles: forward "
                  f"{row[backend]['forward_s']:.2f} s, backward {row[backend]['backward_s']:.2f} s;"
                  f" {row[backend]['per_1k_tiles_s']:.2f} s per 1k tiles, "
                  f"{row[backend]['smollm2_layer_step_s']:.1f} s per SmolLM2 layer step",
                  flush=True)
            if backend == "torch":
                reference = result
        row["speedup"] = row["torch"]["step_s"] / row["cpp"]["step_s"]
        row["parity_out"] = max_rel_err(result[0], reference[0])
        row["parity_dx"] = max_rel_err(result[1], reference[1])
        print(f"cpu L=12 {boundary:<12} C++ {row['speedup']:.1f}x faster; parity out "
              f"{row['parity_out']:.1e} dx {row['parity_dx']:.1e}", flush=True)
        rows[boundary] = row
    sweep = {}
    for chunk in sorted({64, 256, tiles}):
        chunk_row, _ = cpu_row(spec, tiles, "tail_biting", "cpp", rounds, chunk)
        sweep[str(chunk)] = chunk_row["per_1k_tiles_s"]
        print(f"cpu L=12 tail_biting cpp chunk {chunk}: {sweep[str(chunk)]:.2f} s per 1k tiles",
              flush=True)
    return {"spec": str(spec), "tiles": tiles, "threads": torch.get_num_threads(), **rows,
            "cpp_per_1k_tiles_s_by_chunk": sweep}


def cuda_section(tiles: int, rounds: int) -> dict:
    spec = TrellisSpec(state_bits=16, bits=2, vec=2, code="hyb")
    fused, (out_f, dx_f) = measure(spec, tiles, "cuda", "tail_biting", "triton", rounds)
    eager, (out_e, dx_e) = measure(spec, tiles, "cuda", "tail_biting", "torch", rounds)
    result = {
        "spec": str(spec), "tiles": tiles, "gpu": torch.cuda.get_device_name(),
        "fused": fused, "eager": eager, "speedup": eager["step_s"] / fused["step_s"],
        "parity_out": max_rel_err(out_f, out_e), "parity_dx": max_rel_err(dx_f, dx_e),
    }
    print(f"cuda L=16 tail_biting {tiles} tiles on {result['gpu']}: fused {fused['step_s']:.3f} s "
          f"(fwd {fused['forward_s']:.3f}), eager {eager['step_s']:.3f} s: "
          f"{result['speedup']:.2f}x; parity out {result['parity_out']:.1e} "
          f"dx {result['parity_dx']:.1e}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiles", type=int, default=None,
                        help="tiles per step (default: 1024 on CPU, one SmolLM2 layer on CUDA)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.device == "cuda":
        section = cuda_section(args.tiles or SMOLLM2_LAYER_TILES, args.rounds)
    else:
        section = cpu_section(args.tiles or 1024, args.rounds)
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    results[args.device] = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
                            "temperature": TEMPERATURE, **section}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
