"""The `trellis` command. Heavy modules are imported inside the subcommand that needs them."""

from __future__ import annotations

import argparse
import sys

from trellis_cli import bench_commands, offline_commands, serve_commands
from trellis_cli.serve_commands import checkpoint_for  # noqa: F401  (benchmarks import it from here)
from trellis_runtime.errors import TrellisError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trellis", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    offline_commands.add_commands(commands)  # quantize, qat, eval ppl
    serve_commands.add_commands(commands)  # serve, generate
    bench_commands.add_commands(commands)  # bench codes, bench kernels
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except TrellisError as err:
        message = " ".join(str(err).split())
        print(f"trellis: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("trellis: interrupted", file=sys.stderr)
        return 130
