"""Static cost of the GEMV and the rotations: their sm_90 machine code, counted without a GPU.

    python benchmarks/kernels_sass.py [--out FILE]

Compiles the kernels ahead of time for an H100/H200 (sm_90), with the installed Triton and the
ptxas/cuobjdump it bundles, each launch built exactly as the runtime would build it for a
Llama-3-8B-sized matrix on an H200 (132 SMs).

- GEMV (trellis_kernels/matmul.py, 4096 x 4096): the main loop in the SASS (the longest backward branch),
  counted by opcode. Dividing by the weights one thread decodes per iteration gives instructions
  per weight, which bounds a decode-bound GEMV; LDG (global loads), LDS (shared loads) and BAR
  (barriers) show where table lookups go; registers and shared memory per program bound how many
  programs an SM holds.
- Decode (trellis_kernels/decode.py, the same matrix to float16, the dense path of large batches): the
  same count for its loop.
- Rotation (trellis_kernels/hadamard.py, one row of 4096 and of 14336, in and out): one program per row,
  so the instructions one thread runs (the code once, its loop over the GEMV's partial sums as
  often as it turns), its tensor-core instructions and barriers: a latency-bound kernel's
  critical path grows with them.

A proxy, not a timing: it sees neither stalls nor bank conflicts nor cache misses
(benchmarks/kernels_gpu.py times the kernels on a GPU). Results: benchmarks/results/kernels_sass.json.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, uninstalled

RESULTS = Path(__file__).resolve().parent / "results" / "kernels_sass.json"
ARCH = 90
MULTIPROCESSORS = 132  # an H200's, for the split of the input dimension
SHAPE = (4096, 4096)
# ((L, K, V, code), rows): the runtime's HYB at 2 and 4 bits, the computed codes, 16 rows.
CASES = [((16, 2, 2, "hyb"), 1), ((16, 4, 2, "hyb"), 1), ((16, 2, 1, "3inst"), 1),
         ((16, 2, 1, "1mad"), 1), ((16, 2, 2, "hyb"), 16)]
INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)[^;]*;")
BRANCH = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?BRA\s+(?:`\()?\.?\w*?(0x[0-9a-f]+)")


def _bundled_tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def compile_sass(launch) -> tuple[str, dict]:
    """The SASS text of a trellis_kernels.launch.Launch compiled for sm_90, and its resource use."""
    from trellis_cli.kernel_aot import compile_launch, describe_launch

    compiled = compile_launch(describe_launch(launch.kernel, launch.arguments(), launch.options),
                              ARCH)
    with tempfile.TemporaryDirectory() as folder:
        cubin = Path(folder) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        sass = subprocess.run([_bundled_tool("cuobjdump"), "-sass", str(cubin)],
                              capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([_bundled_tool("cuobjdump"), "-res-usage", str(cubin)],
                               capture_output=True, text=True, check=True).stdout
    registers = int(re.search(r"REG:(\d+)", usage).group(1))
    return sass, {"registers": registers, "shared_bytes": compiled.metadata.shared}


def opcodes(sass: str, start: int = 0, end: int | None = None) -> collections.Counter:
    """Opcode counts of the instructions at addresses start..end (all by default)."""
    counts = collections.Counter()
    for m in INSTRUCTION.finditer(sass):
        if start <= int(m.group(1), 16) and (end is None or int(m.group(1), 16) <= end):
            counts[m.group(2)] += 1
    return counts


def main_loop(sass: str) -> collections.Counter:
    """Opcode counts of the longest loop: the instructions between a backward branch's target
    and the branch."""
    loops = [(int(m.group(2), 16), int(m.group(1), 16)) for m in BRANCH.finditer(sass)
             if int(m.group(2), 16) < int(m.group(1), 16)]
    if not loops:
        raise RuntimeError("no loop found in the kernel's SASS")
    start, end = max(loops, key=lambda loop: loop[1] - loop[0])
    return opcodes(sass, start, end)


def _code_and_codes(spec: tuple):
    """The TrellisCode of (L, K, V, code) and zero packed codes of a SHAPE matrix: compiling needs
    the shapes and the code's constants, not the weights."""
    from trellis_cli.kernel_suite import random_weight
    from trellis_runtime.backend_triton import kernel_code
    from trellis_runtime.trellis import TrellisSpec

    code = kernel_code(random_weight(TrellisSpec(*spec), 16 * 16, 16 * 16, seed=0, scale=1.0))
    codes = torch.zeros(SHAPE[0] // 16, SHAPE[1] // 16, 8 * spec[1], dtype=torch.int32)
    return code, codes


def _loop_counts(case: str, launch) -> dict:
    """Compile a launch of the matmul kernel and count its main loop per weight a thread decodes
    in one iteration."""
    sass, resources = compile_sass(launch)
    counts = main_loop(sass)
    c = launch.constexprs
    weights = 2 * c["BLOCK_G"] * c["BLOCK_T"] * 16 / (launch.options["num_warps"] * 32)
    total = sum(counts.values())
    return {"case": case, "loop_instructions": total, "weights_per_thread": weights,
            "instructions_per_weight": round(total / weights, 2),
            "global_loads": counts["LDG"], "shared_loads": counts["LDS"],
            "stores": counts["STG"], "barriers": counts["BAR"], "fma": counts["FFMA"],
            "mma": counts["HMMA"], **resources, "warps": launch.options["num_warps"],
            "opcodes": dict(counts.most_common())}


def measure(spec: tuple, rows: int) -> dict:
    """The GEMV for `rows` rows of a SHAPE matrix, at the split an H200 gets."""
    from trellis_kernels.matmul import GEMV_BLOCKS, gemv_launch, splits_for

    code, codes = _code_and_codes(spec)
    x = torch.zeros(rows, SHAPE[1], dtype=torch.float32 if rows == 1 else torch.float16)
    block_rows, block_tiles, _ = GEMV_BLOCKS["fma" if rows == 1 else "dot"]
    splits = splits_for(SHAPE[0], SHAPE[1] // 16, block_rows, block_tiles, MULTIPROCESSORS)
    launch, _ = gemv_launch(x, codes, code, splits=splits)
    L, K, V, name = spec
    return _loop_counts(f"{SHAPE[0]}x{SHAPE[1]} L={L} K={K} V={V} {name} rows={rows}", launch)


def measure_decode(spec: tuple) -> dict:
    """The decode kernel (the dense path of large batches) for the same matrix, to float16."""
    from trellis_kernels.decode import DECODE_BLOCKS, decode_launch
    from trellis_kernels.matmul import splits_for

    code, codes = _code_and_codes(spec)
    block_rows, block_cols, _ = DECODE_BLOCKS
    splits = splits_for(SHAPE[0], SHAPE[1] // 16, block_rows, block_cols // 16, MULTIPROCESSORS)
    launch, _ = decode_launch(codes, code, 1.0, dtype=torch.float16, splits=splits)
    L, K, V, name = spec
    return _loop_counts(f"decode {SHAPE[0]}x{SHAPE[1]} L={L} K={K} V={V} {name} to float16",
                        launch)


def measure_rotation(n: int, direction: str) -> dict:
    """The rotation kernel for one row of n: in (rotate) or out (unrotate, summing the partials
    of a 4096-input GEMV at its default split)."""
    from trellis_kernels.hadamard import SPLITS_AT_ONCE, rotation_launch
    from trellis_kernels.matmul import GEMV_BLOCKS, splits_for, split_tiles
    from trellis_runtime.hadamard import random_signs, rotation_plan, small_factor

    small = small_factor(n)
    signs = random_signs(n, 0)
    if direction == "in":
        x, scale, out = torch.zeros(1, n), None, torch.empty(1, n)
    else:
        block_rows, block_tiles, _ = GEMV_BLOCKS["fma"]
        col_tiles = SHAPE[1] // 16
        splits = splits_for(n, col_tiles, block_rows, block_tiles, MULTIPROCESSORS)
        parts = -(-col_tiles // split_tiles(col_tiles, splits, block_tiles))
        x, scale = torch.zeros(parts, 1, n), torch.ones(1)
        out = torch.empty(1, n, dtype=torch.bfloat16)
    launch = rotation_launch(x, signs, small, scale, out, signs_first=direction == "in",
                             norm=rotation_plan(n).norm)
    sass, resources = compile_sass(launch)
    counts = opcodes(sass)
    # The loop over the partials runs once per SPLITS_AT_ONCE of them after the first.
    loop = sum(main_loop(sass).values())
    iterations = -(-(len(x) - 1) // SPLITS_AT_ONCE.value) if x.dim() == 3 else 0
    return {"case": f"n={n} rows=1 {direction}" + (f" ({x.shape[0]} partials)"
                                                    if direction == "out" else ""),
            "instructions": sum(counts.values()),
            "executed": sum(counts.values()) + loop * (iterations - 1),
            "tensor_core": counts["HGMMA"] + counts["HMMA"], "barriers": counts["BAR"],
            **resources, "warps": launch.options["num_warps"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    import triton

    gemv = []
    for spec, batch in CASES:
        row = measure(spec, batch)
        gemv.append(row)
        print(f"{row['case']:<40} {row['instructions_per_weight']:5.2f} instr/weight  "
              f"LDG {row['global_loads']:3d}  LDS {row['shared_loads']:3d}  "
              f"BAR {row['barriers']}  regs {row['registers']}", flush=True)
    decode = measure_decode((16, 2, 2, "hyb"))
    print(f"{decode['case']:<40} {decode['instructions_per_weight']:5.2f} instr/weight  "
          f"LDG {decode['global_loads']:3d}  LDS {decode['shared_loads']:3d}  "
          f"STG {decode['stores']:3d}  regs {decode['registers']}", flush=True)
    rotation = []
    for n in (4096, 14336):
        for direction in ("in", "out"):
            row = measure_rotation(n, direction)
            rotation.append(row)
            print(f"rotation {row['case']:<31} {row['executed']:5d} instructions run per "
                  f"thread ({row['instructions']} in the code)  tensor-core "
                  f"{row['tensor_core']:3d}  BAR {row['barriers']:2d}  warps {row['warps']}",
                  flush=True)
    result = {"environment": {"date": datetime.datetime.now(datetime.timezone.utc)
                              .isoformat(timespec="seconds"),
                              "triton": triton.__version__, "arch": f"sm_{ARCH}"},
              "gemv": gemv, "decode": decode, "rotation": rotation}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    temporary = args.out.with_suffix(".tmp")
    temporary.write_text(json.dumps(result, indent=1) + "\n")
    temporary.replace(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
