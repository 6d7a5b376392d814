"""BCJR on CPU in C++ (bcjr_cpu.cpp), compiled on first use and cached: the soft trellis's CPU path.

forward and backward have the contract of bcjr.forward_reference and bcjr.backward_reference (free
chains, emitted steps [start, stop), float32 or float64, no entropy) and compute the same math
(bcjr.py's module docstring). The C++ runs blocks of chains in the SIMD lanes, one block per
thread at a time, and recomputes each step's 2^L costs from the codebook; only G = 2^(L-KV) sized
messages per step are stored. Needs x86-64 and a C++ compiler at first use; `load` raises
KernelsUnavailable saying which is missing. Nothing here imports the project: the caller chooses the
build directory.
"""

from __future__ import annotations

from pathlib import Path

import torch

from trellis_kernels.bcjr import _check
from trellis_kernels.cpu_build import CppLibrary, KernelsUnavailable, portable_flags
from trellis_kernels.cpu_build import load as load_library

HERE = Path(__file__).parent
LIBRARY = CppLibrary(name="trellis_bcjr", sources=(HERE / "bcjr_cpu.cpp",), flags=portable_flags())
DTYPES = (torch.float32, torch.float64)

__all__ = ["KernelsUnavailable", "LIBRARY", "backward", "forward", "load"]


def load(build_dir: Path) -> None:
    """Make torch.ops.trellis_bcjr available in this process, compiling into build_dir if needed."""
    load_library(LIBRARY, build_dir)


def _check_cpu(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.device.type != "cpu":
            raise ValueError(f"bcjr_cpu: tensors must be on the CPU, got {t.device}")
        if t.dtype not in DTYPES:
            raise ValueError(f"bcjr_cpu: tensors must be float32 or float64, got {t.dtype}")


def forward(x: torch.Tensor, values: torch.Tensor, state_bits: int, step_bits: int,
            temperature: float, start: int = 0, stop: int | None = None
            ) -> tuple[torch.Tensor, None]:
    """Posterior means (B, stop-start, V) of chains x (B, N, V), and None (no entropy)."""
    stop = x.shape[1] if stop is None else stop
    _check(x, values, state_bits, step_bits, temperature, start, stop)
    _check_cpu(x, values)
    return torch.ops.trellis_bcjr.forward(x, values, state_bits, step_bits, float(temperature),
                                          start, stop), None


def backward(x: torch.Tensor, values: torch.Tensor, out: torch.Tensor, grad_out: torch.Tensor,
             state_bits: int, step_bits: int, temperature: float, start: int = 0,
             values_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradients (dx (B, N, V), dvalues (S, V) or None) of <grad_out, forward(x)>; `out` is
    forward's output for the same arguments (B, E, V), emitted steps [start, start + E)."""
    if out.dim() != 3 or grad_out.shape != out.shape:
        raise ValueError(f"bcjr: out and grad_out must be (chains, emitted steps, V) alike, got "
                         f"{tuple(out.shape)} and {tuple(grad_out.shape)}")
    _check(x, values, state_bits, step_bits, temperature, start, start + out.shape[1])
    _check_cpu(x, values, out, grad_out)
    if out.shape[0] != x.shape[0] or out.shape[2] != x.shape[2] or \
            out.dtype != x.dtype or grad_out.dtype != x.dtype:
        raise ValueError(f"bcjr: out {tuple(out.shape)} {out.dtype} does not match x "
                         f"{tuple(x.shape)} {x.dtype}")
    return torch.ops.trellis_bcjr.backward(x, values, out, grad_out, state_bits, step_bits,
                                           float(temperature), start, values_grad)
