"""The Hadamard rotation kernel against trellis_runtime.hadamard.rotate/unrotate in float64.

Parity cases are shared with `trellis bench kernels` (trellis_cli/kernel_suite.py).
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from trellis_cli.kernel_suite import CASES
from trellis_kernels.hadamard import _split_tf32, rotate_rows, unrotate_rows
from trellis_runtime.hadamard import (random_signs, rotate, rotation_plan, small_factor,
                                      small_hadamard, unrotate)

HADAMARD_CASES = [c for c in CASES if c.kernel == "hadamard"]


@triton.jit
def _split_kernel(x_ptr, head_ptr, tail_ptr, N: tl.constexpr):
    offsets = tl.arange(0, N)
    head, tail = _split_tf32(tl.load(x_ptr + offsets))
    tl.store(head_ptr + offsets, head)
    tl.store(tail_ptr + offsets, tail)


@pytest.mark.parametrize("case", HADAMARD_CASES, ids=lambda c: c.name)
def test_kernel_matches_reference(case) -> None:
    assert case.run() <= case.tolerance


def test_stacked_short_rows_with_a_partial_last_program() -> None:
    """n=64 puts 16 rows in a program: 17 rows take two programs, the second nearly empty."""
    x = torch.randn(17, 64, dtype=torch.float16)
    signs = random_signs(64, 3)
    out = torch.full((17, 64), float("nan"), dtype=torch.bfloat16)
    got = rotate_rows(x, signs, None, out=out, norm=64 ** -0.5)
    torch.testing.assert_close(got.float(), rotate(x.float(), signs), rtol=2**-7, atol=1e-2)
    assert not torch.isnan(got).any()


def test_unrotate_inverts_rotate() -> None:
    x = torch.randn(2, 192, dtype=torch.float64).float()
    small, signs, norm = small_hadamard(12).float(), random_signs(192, 4), 192 ** -0.5
    back = unrotate_rows(rotate_rows(x, signs, small, norm=norm), signs, small, norm=norm)
    torch.testing.assert_close(back, x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(back, unrotate(rotate(x, signs), signs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n,small,signs,match", [
    (48, None, 48, "not 1 times a power of two"),
    (96, small_hadamard(12).float(), 96, "need >= 16"),
    (68 * 16, small_hadamard(68).float(), 68 * 16, "exceeds 64"),
    (67 * 16, small_factor(67 * 16), 67 * 16, "order 67 exceeds 64"),  # I_67 kron H_16
    (64, None, 32, "signs of shape"),
    (1 << 15, None, 1 << 15, "above 16384"),
])
def test_unsupported_sizes_are_refused(n: int, small, signs: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        rotate_rows(torch.zeros(1, n), random_signs(signs, 0), small, norm=1.0)


def test_tf32_split_keeps_float32_accuracy_through_truncation() -> None:
    """The rotation's products split x into a tf32 head and a remainder (trellis_kernels/hadamard.py
    _split_tf32). The interpreter multiplies in full float32, so the tensor cores' truncation of
    each operand to tf32 is applied here: head is already tf32, and what survives of the
    remainder must leave at most 2^-21 of |x|."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4096, generator=gen) * torch.exp2(torch.randint(-30, 30, (4096,),
                                                                    generator=gen))
    head, tail = torch.empty_like(x), torch.empty_like(x)
    _split_kernel[(1,)](x, head, tail, x.numel())
    low_bits = 0x1FFF  # the 13 mantissa bits tf32 drops
    assert not (head.view(torch.int32) & low_bits).any()
    assert torch.equal(head + tail, x)  # the remainder is exact
    truncated = (tail.view(torch.int32) & ~low_bits).view(torch.float32)
    error = (x.double() - head.double() - truncated.double()).abs()
    assert (error <= x.double().abs() * 2.0**-21).all()


def test_block_diagonal_rotation_is_orthonormal_and_inverts() -> None:
    """11008 = 43 * 256 (Llama-2-7B's MLP width) rotates in 43 blocks of 256: the kernel needs the
    plan's normalisation 1/sqrt(256), not 1/sqrt(11008), to keep norms and to invert exactly."""
    n = 11008
    plan = rotation_plan(n)
    assert (plan.blocks, plan.small_order, plan.sylvester) == (43, 43, 256)
    x = torch.randn(2, n, dtype=torch.float64).float()
    small, signs = small_factor(n), random_signs(n, 6)
    rotated = rotate_rows(x, signs, small, norm=plan.norm)
    torch.testing.assert_close(rotated, rotate(x, signs), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=0)
    back = unrotate_rows(rotated, signs, small, norm=plan.norm)
    torch.testing.assert_close(back, x, rtol=1e-5, atol=1e-5)
