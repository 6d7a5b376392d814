"""The CPU kernel backend of TrellisLinear: decode steps multiply straight from the packed codes.

A decode step on CPU is bound by the bytes its weights occupy: float32 copies of SmolLM2-135M's linears
are 424 MB, far beyond a last-level cache, so each token streams them from memory whatever the
arithmetic (README, Measured: what bounds single-stream decode). The 2-bit codes are 26.5 MB and stay
in cache, so the C++ kernel (trellis_kernels/trellis_cpu.cpp) reads them instead: it rotates the
input rows, multiplies by the code values looked up per trellis state, and rotates the result back.
The values are the stored ones (float16 table entries, float32 computed codes) times the matrix's
scale: no weight is rounded.

Products of more rows pay the code decode once but the multiply-adds per row, and a dense float32
copy may overtake: products of more than `max_rows` rows use it, up to DENSE_KERNEL_MAX_ROWS rows
through the C++ dense kernel (each weight read once for all rows), beyond (prefill) through torch's
GEMM. That copy is the memory this backend reports as decoded; where the codes win at every decode
batch, the model drops it and every product comes from the codes (drop_float_copy).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from trellis_kernels.cpu import CODE_TABLE, COMPUTED_CODES, MAX_TOKENS
from trellis_kernels.cpu_build import KernelsUnavailable
from trellis_runtime.codes import state_values
from trellis_runtime.hadamard import rotation_plan, small_factor
from trellis_runtime.paths import cache_dir
from trellis_runtime.quantized import QuantizedWeight

logger = logging.getLogger("trellis_runtime")

# Rows up to which the trellis kernel is used by default. Which product is fastest depends on the
# machine and the code, measured side by side over SmolLM2-135M's 210 linears
# (benchmarks/results/cpu_products.json): a table code's gather against the float32 copy's memory
# bandwidth at 1-2 rows, and from 3 rows the kernel's multiply-adds, which grow with the rows while
# its decode does not. On a Zen 5 machine the computed codes beat the copy at every decode batch
# (1-16 rows) and `hyb`'s gather loses to it; the dense kernel beats F.linear on the copy up to its
# 16-row limit and on the bf16 head. So a loaded model times decode steps each way
# (choose_code_rows): codes for none, 1-2 (KERNEL_MAX_ROWS) or 1-16 rows.
KERNEL_MAX_ROWS = 2
DENSE_KERNEL_MAX_ROWS = MAX_TOKENS  # the most rows one call of the C++ dense kernel takes
PROBE_SEQUENCES = 8  # the batch whose timed steps decide whether 3-16 rows come from the codes
CODES_ONLY = sys.maxsize  # max_rows once the float32 copy is dropped: every product from the codes
DISABLE_VARIABLE = "TRELLIS_CPU_KERNELS"  # set to 0 to use torch everywhere: dense products, Viterbi


def library_unavailable_reason(load: Callable[[Path], None], fallback: str) -> str | None:
    """None when `load` makes a C++ library available from the kernel cache, else why not, logged
    with `fallback` (what runs instead). DISABLE_VARIABLE=0 turns every CPU library off."""
    if os.environ.get(DISABLE_VARIABLE, "1") == "0":
        return f"disabled by {DISABLE_VARIABLE}=0"
    try:
        load(cache_dir() / "kernels")
    except KernelsUnavailable as error:
        logger.warning("%s: %s", fallback, error)
        return str(error)
    return None


@functools.lru_cache(maxsize=None)
def kernels_unavailable_reason() -> str | None:
    """None when the CPU kernels are loaded in this process, else why not (logged once)."""
    from trellis_kernels.cpu import load

    return library_unavailable_reason(load, "CPU kernels unavailable, using dense float32 weights")


def cpu_kernels_loaded() -> bool:
    return kernels_unavailable_reason() is None


def kernel_code(weight: QuantizedWeight) -> int:
    """The kernel's `code` argument: computed codes are evaluated in the kernel, the others read
    the state table."""
    return COMPUTED_CODES.get(weight.spec.code, CODE_TABLE)


def state_lut(weight: QuantizedWeight) -> torch.Tensor:
    """The kernel's state -> values table (2^L,) int32: float32 bit patterns for V = 1, two float16
    for V = 2 (slot 0 low). Raises ValueError if a V = 2 value is not exactly a float16."""
    values = state_values(weight.spec, weight.table)  # (2^L, V) float32, unscaled
    if weight.spec.vec == 1:
        return values.reshape(-1).contiguous().view(torch.int32)
    half = values.to(torch.float16)
    if not torch.equal(half.to(torch.float32), values):
        raise ValueError("code values are not exact float16 numbers")
    return half.contiguous().view(torch.int32).reshape(-1)


class CpuBackend(nn.Module):
    """Multiply up to `max_rows` rows (default 2) from the codes, more from a dense float32 copy
    (see the module docstring).

    CPU only. The kernel's arguments are kept as one plain tuple, not as registered buffers: a decode
    step makes 210 of these calls, and nn.Module's attribute lookup for ten buffers per call would
    cost more than the smaller products themselves.
    """

    def __init__(self, weight: QuantizedWeight, max_rows: int = KERNEL_MAX_ROWS) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.max_rows = max_rows
        spec = weight.spec
        self.codes = weight.codes.contiguous()
        code = kernel_code(weight)
        self.lut = state_lut(weight) if code == CODE_TABLE else torch.empty(0, dtype=torch.int32)
        self.input_signs = weight.input_signs.to(torch.float32)
        self.output_signs = weight.output_signs.to(torch.float32)
        self.small_in = small_factor(self.in_features)
        self.small_out = small_factor(self.out_features)
        # The scale and both rotations' normalisations, 1 / sqrt(block) each (hadamard.RotationPlan).
        in_block = rotation_plan(self.in_features).block
        out_block = rotation_plan(self.out_features).block
        self.factor = float(weight.scale) / math.sqrt(in_block * out_block)
        self.kernel_args = (self.codes, self.lut, self.input_signs, self.output_signs, self.small_in,
                            self.small_out, self.factor, spec.state_bits, spec.bits, spec.vec, code)
        self.dense = weight.dequantize().contiguous()

    @property
    def decoded_bytes(self) -> int:
        return 0 if self.dense is None else self.dense.numel() * self.dense.element_size()

    def drop_float_copy(self) -> None:
        """Multiply every product from the codes, prefills included, and free the float32 copy:
        for where the codes beat the copy at every decode batch (TrellisModel.choose_code_rows)."""
        self.dense = None
        self.max_rows = CODES_ONLY

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.shape[0] <= self.max_rows:  # a decode step's (tokens, features)
            return torch.ops.trellis_cpu.trellis_linear(x, *self.kernel_args)
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] > self.max_rows:
            return dense_product(x, self.dense)
        y = torch.ops.trellis_cpu.trellis_linear(rows, *self.kernel_args)
        return y.view(*x.shape[:-1], self.out_features)


def choose_code_rows(time_step: Callable[[int, int], float], rounds: int = 3
                     ) -> tuple[int, dict[tuple[int, int], float]]:
    """The most rows a product takes from the codes in decode steps, the rest from the float32 copy:
    0 where even one sequence's steps are faster from the copy, else DENSE_KERNEL_MAX_ROWS (every
    decode batch) where steps of PROBE_SEQUENCES sequences are faster from the codes too, else
    KERNEL_MAX_ROWS. time_step(rows, sequences) times one decode step of `sequences` sequences with
    products of up to `rows` rows from the codes. Each pair is timed in turn, `rounds` times each,
    and the medians compared; returns the choice and the medians (seconds) by (rows, sequences)."""
    def faster(rows: tuple[int, int], sequences: int) -> int:
        samples: dict[int, list[float]] = {r: [] for r in rows}
        for _ in range(rounds):
            for r, times in samples.items():
                times.append(time_step(r, sequences))
        for r, times in samples.items():
            medians[r, sequences] = statistics.median(times)
        return min(rows, key=lambda r: medians[r, sequences])

    medians: dict[tuple[int, int], float] = {}
    if faster((KERNEL_MAX_ROWS, 0), 1) == 0:
        return 0, medians
    return faster((DENSE_KERNEL_MAX_ROWS, KERNEL_MAX_ROWS), PROBE_SEQUENCES), medians


def fused_decoder_layer(linears: list[nn.Module], input_norm: torch.Tensor, post_norm: torch.Tensor,
                        eps: float) -> torch.ScriptObject | None:
    """The C++ decoder layer for decode steps (trellis_kernels/trellis_cpu_layer.cpp) over the
    backends of q, k, v, o, gate, up and down, or None unless all seven are CpuBackends with one row
    limit."""
    if not all(isinstance(linear, CpuBackend) for linear in linears) \
            or len({linear.max_rows for linear in linears}) != 1:
        return None
    tensors, factors, specs = [], [], []
    for linear in linears:
        *arrays, factor, state_bits, bits, vec, code = linear.kernel_args
        tensors += arrays
        factors.append(factor)
        specs += [state_bits, bits, vec, code]
    return torch.classes.trellis_cpu.DecoderLayer(
        tensors, factors, specs, [linear.dense for linear in linears], linears[0].max_rows,
        input_norm, post_norm, eps)


def dense_product(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """x (..., in) float32 times a bf16, float32 or int8 weight (out, in)^T, in float32, int8 rows
    times their `scales` (int8_rows): the dense kernel for up to DENSE_KERNEL_MAX_ROWS rows (it reads
    each weight once for all rows, in its own bytes), F.linear on a float32 copy for more."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] > DENSE_KERNEL_MAX_ROWS:
        return F.linear(x, widened_rows(weight, scales))
    y = torch.ops.trellis_cpu.dense_linear(rows.contiguous(), weight, scales)
    return y.view(*x.shape[:-1], weight.shape[0])


def int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, float32 scale per row) with weight ~ int8 * scale: each row's largest magnitude
    maps to 127, values round to nearest. Half the bytes of bf16 for the output head, which a
    decode step reads whole (57 MB in bf16 for SmolLM2-135M)."""
    w = weight.to(torch.float32)
    scales = w.abs().amax(dim=1) / 127
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))  # an all-zero row stays zero
    return torch.round(w / scales[:, None]).to(torch.int8).contiguous(), scales.contiguous()


def widened_rows(weight: torch.Tensor, scales: torch.Tensor | None = None) -> torch.Tensor:
    """The float32 values the dense kernel multiplies by: int8 rows times their scales, bf16 and
    float32 weights as they are."""
    if scales is None:
        return weight.to(torch.float32)
    return weight.to(torch.float32) * scales[:, None]
