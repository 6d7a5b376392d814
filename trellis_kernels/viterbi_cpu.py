"""Viterbi on the bitshift trellis on CPU, in C++ (viterbi_cpu.cpp), compiled on first use and cached.

The CPU counterpart of the Triton kernel in viterbi.py, with the same arguments: minimum-error state
paths (B, T/V) int64 for float32 sequences x (B, T) and state values (2^L, V), free-ended or
tail-biting through a given overlap of L-KV bits, and QTIP's two-pass tail-biting search over whole
tiles in one call. Tiles run in parallel over torch's threads, each thread with its own cost arrays
and one byte of back-pointer per group and step.

Ties: the lowest last state of equal costs, then, step by step back, the lowest predecessor, as the
torch reference (trellis_runtime.viterbi.viterbi) breaks them. The C++ sums each step's squared
errors in float32 in its own order, so where two paths' errors differ by float rounding only (a
near-tie) it may pick the other one; both are then optimal within float tolerance. Elsewhere the
paths are the reference's.

Needs x86-64 and a C++ compiler (g++, or $CXX) at first use; `load` raises KernelsUnavailable saying
which is missing. Nothing here imports the project: the caller chooses the build directory.
"""

from __future__ import annotations

from pathlib import Path

import torch

from trellis_kernels.cpu_build import CppLibrary, KernelsUnavailable, portable_flags
from trellis_kernels.cpu_build import load as load_library

HERE = Path(__file__).parent
MIN_STATE_BITS = 8
MAX_STATE_BITS = 16
MAX_STEP_BITS = 8  # K*V for K <= 4, V <= 2, as the Triton kernel
LIBRARY = CppLibrary(name="trellis_viterbi", sources=(HERE / "viterbi_cpu.cpp",),
                     flags=(*portable_flags(), "-ffp-contract=off"))

__all__ = ["KernelsUnavailable", "LIBRARY", "load", "supports", "tail_biting_paths",
           "viterbi_paths"]


def load(build_dir: Path) -> None:
    """Make torch.ops.trellis_viterbi available in this process, compiling into build_dir if needed."""
    load_library(LIBRARY, build_dir)


def supports(state_bits: int, step_bits: int, vec: int) -> bool:
    """Whether the C++ search runs a trellis of L state bits, K*V step bits and V values per step."""
    return (MIN_STATE_BITS <= state_bits <= MAX_STATE_BITS and 1 <= step_bits < state_bits
            and step_bits <= MAX_STEP_BITS and vec in (1, 2))


def viterbi_paths(x: torch.Tensor, values: torch.Tensor, state_bits: int, bits: int, vec: int,
                  overlap: torch.Tensor | None = None) -> torch.Tensor:
    """Minimum-error state paths (B, T/V) int64 for sequences x (B, T) and values (2^L, V).

    Without `overlap` the path's ends are free; with overlap (B,) int64 it is tail-biting through
    those L-KV bits (first state's top bits and last state's low bits). Raises ValueError on
    arguments it cannot take.
    """
    return torch.ops.trellis_viterbi.viterbi(x, values, state_bits, bits, vec, overlap)


def tail_biting_paths(x: torch.Tensor, values: torch.Tensor, state_bits: int, bits: int,
                      vec: int) -> torch.Tensor:
    """QTIP's two-pass tail-biting paths (B, T/V): per tile, a free search of the tile rotated by
    half its steps reads the state at the seam, whose top L-KV bits constrain a second search
    (trellis_runtime.viterbi.tail_biting_viterbi is the reference)."""
    return torch.ops.trellis_viterbi.tail_biting_viterbi(x, values, state_bits, bits, vec)
