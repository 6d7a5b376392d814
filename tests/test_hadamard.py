"""Properties of the random Hadamard rotation: exactness against dense matrices, orthogonality,
and the weight/activation identity the runtime depends on."""

from __future__ import annotations

import math

import pytest
import torch

from trellis_runtime.errors import UnsupportedSpecError
from trellis_kernels.hadamard import MAX_SMALL_ORDER as KERNEL_MAX_SMALL_ORDER
from trellis_runtime.hadamard import (
    RotationPlan,
    hadamard_factors,
    hadamard_transform,
    random_signs,
    rotate,
    rotate_weight,
    rotation_plan,
    small_factor,
    small_hadamard,
    unrotate,
    unrotate_weight,
)

PALEY_ORDERS = [12, 20, 28, 36, 44, 60, 68, 76, 84, 108, 124, 132, 140, 148]
DENSE_SIZES = [1, 2, 16, 64, 96, 192, 576, 1536, 80, 112]
SUPPORTED_SIZES = DENSE_SIZES + [4096, 5120, 14336]
# Widths without a Kronecker construction (43 * 2^j, 65 * 16 past the 1024 cap): block-diagonal.
BLOCK_SIZES = [688, 1040, 11008]
# Model widths, some Paley-friendly already (4864 = 76 * 64, 18944 = 148 * 128), and odd
# multiples of 16.
MODEL_SIZES = [4864, 18944, 896, 2304, 6912, 9216, 16 * 47, 16 * 53] + BLOCK_SIZES


def _sylvester(m: int) -> torch.Tensor:
    """Sylvester's matrix by repeated Kronecker doubling, independent of the fast transform."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < m:
        h = torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64), h)
    return h


def _dense(n: int) -> torch.Tensor:
    """H_n from its plan by explicit Kronecker products, independent of the fast transform."""
    plan = rotation_plan(n)
    blocks = torch.eye(plan.blocks, dtype=torch.float64)
    h = torch.kron(torch.kron(blocks, small_hadamard(plan.order)), _sylvester(plan.sylvester))
    return h / math.sqrt(plan.block)


@pytest.mark.parametrize("order", [1, 2, 4, 8] + PALEY_ORDERS)
def test_small_hadamard_is_hadamard(order: int) -> None:
    h = small_hadamard(order)
    assert h.shape == (order, order) and h.dtype == torch.float64
    assert bool(((h == 1) | (h == -1)).all())
    assert torch.equal(h @ h.T, order * torch.eye(order, dtype=torch.float64))


@pytest.mark.parametrize("n", SUPPORTED_SIZES + [3072, 8960, 18944])
def test_factors_are_smallest_valid_split(n: int) -> None:
    r, p = hadamard_factors(n)
    assert n == r * 2**p
    assert r == 1 or r % 4 == 0
    # No smaller r of the same odd part may be constructible.
    smaller = r // 2
    while smaller > 2 and smaller % 2 == 0:
        with pytest.raises(UnsupportedSpecError):
            small_hadamard(smaller)
        smaller //= 2


def test_model_widths_factor_as_documented() -> None:
    assert hadamard_factors(576) == (36, 4)
    assert hadamard_factors(1536) == (12, 7)
    assert hadamard_factors(192) == (12, 4)
    assert hadamard_factors(1024) == (1, 10)


@pytest.mark.parametrize("n", DENSE_SIZES + [688, 1040])
@pytest.mark.parametrize("transpose", [False, True])
def test_transform_matches_dense_matrix(n: int, transpose: bool) -> None:
    h = _dense(n)
    if transpose:
        h = h.T
    x = torch.randn(5, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    torch.testing.assert_close(hadamard_transform(x, transpose=transpose), x @ h.T, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", DENSE_SIZES + [688, 1040])
def test_small_factor_is_the_factor_the_transform_applies(n: int) -> None:
    """The kernels get the small factor from small_factor and apply the Sylvester part
    themselves, so small_factor(n) kron Sylvester * norm must be the transform's matrix."""
    small, plan = small_factor(n), rotation_plan(n)
    assert small.dtype == torch.float32 and small.is_contiguous()
    assert small.shape == (plan.small_order,) * 2 and hadamard_factors(n)[0] == plan.small_order
    size = 1 << hadamard_factors(n)[1]
    h = torch.kron(small.double(), _sylvester(size)) * plan.norm
    eye = torch.eye(n, dtype=torch.float64)
    torch.testing.assert_close(hadamard_transform(eye), h.T, rtol=0, atol=1e-12)


def test_transpose_differs_when_small_factor_is_not_symmetric() -> None:
    x = torch.randn(96, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(hadamard_transform(x), hadamard_transform(x, transpose=True))


@pytest.mark.parametrize("n", SUPPORTED_SIZES + MODEL_SIZES)
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_rotation_is_orthogonal(n: int, dtype: torch.dtype, atol: float) -> None:
    x = torch.randn(2, 3, n, dtype=dtype, generator=torch.Generator().manual_seed(n))
    s = random_signs(n, seed=n)
    y = rotate(x, s)
    assert y.shape == x.shape and y.dtype == dtype and y.device == x.device
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=atol, atol=0)
    torch.testing.assert_close(unrotate(y, s), x, rtol=0, atol=atol)


@pytest.mark.parametrize("m,n", [(192, 576), (1536, 576), (576, 1536), (688, 64), (64, 688),
                                 (1040, 688)])
def test_weight_rotation_identity(m: int, n: int) -> None:
    g = torch.Generator().manual_seed(m + n)
    w = torch.randn(m, n, dtype=torch.float64, generator=g)
    x = torch.randn(4, n, dtype=torch.float64, generator=g)
    s_in, s_out = random_signs(n, seed=1), random_signs(m, seed=2)
    w_rot = rotate_weight(w, s_in, s_out)
    torch.testing.assert_close(unrotate_weight(w_rot, s_in, s_out), w, rtol=0, atol=1e-12)
    torch.testing.assert_close(unrotate(rotate(x, s_in) @ w_rot.T, s_out), x @ w.T, rtol=0, atol=1e-10)
    # Against the explicit formula W~ = H_m diag(s_out) W diag(s_in) H_n^T.
    expected = _dense(m) @ (s_out.double()[:, None] * w * s_in.double()) @ _dense(n).T
    torch.testing.assert_close(w_rot, expected, rtol=0, atol=1e-10)


def test_random_signs_deterministic_and_seed_dependent() -> None:
    s = random_signs(576, seed=7)
    assert s.dtype == torch.int8 and s.shape == (576,)
    assert bool(((s == 1) | (s == -1)).all())
    assert torch.equal(s, random_signs(576, seed=7))
    assert not torch.equal(s, random_signs(576, seed=8))


@pytest.mark.parametrize("n", [14, 22, 7, 0, -4, 8 * 43, 8 * 67])
def test_unsupported_size_raises(n: int) -> None:
    """Widths without a Kronecker construction that are not multiples of 16 (8 * 43, 8 * 67)
    get no block-diagonal one either."""
    with pytest.raises(UnsupportedSpecError, match=f"n={n}.*multiple of 16"):
        hadamard_factors(n)
    if n > 0:
        with pytest.raises(UnsupportedSpecError):
            hadamard_transform(torch.zeros(n))


@pytest.mark.parametrize("order", [3, 6, 14, 22, 52, 172])
def test_unconstructible_small_order_raises(order: int) -> None:
    with pytest.raises(UnsupportedSpecError):
        small_hadamard(order)


def test_existing_widths_keep_their_kronecker_plan() -> None:
    """Checkpoints store no plan: widths that had a Kronecker transform must keep exactly it."""
    assert rotation_plan(576) == RotationPlan(blocks=1, order=36, sylvester=16)
    assert rotation_plan(14336) == RotationPlan(blocks=1, order=28, sylvester=512)
    assert rotation_plan(4864) == RotationPlan(blocks=1, order=76, sylvester=64)
    assert rotation_plan(18944) == RotationPlan(blocks=1, order=148, sylvester=128)
    assert rotation_plan(16 * 47) == RotationPlan(blocks=1, order=752, sylvester=1)
    assert rotation_plan(576).norm == 1.0 / math.sqrt(576)


def test_paley_transform_is_the_explicit_kronecker_product() -> None:
    """576 = 36 * 16 against H_36 kron H_16 / 24 written out here, not through the plan."""
    h = torch.kron(small_hadamard(36), _sylvester(16)) / 24.0
    x = torch.randn(3, 576, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(hadamard_transform(x), x @ h.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(hadamard_transform(x, transpose=True), x @ h, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n,plan", [
    (688, RotationPlan(blocks=43, order=1, sylvester=16)),
    (11008, RotationPlan(blocks=43, order=1, sylvester=256)),
    (1040, RotationPlan(blocks=5, order=104, sylvester=2)),  # H_1040 exists but exceeds the cap
])
def test_widths_without_kronecker_construction_get_blocks(n: int, plan: RotationPlan) -> None:
    assert rotation_plan(n) == plan and plan.n == n
    assert plan.norm == 1.0 / math.sqrt(plan.block)


@pytest.mark.parametrize("n", [688, 1040])
def test_block_diagonal_transform_is_orthonormal(n: int) -> None:
    h = hadamard_transform(torch.eye(n, dtype=torch.float64))
    torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)


def test_block_diagonal_transform_keeps_its_blocks_apart() -> None:
    """11008: the first 256 inputs map to the first 256 outputs, by Sylvester's H_256 / 16."""
    h = hadamard_transform(torch.eye(11008, dtype=torch.float64)[:256])
    assert not h[:, 256:].any()
    torch.testing.assert_close(h[:, :256], _sylvester(256) / 16, rtol=0, atol=1e-12)


def test_block_plans_fit_the_kernel_whenever_sylvester_blocks_would() -> None:
    """Where rotation_plan falls back to blocks it takes the largest, not the plan with the
    smallest small factor; for every multiple of 16 up to 2^15 that never costs the Triton kernel
    (its small factor is at most KERNEL_MAX_SMALL_ORDER) a width it could have rotated with plain
    Sylvester blocks. (Kronecker plans stay as they are even where the kernel refuses them and
    Sylvester blocks would fit, e.g. 208 = 104 * 2: their checkpoints exist.)"""
    for n in range(16, 1 << 15, 16):
        plan = rotation_plan(n)
        sylvester_blocks = n // (n & -n)  # small factor order of I_odd kron H_{2^v}
        if plan.blocks > 1 and sylvester_blocks <= KERNEL_MAX_SMALL_ORDER:
            assert plan.small_order <= KERNEL_MAX_SMALL_ORDER, n
