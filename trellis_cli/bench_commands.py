"""`trellis bench codes` and `trellis bench kernels`: the encoder's MSE against its bound, and the
kernels against their references."""

from __future__ import annotations

import argparse
import json

from trellis_cli.flags import add_device_flag, add_spec_flags, require_device, spec_from_arguments
from trellis_runtime.trellis import MAX_STATE_BITS, TrellisSpec


def cmd_bench_codes(args: argparse.Namespace) -> int:
    device = require_device(args.device)
    from trellis_cli.code_bench import bench_codes

    # The full trellis and HYB on every device, unlike quantize's CPU defaults (trellis_cli.flags).
    spec = spec_from_arguments(args, MAX_STATE_BITS, TrellisSpec.code)
    result = bench_codes(spec, sequences=args.sequences, device=device)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{spec}: mse {result['mse']:.5f} (bound 4^-K = {result['bound']:.5f}, "
              f"ratio {result['mse'] / result['bound']:.3f}) at pre-scale {result['scale_ratio']}, "
              f"{result['sequences']} sequences of 256, {result['tiles_per_second']:.1f} tiles/s")
    return 0


def cmd_bench_kernels(args: argparse.Namespace) -> int:
    from trellis_cli.kernel_bench import bench_kernels

    return bench_kernels(json_output=args.json)


def add_commands(commands: argparse._SubParsersAction) -> None:
    bench = commands.add_parser("bench", help="benchmarks")
    bench_kinds = bench.add_subparsers(dest="kind", required=True)
    codes = bench_kinds.add_parser("codes", help="encoder MSE on Gaussian data vs the bound 4^-K")
    add_spec_flags(codes, state_bits_default=str(MAX_STATE_BITS), code_default=TrellisSpec.code)
    codes.add_argument("--sequences", type=int, default=64, help="Gaussian tiles of 256 to encode")
    codes.add_argument("--json", action="store_true", help="print one JSON line")
    add_device_flag(codes)
    codes.set_defaults(run=cmd_bench_codes)
    kernels = bench_kinds.add_parser(
        "kernels", help="kernel max relative errors vs their references; timings on a GPU")
    kernels.add_argument("--json", action="store_true", help="print one JSON line: a list of rows")
    kernels.set_defaults(run=cmd_bench_kernels)
