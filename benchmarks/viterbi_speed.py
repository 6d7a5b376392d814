"""CPU Viterbi speed: the torch reference against the C++ search, `encode` on the same tiles.

Tail-biting paths of Gaussian 256-weight tiles at L=12 hyb K=2 V=2 (the CPU default) and L=16 hyb
(the GPU default), encoded by `encode(kernel=False)` (torch) and `encode(kernel="cpu")` (C++) in one
run: warm-up first, then the median of --rounds. Reports seconds per 1,000 tiles, their ratio, the
projection to one SmolLM2-135M decoder layer (13,824 tiles) and the fraction of tiles whose paths
are identical (the rest are near-ties of equal error, see trellis_kernels/viterbi_cpu.py). Results
go to benchmarks/results/viterbi_speed.json.

    .venv/bin/python benchmarks/viterbi_speed.py [--tiles N] [--tiles-l16 N] [--rounds R]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from trellis_runtime.codes import state_values
from trellis_runtime.trellis import TrellisSpec
from trellis_runtime.viterbi import cpu_search_unavailable_reason, encode

RESULTS = Path(__file__).parent / "results" / "viterbi_speed.json"
# q, k, v, o, gate, up, down of a SmolLM2-135M decoder layer, in 16x16 tiles.
SMOLLM2_LAYER_TILES = (576 * 576 * 2 + 192 * 576 * 2 + 1536 * 576 * 3) // 256


def inputs(spec: TrellisSpec, tiles: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    table = torch.randn(512, 2, generator=gen).half()  # a unit-variance hyb table
    return torch.randn(tiles, 256, generator=gen), state_values(spec, table)


def timed(x: torch.Tensor, values: torch.Tensor, spec: TrellisSpec, kernel: bool | str,
          rounds: int) -> tuple[float, torch.Tensor]:
    """Median seconds of `rounds` encodes after one warm-up on a few tiles, and the paths."""
    encode(x[:4], values, spec, kernel=kernel)
    seconds, paths = [], None
    for _ in range(rounds):
        start = time.perf_counter()
        paths = encode(x, values, spec, kernel=kernel)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), paths


def measure(spec: TrellisSpec, tiles: int, rounds: int) -> dict:
    x, values = inputs(spec, tiles)
    torch_s, torch_paths = timed(x, values, spec, False, rounds)
    cpp_s, cpp_paths = timed(x, values, spec, "cpu", rounds)
    row = {"spec": str(spec), "tiles": tiles,
           "torch_per_1k_tiles_s": torch_s * 1000 / tiles,
           "cpp_per_1k_tiles_s": cpp_s * 1000 / tiles,
           "speedup": torch_s / cpp_s,
           "smollm2_layer_torch_s": torch_s * SMOLLM2_LAYER_TILES / tiles,
           "smollm2_layer_cpp_s": cpp_s * SMOLLM2_LAYER_TILES / tiles,
           "identical_paths": (torch_paths == cpp_paths).all(dim=1).float().mean().item()}
    print(f"{spec} {tiles} tiles: torch {row['torch_per_1k_tiles_s']:.2f} s, C++ "
          f"{row['cpp_per_1k_tiles_s']:.2f} s per 1k tiles ({row['speedup']:.1f}x); identical "
          f"paths {row['identical_paths']:.4f}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiles", type=int, default=512, help="tiles at L=12")
    parser.add_argument("--tiles-l16", type=int, default=64, help="tiles at L=16")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if (reason := cpu_search_unavailable_reason()) is not None:
        raise SystemExit(f"the C++ Viterbi search is unavailable here: {reason}")
    rows = [measure(TrellisSpec(12, 2, 2, "hyb"), args.tiles, args.rounds),
            measure(TrellisSpec(16, 2, 2, "hyb"), args.tiles_l16, args.rounds)]
    result = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "rounds": args.rounds, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
