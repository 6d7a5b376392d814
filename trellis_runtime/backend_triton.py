"""The Triton kernel backend of TrellisLinear: multiply straight from the packed codes.

y = x W^T with W = diag(s_out) H_out^T (scale * C) H_in diag(s_in) (see quantized.py), so a forward
is three launches: rotate the input rows (trellis_kernels/hadamard.py), multiply by the code values C
without materializing them (trellis_kernels/matmul.py), and rotate the result back while applying the
scale and output signs (trellis_kernels/hadamard.py again, which also sums the GEMV's split-K partials).
Linears that read the same input with the same signs (q/k/v, gate/up) rotate it once between them.
Nothing but the packed codes is held in memory.

The product depends on how many rows arrive:
- 1 row (a decode step): the GEMV in float32 FMAs, input rotated to float32;
- 2 to GEMV_MAX_ROWS (trellis_kernels/matmul.py) rows: the GEMV on the tensor cores, input
  rotated to float16;
- up to DENSE_MIN_ROWS: the fused GEMM (tl.dot), float16 input;
- more: decode C once to float16 and let cuBLAS multiply rows scaled to unit length (the GEMM
  re-decodes C for every block of 64 rows, which stops paying once there are enough rows).
float16 rather than bfloat16 inside: rotated activations and unit-variance code values are far
from float16's range limits, and its 3 extra mantissa bits are free.
"""

from __future__ import annotations

import importlib.util
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from trellis_runtime.codes import kernel_constants
from trellis_runtime.errors import UnsupportedSpecError
from trellis_runtime.hadamard import rotation_plan, small_factor
from trellis_runtime.quantized import QuantizedWeight

# Rows from which decode + cuBLAS replaces the fused GEMM. Unmeasured default: EXL3 switches at
# 144 rows on its kernels. benchmarks/kernels_gpu.py measures the crossover on a GPU.
DENSE_MIN_ROWS = 128
INNER_DTYPE = torch.float16


def kernels_available() -> bool:
    """Whether Triton is installed, so that the kernels can compile."""
    return importlib.util.find_spec("triton") is not None


def kernel_code(weight: QuantizedWeight):
    """The kernels' view of a weight's spec, table and code constants (a
    trellis_kernels.trellis_code.TrellisCode)."""
    from trellis_kernels.trellis_code import TrellisCode

    spec = weight.spec
    return TrellisCode(spec.state_bits, spec.bits, spec.vec, spec.code, weight.table,
                       kernel_constants())


def kernel_support_error(weight: QuantizedWeight) -> str | None:
    """Why the kernels cannot run this weight, or None if they can."""
    from trellis_kernels.hadamard import check_size

    try:
        kernel_code(weight)
        for n in weight.shape:
            check_size(n, rotation_plan(n).small_order)
    except (ValueError, UnsupportedSpecError) as err:
        return str(err)
    return None


class InputRotation:
    """x -> H_in (s_in * x), computed once per input for all the linears that share it.

    q/k/v and gate/up read the same input with the same signs (architecture.INPUT_GROUPS), so the
    second and third linear reuse the first one's rotated rows. The memo holds the last input by
    identity and version: the same tensor object, unmodified, asked for the same dtype. Inside a
    CUDA-graph capture that is the same Python-level call sequence, so the graph records one
    rotation too.
    """

    def __init__(self, signs: torch.Tensor, small: torch.Tensor, norm: float) -> None:
        self.signs, self.small, self.norm = signs, small, norm
        self._last: tuple | None = None

    def __call__(self, x: torch.Tensor, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        from trellis_kernels.hadamard import rotate_rows

        last = self._last
        if last is not None and last[0]() is x and last[1] == x._version and last[2] == dtype:
            return last[3]
        rotated = rotate_rows(rows, self.signs, self.small, dtype, norm=self.norm)
        self._last = (weakref.ref(x), x._version, dtype, rotated)
        return rotated


# Linears whose input signs are equal share one InputRotation (weakly held: it dies with them).
_ROTATIONS: "weakref.WeakValueDictionary[tuple, InputRotation]" = weakref.WeakValueDictionary()


def shared_rotation(signs: torch.Tensor) -> InputRotation:
    key = (signs.device, signs.numel(), signs.cpu().numpy().tobytes())
    rotation = _ROTATIONS.get(key)
    if rotation is None:
        rotation = InputRotation(signs, small_factor(signs.numel(), signs.device),
                                 rotation_plan(signs.numel()).norm)
        _ROTATIONS[key] = rotation
    return rotation


def unit_row_product(rows: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """rows @ dense^T in float32, multiplied in float16 with each row scaled to unit length.

    A float16 product of unscaled rows overflows where a token carries a massive activation (such
    tokens reach 1e4 before down_proj): the float16 result must then hold ||row|| ||code row||. With
    unit rows each result is bounded by its code row's length (Cauchy-Schwarz), a few hundred at
    most, and the row's length goes back on in float32."""
    lengths = rows.float().norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return F.linear((rows.float() / lengths).to(dense.dtype), dense).float() * lengths


class TritonBackend(nn.Module):
    """Multiply with the Triton kernels; holds only the packed weight on the device."""

    def __init__(self, weight: QuantizedWeight, device: torch.device, dtype: torch.dtype,
                 dense_min_rows: int = DENSE_MIN_ROWS) -> None:
        super().__init__()
        error = kernel_support_error(weight)
        if error is not None:
            raise ValueError(f"kernel backend: {error}")
        self.out_features, self.in_features = weight.shape
        self.dtype = dtype
        self.dense_min_rows = dense_min_rows
        for name in ("codes", "input_signs", "output_signs", "scale"):
            self.register_buffer(name, getattr(weight, name).to(device).contiguous(),
                                 persistent=False)
        table = None if weight.table is None else weight.table.to(device).contiguous()
        self.register_buffer("table", table, persistent=False)
        self.register_buffer("small_out", small_factor(self.out_features, device),
                             persistent=False)
        self.out_norm = rotation_plan(self.out_features).norm
        self.register_buffer("unit_scale", torch.ones(1, device=device), persistent=False)
        self.rotation = shared_rotation(self.input_signs)
        self.code = kernel_code(QuantizedWeight(weight.spec, self.codes, self.input_signs,
                                                 self.output_signs, self.scale, self.table))

    @property
    def decoded_bytes(self) -> int:
        return 0

    @property
    def small_in(self) -> torch.Tensor:
        return self.rotation.small

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from trellis_kernels.decode import decode_matrix
        from trellis_kernels.hadamard import unrotate_rows
        from trellis_kernels.matmul import GEMV_MAX_ROWS, gemm, gemv_partials

        rows = x.reshape(-1, self.in_features)
        count = rows.shape[0]
        rotated = self.rotation(x, rows, torch.float32 if count == 1 else INNER_DTYPE)
        if count <= GEMV_MAX_ROWS:
            product = gemv_partials(rotated, self.codes, self.code)
        elif count < self.dense_min_rows:
            product = gemm(rotated, self.codes, self.code)
        else:
            dense = decode_matrix(self.codes, self.code, self.unit_scale, dtype=INNER_DTYPE)
            product = unit_row_product(rotated, dense)
        y = unrotate_rows(product, self.output_signs, self.small_out, self.scale, x.dtype,
                          norm=self.out_norm)
        return y.reshape(*x.shape[:-1], self.out_features)
