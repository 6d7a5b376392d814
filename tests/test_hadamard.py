"""Properties of the random Hadamard rotation: exactness against dense matrices, orthogonality,
and the weight/activation identity the runtime depends on."""

from __future__ import annotations

import math

import pytest
import torch

from trellis_runtime.errors import UnsupportedSpecError
from trellis_runtime.hadamard import (
    hadamard_factors,
    hadamard_transform,
    random_signs,
    rotate,
    rotate_weight,
    small_factor,
    small_hadamard,
    unrotate,
    unrotate_weight,
)

PALEY_ORDERS = [12, 20, 28, 36, 44, 60, 68, 76, 84, 108, 124, 132, 140, 148]
DENSE_SIZES = [1, 2, 16, 64, 96, 192, 576, 1536, 80, 112]
SUPPORTED_SIZES = DENSE_SIZES + [4096, 5120, 14336]


def _sylvester(m: int) -> torch.Tensor:
    """Sylvester's matrix by repeated Kronecker doubling, independent of the fast transform."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < m:
        h = torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64), h)
    return h


def _dense(n: int) -> torch.Tensor:
    r, p = hadamard_factors(n)
    return torch.kron(small_hadamard(r), _sylvester(2**p)) / math.sqrt(n)


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


@pytest.mark.parametrize("n", DENSE_SIZES)
@pytest.mark.parametrize("transpose", [False, True])
def test_transform_matches_dense_matrix(n: int, transpose: bool) -> None:
    h = _dense(n)
    if transpose:
        h = h.T
    x = torch.randn(5, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    torch.testing.assert_close(hadamard_transform(x, transpose=transpose), x @ h.T, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", DENSE_SIZES)
def test_small_factor_is_the_factor_the_transform_applies(n: int) -> None:
    """The kernels get H_r from small_factor and apply the Sylvester part themselves, so
    small_factor(n) kron Sylvester / sqrt(n) must be the transform's matrix."""
    small = small_factor(n)
    assert small.dtype == torch.float32 and small.is_contiguous()
    size = 1 << hadamard_factors(n)[1]
    h = torch.kron(small.double(), _sylvester(size)) / math.sqrt(n)
    eye = torch.eye(n, dtype=torch.float64)
    torch.testing.assert_close(hadamard_transform(eye), h.T, rtol=0, atol=1e-12)


def test_transpose_differs_when_small_factor_is_not_symmetric() -> None:
    x = torch.randn(96, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(hadamard_transform(x), hadamard_transform(x, transpose=True))


@pytest.mark.parametrize("n", SUPPORTED_SIZES)
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_rotation_is_orthogonal(n: int, dtype: torch.dtype, atol: float) -> None:
    x = torch.randn(2, 3, n, dtype=dtype, generator=torch.Generator().manual_seed(n))
    s = random_signs(n, seed=n)
    y = rotate(x, s)
    assert y.shape == x.shape and y.dtype == dtype and y.device == x.device
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=atol, atol=0)
    torch.testing.assert_close(unrotate(y, s), x, rtol=0, atol=atol)


@pytest.mark.parametrize("m,n", [(192, 576), (1536, 576), (576, 1536)])
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


@pytest.mark.parametrize("n", [14, 22, 7, 0, -4, 11008])
def test_unsupported_size_raises(n: int) -> None:
    with pytest.raises(UnsupportedSpecError, match=f"n={n}"):
        hadamard_factors(n)
    if n > 0:
        with pytest.raises(UnsupportedSpecError):
            hadamard_transform(torch.zeros(n))


@pytest.mark.parametrize("order", [3, 6, 14, 22, 52, 172])
def test_unconstructible_small_order_raises(order: int) -> None:
    with pytest.raises(UnsupportedSpecError):
        small_hadamard(order)
