"""Compile every Triton kernel launch of the correctness suite for an H100/H200, without a GPU.

Without a GPU the suite runs the kernels in Triton's interpreter, which checks what they compute but
not that they compile: code the interpreter runs can still fail in Triton's compiler (layouts,
types, shared memory) or in ptxas. This module records each distinct launch the suite makes in the
interpreter (kernel, argument types, divisibility, constexprs, warps, stages), plus the BCJR
kernels at a full-size trellis, and compiles each ahead of time for sm_90 with the installed Triton
and the ptxas it bundles, as the launch would compile on the GPU.

    python -m trellis_cli.kernel_aot                  # record, then compile; exit 1 on a failure
    python -m trellis_cli.kernel_aot --record FILE    # (interpreter) write the launches as JSON
    python -m trellis_cli.kernel_aot --compile FILE   # compile the launches in FILE

Recording and compiling need separate processes: Triton decides when a kernel is defined whether
it is interpreted, so the default command runs the recording in a child process.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

import torch

ARCH = 90  # Hopper: H100, H200
TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
                torch.float64: "fp64", torch.int8: "i8", torch.int16: "i16", torch.int32: "i32",
                torch.int64: "i64", torch.uint8: "u8", torch.bool: "i1"}
OPTIONS = ("num_warps", "num_stages")


def _constexpr_names(fn) -> set[str]:
    """Parameters annotated tl.constexpr, for a JIT or an interpreted kernel alike."""
    python_function = fn.fn
    return {name for name, parameter in inspect.signature(python_function).parameters.items()
            if "constexpr" in str(parameter.annotation)}


def describe_launch(fn, arguments: dict, options: dict) -> dict:
    """A JSON-able launch: the kernel's module and name, and per parameter either its constexpr
    value or what the launcher specializes a runtime argument on (tensor dtype, integer width and
    divisibility by 16)."""
    constexprs = _constexpr_names(fn)
    described = {}
    for name, value in arguments.items():
        if name in constexprs:
            described[name] = {"constexpr": value}
        elif isinstance(value, torch.Tensor):
            described[name] = {"pointer": TRITON_TYPES[value.dtype]}
        elif isinstance(value, bool):
            described[name] = {"scalar": "i1"}
        elif isinstance(value, int):
            width = "i32" if -2**31 <= value < 2**31 else "i64"
            described[name] = {"scalar": width, "divisible": value % 16 == 0}
        elif isinstance(value, float):
            described[name] = {"scalar": "fp32"}
        else:
            raise TypeError(f"{fn.fn.__name__}: cannot describe argument {name}={value!r}")
    return {"module": fn.fn.__module__, "name": fn.fn.__name__, "arguments": described,
            "options": {k: v for k, v in options.items() if k in OPTIONS}}


def compile_launch(launch: dict, arch: int = ARCH):
    """Compile a described launch for `arch` (needs Triton's JIT, not its interpreter)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(launch["module"]), launch["name"])
    signature, constexprs, attrs = {}, {}, {}
    for index, name in enumerate(fn.arg_names):
        argument = launch["arguments"][name]
        if "constexpr" in argument:
            signature[name] = "constexpr"
            constexprs[name] = argument["constexpr"]
        elif "pointer" in argument:
            signature[name] = "*" + argument["pointer"]
            attrs[(index,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        else:
            signature[name] = argument["scalar"]
            if argument.get("divisible"):
                attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn, signature, constexprs, attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=launch["options"])


def record(workload: Callable[[], None], execute: bool = True) -> list[dict]:
    """The distinct launches `workload` makes in Triton's interpreter (TRITON_INTERPRET=1 must be
    set before triton is first imported). Without `execute` the kernels do not run: for
    workloads too large for the interpreter whose host code does not read kernel results."""
    from triton.runtime.interpreter import InterpretedFunction

    launches: dict[str, dict] = {}
    run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        signature = inspect.signature(self.fn)
        bound = signature.bind(*args, **{k: v for k, v in kwargs.items()
                                         if k in signature.parameters})
        options = {k: v for k, v in kwargs.items() if k not in signature.parameters}
        launch = describe_launch(self, dict(bound.arguments), options)
        launches.setdefault(json.dumps(launch, sort_keys=True), launch)
        if execute:
            return run(self, *args, grid=grid, warmup=warmup, **kwargs)
        return None

    InterpretedFunction.run = recording_run
    try:
        workload()
    finally:
        InterpretedFunction.run = run
    return list(launches.values())


def _suite() -> None:
    from trellis_cli.kernel_suite import CASES

    for case in CASES:
        case.run("cpu")


def _bcjr_full_size() -> None:
    """The BCJR kernels at the trellis QAT trains (L=12, K*V=4, V=2), forward and backward."""
    from trellis_kernels.bcjr import backward_triton, forward_triton

    x, values = torch.randn(2, 64, 2), torch.randn(1 << 12, 2)
    out, _ = forward_triton(x, values, 12, 4, 0.1)
    backward_triton(x, values, out, torch.randn_like(out), 12, 4, 0.1, values_grad=True)


def record_all() -> list[dict]:
    return record(_suite) + record(_bcjr_full_size, execute=False)


def compile_all(launches: list[dict], arch: int = ARCH) -> int:
    """Compile each launch, one line each; the number that failed."""
    failed = 0
    for launch in launches:
        constexprs = ", ".join(f"{k}={v['constexpr']}" for k, v in launch["arguments"].items()
                               if "constexpr" in v)
        label = f"{launch['name']} [{constexprs}]"
        try:
            kernel = compile_launch(launch, arch)
        except Exception as error:  # report every launch, then fail
            failed += 1
            message = str(error).strip().splitlines()
            print(f"FAIL {label}: {type(error).__name__}: {message[0] if message else ''}",
                  flush=True)
            continue
        print(f"ok   {label} shared={kernel.metadata.shared}", flush=True)
    return failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--record", type=Path, metavar="FILE",
                       help="record the suite's launches to FILE (run with TRITON_INTERPRET=1)")
    group.add_argument("--compile", type=Path, metavar="FILE",
                       help="compile the launches in FILE")
    args = parser.parse_args(argv)
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if args.record:
        if not interpreted:
            parser.error("--record runs the kernels in the interpreter: set TRITON_INTERPRET=1")
        args.record.write_text(json.dumps(record_all()) + "\n")
        return 0
    if interpreted:
        parser.error("compiling needs Triton's JIT: unset TRITON_INTERPRET")
    if args.compile:
        launches = json.loads(args.compile.read_text())
    else:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "launches.json"
            env = dict(os.environ, TRITON_INTERPRET="1")
            recording = subprocess.run([sys.executable, "-m", "trellis_cli.kernel_aot",
                                        "--record", str(path)], env=env)
            if recording.returncode:
                print(f"kernel_aot: error: recording the suite's launches failed (exit "
                      f"{recording.returncode})", file=sys.stderr)
                return 1
            launches = json.loads(path.read_text())
    failed = compile_all(launches)
    print(f"{len(launches) - failed} of {len(launches)} launches compiled for sm_{ARCH}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
