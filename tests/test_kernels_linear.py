"""The kernel backend of TrellisLinear against x @ W^T of the dequantized weight, on every path.

Without a GPU the kernels run in Triton's interpreter on CPU tensors, so the backend is built for
the CPU here; select_backend picks it only on CUDA.
"""

from __future__ import annotations

import math

import pytest
import torch

from trellis_cli.kernel_suite import CASES, random_weight, with_real_vectors
from trellis_runtime.backend_dense import DenseBackend
from trellis_runtime.backend_triton import TritonBackend, kernel_support_error
from trellis_runtime.linear import select_backend
from trellis_runtime.trellis import TrellisSpec

LINEAR_CASES = [c for c in CASES if c.kernel == "linear"]


@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda c: c.name)
def test_backend_matches_dequantized_product(case) -> None:
    assert case.run() <= case.tolerance


def test_backend_keeps_leading_dimensions_and_holds_no_dense_copy() -> None:
    weight = random_weight(TrellisSpec(12, 2, 1, "1mad"), 32, 64, seed=1)
    backend = TritonBackend(weight, torch.device("cpu"), torch.float32)
    x = torch.randn(2, 1, 64)
    y = backend(x)
    assert y.shape == (2, 1, 32) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), x.double() @ weight.dequantize().double().T,
                               rtol=2e-3, atol=2e-3)
    assert backend.decoded_bytes == 0


def test_shapes_the_kernels_refuse_are_named() -> None:
    """in=96 is 12 x 8: the Hadamard kernel needs a power-of-two part of at least 16."""
    weight = random_weight(TrellisSpec(12, 2, 1, "1mad"), 32, 96, seed=2)
    assert "need >= 16" in kernel_support_error(weight)
    with pytest.raises(ValueError, match="kernel backend"):
        TritonBackend(weight, torch.device("cpu"), torch.float32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_selects_the_kernel_backend() -> None:
    weight = random_weight(TrellisSpec(16, 2, 2, "hyb"), 64, 128, seed=3)
    backend = select_backend(weight, torch.device("cuda"))
    assert isinstance(backend, TritonBackend)
    x = torch.randn(3, 128, device="cuda", dtype=torch.bfloat16)
    reference = x.double() @ weight.dequantize().double().cuda().T
    torch.testing.assert_close(backend(x).double(), reference, rtol=2e-2, atol=2e-2)
    refused = random_weight(TrellisSpec(12, 2, 1, "1mad"), 32, 96, seed=2)
    assert isinstance(select_backend(refused, torch.device("cuda")), DenseBackend)


def test_linears_with_equal_input_signs_rotate_each_input_once() -> None:
    """q/k/v-like siblings share one rotation; a new or modified input is rotated afresh."""
    first = random_weight(TrellisSpec(12, 2, 1, "1mad"), 32, 64, seed=4)
    second = random_weight(TrellisSpec(12, 2, 1, "1mad"), 16, 64, seed=5)
    second.input_signs = first.input_signs.clone()  # equal content, another tensor
    cpu = torch.device("cpu")
    a, b = TritonBackend(first, cpu, torch.float32), TritonBackend(second, cpu, torch.float32)
    assert a.rotation is b.rotation
    x = torch.randn(1, 64)
    a(x)
    rotated = a.rotation._last[3]
    b(x)
    assert a.rotation._last[3] is rotated  # reused, not recomputed
    x.mul_(2)  # the same tensor, modified: its version changed
    torch.testing.assert_close(b(x).double(), x.double() @ second.dequantize().double().T,
                               rtol=1e-5, atol=1e-5)
    assert a.rotation._last[3] is not rotated


def _explicit_rotation(n: int, blocks: int) -> torch.Tensor:
    """I_blocks kron Sylvester's H_{n/blocks}, orthonormal, by Kronecker doubling."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n // blocks:
        h = torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64), h)
    return torch.kron(torch.eye(blocks, dtype=torch.float64), h) / math.sqrt(n // blocks)


@pytest.mark.parametrize("shape", [(688, 64), (64, 688)])
def test_block_diagonal_widths_agree_across_backends(shape: tuple[int, int]) -> None:
    """688 = 43 * 16 rotates in 43 Sylvester blocks of 16: the dequantized weight is
    diag(s_out) H_out^T W_rot H_in diag(s_in) with those blocks written out here, and the dense
    and kernel backends both multiply by it."""
    weight = random_weight(TrellisSpec(16, 2, 2, "hyb"), *shape, seed=6)
    rotation = {n: _explicit_rotation(n, 43) if n == 688 else _explicit_rotation(n, 1)
                for n in shape}
    s_out, s_in = weight.output_signs.double(), weight.input_signs.double()
    expected = s_out[:, None] * (rotation[shape[0]].T @ weight.decode_rotated().double()
                                 @ rotation[shape[1]]) * s_in
    torch.testing.assert_close(weight.dequantize().double(), expected, rtol=0, atol=1e-6)
    x = torch.randn(3, shape[1])
    cpu = torch.device("cpu")
    reference = x.double() @ expected.T
    for backend in (DenseBackend(weight, cpu, torch.float32),
                    TritonBackend(weight, cpu, torch.float32)):
        torch.testing.assert_close(backend(x).double(), reference, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("rows,dense_min_rows", [(1, 128), (3, 128), (20, 128), (20, 16)],
                         ids=["gemv-fp32", "gemv", "gemm", "decode-dense"])
def test_real_vectors_of_format_2_run_on_every_path(rows: int, dense_min_rows: int) -> None:
    """Fine-tuned checkpoints hold real float16 input/output vectors where format 1 holds ±1 signs;
    the rotation kernels multiply them in the same place, on every row-count path."""
    signs = random_weight(TrellisSpec(12, 2, 2, "hyb"), 64, 128, seed=4)
    weight = with_real_vectors(signs, seed=5)
    backend = TritonBackend(weight, torch.device("cpu"), torch.float32, dense_min_rows=dense_min_rows)
    x = torch.randn(rows, 128, generator=torch.Generator().manual_seed(6))
    reference = x.double() @ weight.dequantize().double().T
    # the vectors matter to the result: the signs alone are far from it
    assert not torch.allclose(reference, x.double() @ signs.dequantize().double().T, atol=0.1)
    torch.testing.assert_close(backend(x).double(), reference, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dense_min_rows", [16, 128], ids=["decode-dense", "gemm"])
def test_a_massive_activation_token_stays_finite(dense_min_rows: int) -> None:
    """One token of the batch carries a massive activation (as tokens do before down_proj): its
    product, far beyond float16's range, comes out finite and right, and so do the other rows."""
    weight = random_weight(TrellisSpec(12, 2, 2, "hyb"), 64, 1024, seed=7)
    backend = TritonBackend(weight, torch.device("cpu"), torch.float32, dense_min_rows=dense_min_rows)
    x = torch.randn(20, 1024, generator=torch.Generator().manual_seed(8))
    x[3, 17] = 2e5
    reference = x.double() @ weight.dequantize().double().T
    # Before the output rotation and scale the product has the same length over the scale: its
    # root mean square, a lower bound of its largest entry, is far past float16's largest value.
    unit_product_rms = reference[3].norm() / weight.scale.double() / math.sqrt(64)
    assert unit_product_rms > 2 * torch.finfo(torch.float16).max
    result = backend(x).double()
    assert torch.isfinite(result).all()
    torch.testing.assert_close(result[3], reference[3], rtol=1e-2,
                               atol=1e-2 * reference[3].abs().max().item())
    others = [r for r in range(20) if r != 3]
    torch.testing.assert_close(result[others], reference[others], rtol=1e-2, atol=1e-2)
