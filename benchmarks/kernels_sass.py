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

A per-pipe model turns the GEMV's and the decode's loop counts into a predicted bandwidth on the
packed bytes: each SASS instruction occupies its pipe (integer ALU, FMA-heavy, FMA, shared memory,
global load/store, tensor cores, conversions, and the schedulers' issue slots) for a stated number
of SM clocks, so a loop iteration of one warp costs the most loaded pipe's clocks; a second bound
is the bytes the resident programs keep in flight against DRAM latency (Little's law), a third the
DRAM itself. The smallest names what binds. The rates are assumptions written down below, made
before any GPU timed these kernels: the GPU run (benchmarks/kernels_gpu.py) confirms or refutes them.

A proxy, not a timing: it sees neither stalls nor bank conflicts nor cache misses, so its figures
are ceilings. Results: benchmarks/results/kernels_sass.json.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import math
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
INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Z0-9_]+)*)"
                         r"[^;]*;")

# The per-pipe model of one sm_90 SM (H200: 132 SMs). Each pipe's cost is the SM clocks one warp
# instruction occupies it, SM-wide: the integer ALU and the FMA-heavy half (IMAD) take 64 lanes a
# clock, the FMA pipe (heavy and lite together) 128, shared memory and the L1 load/store path 128
# bytes a clock (so a 64-bit access of 32 lanes takes 2), conversions 16 lanes; an m16n8k16 MMA
# (2,048 multiply-adds) takes 2 clocks at mma.sync's 1,024 a clock; four schedulers issue one
# warp instruction each a clock. Branches, barriers and the uniform datapath cost issue only.
CLOCK_HZ = 1.85e9
DRAM_BYTES_PER_S = 4.8e12
DRAM_LATENCY_S = 1e-6  # loaded, for bytes in flight
MAX_WARPS, REGISTERS, SHARED_BYTES = 64, 65536, 228 * 1024  # per SM
ISSUE_CLOCKS = 0.25
PIPES = {
    "alu": (0.5, {"LOP3", "SHF", "IADD3", "PRMT", "LEA", "SEL", "ISETP", "SGXT", "VIADD",
                  "VIMNMX", "PLOP3", "MOV", "F2FP", "FSETP", "FSEL", "FMNMX", "IABS", "BMSK",
                  "POPC", "FLO", "P2R", "R2P"}),
    "fma_heavy": (0.5, {"IMAD", "IMUL", "I2FP"}),
    # IMAD runs on the heavy half only, and takes its share of the whole FMA pipe as well
    "fma": (0.25, {"FFMA", "FADD", "FMUL", "HADD2", "HFMA2", "HMUL2", "IMAD", "IMUL", "I2FP"}),
    "shared": (1.0, {"LDS", "STS", "LDSM", "SHFL", "ATOMS"}),  # x width / 32 bits
    "global": (1.0, {"LDG", "STG", "LDGSTS", "LD", "ST", "RED", "ATOMG"}),  # x width / 32 bits
    "tensor": (1.0, {"HMMA"}),  # x (16816: 2, 1688: 1)
    "convert": (2.0, {"MUFU", "I2F", "F2I", "F2F"}),
}
ISSUE_ONLY = {"BRA", "BAR", "DEPBAR", "LDGDEPBAR", "NOP", "EXIT", "WARPSYNC", "BSYNC", "BSSY",
              "UISETP", "UIADD3", "USEL", "UMOV", "ULDC", "UIMAD", "ULOP3", "USHF", "ULEA",
              "UPLOP3", "S2UR", "R2UR", "S2R", "CS2R"}
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


def opcodes(sass: str, start: int = 0, end: int | None = None,
            modifiers: bool = False) -> collections.Counter:
    """Opcode counts of the instructions at addresses start..end (all by default); with
    modifiers, each opcode as written with them (LDS.64, HMMA.16816.F32)."""
    counts = collections.Counter()
    for m in INSTRUCTION.finditer(sass):
        if start <= int(m.group(1), 16) and (end is None or int(m.group(1), 16) <= end):
            counts[m.group(2) + (m.group(3) if modifiers else "")] += 1
    return counts


def main_loop(sass: str, modifiers: bool = False) -> collections.Counter:
    """Opcode counts of the longest loop: the instructions between a backward branch's target
    and the branch."""
    loops = [(int(m.group(2), 16), int(m.group(1), 16)) for m in BRANCH.finditer(sass)
             if int(m.group(2), 16) < int(m.group(1), 16)]
    if not loops:
        raise RuntimeError("no loop found in the kernel's SASS")
    start, end = max(loops, key=lambda loop: loop[1] - loop[0])
    return opcodes(sass, start, end, modifiers)


def _occupancy(instruction: str) -> float:
    """How many times its pipe's base cost one instruction takes: its access width over 32 bits
    for memory, its shape for MMAs."""
    parts = instruction.split(".")
    if parts[0] == "HMMA":
        return 1.0 if "1688" in parts else 2.0
    widths = [int(p) for p in parts[1:] if p in ("64", "128")]
    return widths[0] / 32 if widths else 1.0


def pipe_clocks(loop: collections.Counter) -> dict:
    """SM clocks each pipe spends on one warp's pass through a loop whose instructions (with
    modifiers) are counted in `loop`; "issue" is the schedulers'. Opcodes the model does not
    know are listed under "unmodelled" (they count for issue only)."""
    clocks = {"issue": ISSUE_CLOCKS * sum(loop.values())}
    clocks.update({pipe: 0.0 for pipe in PIPES})
    unmodelled = set()
    for instruction, count in loop.items():
        base = instruction.split(".")[0]
        pipes = [pipe for pipe, (_, names) in PIPES.items() if base in names]
        for pipe in pipes:
            clocks[pipe] += PIPES[pipe][0] * _occupancy(instruction) * count
        if not pipes and base not in ISSUE_ONLY:
            unmodelled.add(base)
    return {"clocks": {k: round(v, 2) for k, v in clocks.items()},
            "unmodelled": sorted(unmodelled)}


def resident_programs(warps: int, registers: int, shared_bytes: int, programs: int) -> int:
    """Programs one SM holds at once: warps, registers and shared memory each limit it, and the
    grid has only so many programs per SM."""
    return max(1, min(MAX_WARPS // warps, REGISTERS // (registers * 32 * warps),
                      SHARED_BYTES // max(shared_bytes + 1024, 1),
                      -(-programs // MULTIPROCESSORS)))


def predict(loop: collections.Counter, weights_per_warp: float, bits: int,
            bytes_in_flight_per_program: float, programs_per_sm: int,
            written_bytes_per_weight: float = 0.0) -> dict:
    """The bandwidth on packed bytes (bits per weight) each bound allows, in TB/s, and which binds:
    the busiest pipe, the bytes in flight, or DRAM (which also carries what the kernel writes per
    weight: the decode's float16 matrix)."""
    model = pipe_clocks(loop)
    pipe, clocks = max(model["clocks"].items(), key=lambda item: item[1])
    bytes_per_weight = bits / 8
    bounds = {
        f"pipe:{pipe}": weights_per_warp / clocks * MULTIPROCESSORS * CLOCK_HZ * bytes_per_weight,
        "in_flight": (programs_per_sm * bytes_in_flight_per_program * MULTIPROCESSORS
                      / DRAM_LATENCY_S),
        "dram": DRAM_BYTES_PER_S * bytes_per_weight / (bytes_per_weight + written_bytes_per_weight),
    }
    binding = min(bounds, key=bounds.get)
    return {**model, "programs_per_sm": programs_per_sm,
            "bounds_tb_s": {k: round(v / 1e12, 3) for k, v in bounds.items()},
            "binding": binding, "predicted_tb_s": round(bounds[binding] / 1e12, 3)}


def _code_and_codes(spec: tuple):
    """The TrellisCode of (L, K, V, code) and zero packed codes of a SHAPE matrix: compiling needs
    the shapes and the code's constants, not the weights."""
    from trellis_cli.kernel_suite import random_weight
    from trellis_runtime.backend_triton import kernel_code
    from trellis_runtime.trellis import TrellisSpec

    code = kernel_code(random_weight(TrellisSpec(*spec), 16 * 16, 16 * 16, seed=0, scale=1.0))
    codes = torch.zeros(SHAPE[0] // 16, SHAPE[1] // 16, 8 * spec[1], dtype=torch.int32)
    return code, codes


def _loop_counts(case: str, launch, bits: int, written_bytes_per_weight: float = 0.0) -> dict:
    """Compile a launch of the matmul kernel and count its main loop per weight a thread decodes
    in one iteration; predict its bandwidth. An iteration's codes are loaded one block ahead, so
    each resident program keeps one block of codes in flight."""
    sass, resources = compile_sass(launch)
    detailed = main_loop(sass, modifiers=True)
    counts = collections.Counter()
    for instruction, count in detailed.items():
        counts[instruction.split(".")[0]] += count
    c = launch.constexprs
    warps = launch.options["num_warps"]
    block_weights = 2 * c["BLOCK_G"] * c["BLOCK_T"] * 16
    weights = block_weights / (warps * 32)
    total = sum(counts.values())
    programs = resident_programs(warps, resources["registers"], resources["shared_bytes"],
                                 math.prod(launch.grid))
    model = predict(detailed, weights * 32, bits, block_weights * bits / 8,
                    programs, written_bytes_per_weight)
    return {"case": case, "loop_instructions": total, "weights_per_thread": weights,
            "model": model,
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
    return _loop_counts(f"{SHAPE[0]}x{SHAPE[1]} L={L} K={K} V={V} {name} rows={rows}", launch,
                        K)


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
                        launch, K, written_bytes_per_weight=2.0)


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


def _prediction(row: dict) -> str:
    model = row["model"]
    return (f"-> {model['predicted_tb_s']:.2f} TB/s packed, bound by {model['binding']} "
            f"({', '.join(f'{k} {v:.2f}' for k, v in model['bounds_tb_s'].items())})")


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
              f"BAR {row['barriers']}  regs {row['registers']}  {_prediction(row)}", flush=True)
    decode = measure_decode((16, 2, 2, "hyb"))
    print(f"{decode['case']:<40} {decode['instructions_per_weight']:5.2f} instr/weight  "
          f"LDG {decode['global_loads']:3d}  LDS {decode['shared_loads']:3d}  "
          f"STG {decode['stores']:3d}  regs {decode['registers']}  {_prediction(decode)}",
          flush=True)
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
                              "triton": triton.__version__, "arch": f"sm_{ARCH}",
                              "model": {"clock_hz": CLOCK_HZ, "dram_bytes_per_s": DRAM_BYTES_PER_S,
                                        "dram_latency_s": DRAM_LATENCY_S,
                                        "multiprocessors": MULTIPROCESSORS,
                                        "issue_clocks": ISSUE_CLOCKS,
                                        "pipe_clocks": {k: v[0] for k, v in PIPES.items()}}},
              "gemv": gemv, "decode": decode, "rotation": rotation}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    temporary = args.out.with_suffix(".tmp")
    temporary.write_text(json.dumps(result, indent=1) + "\n")
    temporary.replace(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
