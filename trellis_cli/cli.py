"""The `trellis` command. Heavy modules are imported inside the subcommand that needs them."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from trellis_cli import bench_commands, offline_commands, serve_commands
from trellis_runtime.errors import TrellisError


class CommandParser(argparse.ArgumentParser):
    """A parser whose flags may be added on first use, by `arguments(parser)`.

    quantize's and qat's flags come from option types in the training code, and serve's from the
    server's settings: adding them only when that command parses or prints its help keeps training
    code out of `trellis serve` and the other commands' start-up light.
    """

    def __init__(self, *args, arguments: Callable[[argparse.ArgumentParser], None] | None = None,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._pending_arguments = arguments

    def _add_pending_arguments(self) -> None:
        if self._pending_arguments is not None:
            arguments, self._pending_arguments = self._pending_arguments, None
            arguments(self)

    def parse_known_args(self, args=None, namespace=None):
        self._add_pending_arguments()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._add_pending_arguments()
        return super().format_help()


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="trellis", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)  # CommandParsers, like parser
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
    except KeyboardInterrupt as interrupt:  # its message, if any, says how to resume
        print(f"trellis: interrupted{'; ' if str(interrupt) else ''}{interrupt}", file=sys.stderr)
        return 130
