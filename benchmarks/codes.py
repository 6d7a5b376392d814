"""Code distortion and the state-bits trade-off, written to benchmarks/results/codes.json.

1. MSE on i.i.d. Gaussian tiles at L=16 for each code and K=2,3,4, next to the bound 4^-K and the
   values QTIP-class encoders reach (qtip_spec.md section 2.5).
2. For the CPU default code (hyb, K=2): MSE and encoder speed for L = 8..16, and the projected
   encoder time for the 414,720 tiles of SmolLM2-135M on this machine.

    .venv/bin/python benchmarks/codes.py [--sequences 64]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from trellis_cli.code_bench import SCALE_RATIOS, bench_codes
from trellis_runtime.trellis import spec_for

RESULTS = Path(__file__).parent / "results" / "codes.json"
SMOLLM2_TILES = 414_720
# Reference MSEs of a bitshift trellis at L=16 (tail-biting, 256-weight tiles) from the spec notes.
REFERENCE = {("1mad", 2): 0.0692, ("3inst", 2): 0.0690, ("hyb", 2): 0.0707,
             ("1mad", 3): 0.0173, ("3inst", 3): 0.0176, ("hyb", 3): 0.0189,
             ("1mad", 4): 0.00449, ("hyb", 4): 0.00556}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sequences", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    distortion = []
    print(f"{'code':<7}{'K':>3}{'mse':>10}{'bound':>10}{'reference':>11}{'diff':>8}")
    for bits in (2, 3, 4):
        for code in ("1mad", "3inst", "hyb"):
            row = bench_codes(spec_for(code, bits=bits, state_bits=16), sequences=args.sequences)
            reference = REFERENCE.get((code, bits))
            row["reference"] = reference
            distortion.append(row)
            diff = f"{(row['mse'] / reference - 1) * 100:+.1f}%" if reference else "-"
            print(f"{code:<7}{bits:>3}{row['mse']:>10.5f}{row['bound']:>10.5f}"
                  f"{reference if reference else '-':>11}{diff:>8}", flush=True)
    tradeoff = []
    print(f"\n{'L':>3}{'mse':>10}{'tiles/s':>10}{'SmolLM2 encoder min':>22}")
    for state_bits in range(8, 17):
        row = bench_codes(spec_for("hyb", bits=2, state_bits=state_bits), sequences=args.sequences)
        row["smollm2_encoder_minutes"] = SMOLLM2_TILES / row["tiles_per_second"] / 60
        tradeoff.append(row)
        print(f"{state_bits:>3}{row['mse']:>10.5f}{row['tiles_per_second']:>10.1f}"
              f"{row['smollm2_encoder_minutes']:>22.1f}", flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "sequences": args.sequences,
        "scale_ratios": SCALE_RATIOS, "distortion_l16": distortion, "hyb_k2_by_state_bits": tradeoff,
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
