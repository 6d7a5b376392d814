"""CPU kernels for decode steps, in C++ (trellis_cpu*.cpp), compiled on first use and cached.

What they compute, and the layout they assume (the torch references are
trellis_runtime.quantized.QuantizedWeight.dequantize and torch.nn.functional.linear):

- trellis_linear(x, codes, lut, input_signs, output_signs, input_hadamard, output_hadamard, factor,
  state_bits, bits, vec, code) = x W^T with W = diag(s_out) H_out^T (scale T) H_in diag(s_in), for any
  number of rows of float32 x (each weight is decoded once per call). T is read straight from the packed codes (rt, ct, 8K) int32: tile
  (r, c) holds a 256*K-bit stream, most significant bit first; tile position p = 16*row + col is slot
  p % V of step t = p // V, whose state is the L-bit window starting at bit t*K*V, circular within
  the tile. `code` says how a state becomes its V values: CODE_TABLE looks it up in `lut` (2^L,)
  int32, one float32 (V = 1) or two float16 (V = 2, slot 0 in the low 16 bits), bit patterns stored
  as int32; COMPUTED_CODES["1mad"] and ["3inst"] (V = 1) compute trellis_runtime.codes' values in
  vector integer arithmetic, bit for bit, and ignore `lut` (pass an empty one). H_n is the unnormalised
  S kron H_{2^p}, with the small r x r factor S (a Hadamard matrix, or I_k kron H_{r/k}) passed in
  as float32; `factor` is the scale and both Hadamard normalisations in one multiply:
  scale / sqrt(in * out) for Hadamard S, 1 / sqrt(n / k) per side for block-diagonal ones.
- dense_linear(x, w, scales=None) = x w^T for float32 x (at most MAX_TOKENS rows) and bfloat16,
  float32 or int8 w, accumulated in float32; int8 w comes with float32 row scales (out,) that
  multiply each row's sums.
- rms_norm and decode_attention: those steps of a decode step (trellis_cpu.cpp says what they take).
- torch.classes.trellis_cpu.DecoderLayer(tensors, factors, specs, dense, trellis_max_tokens,
  input_norm, post_norm, eps): a whole decoder layer for decode steps, built once from its seven
  linears' trellis_linear arguments (q, k, v, o, gate, up, down) and their float32 copies `dense`
  (multiplied instead of the codes beyond trellis_max_tokens rows, which .set_trellis_max_tokens(n)
  changes; .drop_dense() releases them and multiplies every product from the codes); .decode(x, cos, signed_sin,
  cache_k, cache_v, slots, positions) returns x + attention, + MLP, as trellis_runtime/model.py's
  DecoderLayer computes it.

The kernels need x86-64 with AVX-512 and a C++ compiler (g++, or $CXX) at first use; `load`
raises KernelsUnavailable saying which is missing, and callers fall back to torch. Nothing here
imports the project: the caller chooses the build directory.
"""

from __future__ import annotations

from pathlib import Path

import torch

from trellis_kernels.cpu_build import CppLibrary, KernelsUnavailable
from trellis_kernels.cpu_build import load as load_library

HERE = Path(__file__).parent
CODE_TABLE = 0  # the kernel's `code` argument (trellis_cpu.h, Code)
COMPUTED_CODES = {"1mad": 1, "3inst": 2}
MAX_TOKENS = 16  # rows per call of dense_linear and the fused layer: decode batches
LIBRARY = CppLibrary(
    name="trellis_cpu", sources=(HERE / "trellis_cpu.cpp", HERE / "trellis_cpu_layer.cpp"),
    headers=(HERE / "trellis_cpu.h",),
    flags=("-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mf16c", "-mfma"),
    needs_avx512=True,
    # Funnel shifts for the trellis windows; one-instruction byte sums for 1MAD.
    optional_flags=(("avx512_vbmi2", "-mavx512vbmi2"), ("avx512_vnni", "-mavx512vnni")))

__all__ = ["CODE_TABLE", "COMPUTED_CODES", "KernelsUnavailable", "LIBRARY", "MAX_TOKENS", "dense_linear",
           "load", "trellis_linear"]


def load(build_dir: Path) -> None:
    """Make torch.ops.trellis_cpu available in this process, compiling into build_dir if needed."""
    load_library(LIBRARY, build_dir)


def trellis_linear(x: torch.Tensor, codes: torch.Tensor, lut: torch.Tensor,
                   input_signs: torch.Tensor, output_signs: torch.Tensor,
                   input_hadamard: torch.Tensor, output_hadamard: torch.Tensor, factor: float,
                   state_bits: int, bits: int, vec: int, code: int = CODE_TABLE) -> torch.Tensor:
    """x (tokens, in) float32 -> (tokens, out) float32; see the module docstring."""
    return torch.ops.trellis_cpu.trellis_linear(x, codes, lut, input_signs, output_signs,
                                                input_hadamard, output_hadamard, factor,
                                                state_bits, bits, vec, code)


def dense_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """x (tokens, in) float32, weight (out, in) bfloat16, float32 or int8 (with `scales` (out,)
    float32) -> (tokens, out) float32."""
    return torch.ops.trellis_cpu.dense_linear(x, weight, scales)
