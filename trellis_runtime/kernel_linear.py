"""The Triton kernel backend of TrellisLinear: multiply straight from the packed codes.

y = x W^T with W = diag(s_out) H_out^T (scale * C) H_in diag(s_in) (see quantized.py), so a forward
is three launches: rotate the input rows (kernels/hadamard.py), multiply by the code values C
without materializing them (kernels/matmul.py), and rotate the result back while applying the
scale and output signs (kernels/hadamard.py again, which also sums the GEMV's split-K partials).
"""

from __future__ import annotations

from kernels.tile import TrellisCode
from trellis_runtime.codes import kernel_constants
from trellis_runtime.quantized import QuantizedWeight


def trellis_code(weight: QuantizedWeight) -> TrellisCode:
    """The kernels' view of a weight's spec, table and code constants."""
    spec = weight.spec
    return TrellisCode(spec.state_bits, spec.bits, spec.vec, spec.code, weight.table,
                       kernel_constants())
