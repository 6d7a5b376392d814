"""Random Hadamard incoherence processing for weight matrices.

A trellis quantizer works best on weights whose entries look i.i.d. Gaussian with no outliers. Rotating
W (out x in) on both sides by a random orthogonal transform spreads every outlier over a whole row or
column, and because the transform is orthogonal the layer output can be recovered exactly by rotating
the activations with the same transform at run time.

The transform is H_n diag(s): random signs s followed by an orthonormal Hadamard matrix
H_n = (H_r kron H_{2^p}) / sqrt(n) with n = r * 2^p. H_{2^p} is Sylvester's matrix, applied with a
fast Walsh-Hadamard transform in O(n log n); H_r is a small Hadamard matrix built by Paley's
constructions, which covers the non-power-of-two widths that real models use (576 = 36 * 16,
1536 = 12 * 128, 5120 = 20 * 256, 14336 = 28 * 512). Paley I matrices are not symmetric, so H_n and
its transpose are distinct and every function here says which one it applies.

Some widths have no such construction (11008 = 43 * 256: no Hadamard matrix of order 43 * 2^j is
built here). A multiple of 16 then gets the block-diagonal I_k kron H_b, with H_b as above on each of
k blocks of b = n / k entries: every outlier is spread over its block only. Written as
(I_k kron H_r) kron H_{2^p} it keeps the shape "small factor kron Sylvester" that the kernels apply;
only the normalisation changes, to 1 / sqrt(b). RotationPlan holds the choice, a pure function of n,
so a checkpoint stores nothing about it.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from trellis_runtime.errors import UnsupportedSpecError

# Largest small factor (H_r, or I_k kron H_r for blocks) that rotation_plan chooses. The dense
# multiply by it costs its order in operations per entry against log2(n) for the butterflies; past
# this the "small" factor stops being cheap (11008 would need a 5504 x 5504 Paley matrix). Part of
# the format: the plan of a width, and so every checkpoint's rotation, depends on it.
MAX_SMALL_ORDER = 1024
# Block-diagonal rotations need a multiple of this: the weights are stored in 16 x 16 tiles, and a
# Sylvester part of at least 16 keeps every block mixing at least 16 entries.
BLOCK_MULTIPLE = 16


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    return all(q % d for d in range(2, math.isqrt(q) + 1))


def _construction(order: int) -> str | None:
    """Name of the construction that builds a Hadamard matrix of this order, or None."""
    if order >= 1 and order & (order - 1) == 0:
        return "sylvester"
    if _is_prime(order - 1) and (order - 1) % 4 == 3:
        return "paley1"
    if order % 2 == 0 and _is_prime(order // 2 - 1) and (order // 2 - 1) % 4 == 1:
        return "paley2"
    return None


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = chi(j - i) with chi the quadratic character mod the prime q (chi(0) = 0).

    Q Q^T = q I - J and every row sums to zero; Q is antisymmetric when q = 3 mod 4 (chi(-1) = -1)
    and symmetric when q = 1 mod 4. Both Paley constructions rest on these facts.
    """
    chi = -torch.ones(q, dtype=torch.float64)
    chi[torch.tensor(sorted({x * x % q for x in range(1, q)}))] = 1.0
    chi[0] = 0.0
    idx = torch.arange(q)
    return chi[(idx[None, :] - idx[:, None]) % q]


def _conference(q: int) -> torch.Tensor:
    """The (q+1) x (q+1) conference matrix [[0, 1^T], [chi(-1) 1, Q]]: C C^T = q I, zero diagonal."""
    sign = 1.0 if q % 4 == 1 else -1.0
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:] = 1.0
    c[1:, 0] = sign
    c[1:, 1:] = _jacobsthal(q)
    return c


@functools.lru_cache(maxsize=None)
def small_hadamard(order: int) -> torch.Tensor:
    """A +-1 float64 matrix H of the given order with H H^T = order * I.

    Powers of two use Sylvester's doubling; order q + 1 (q prime, q = 3 mod 4) uses Paley I,
    H = I + C with C skew; order 2(q + 1) (q prime, q = 1 mod 4) uses Paley II, which replaces each
    entry of the symmetric conference matrix C by a 2x2 block. The result is cached and shared:
    callers must not modify it in place.
    """
    kind = _construction(order)
    if kind == "sylvester":
        h = torch.ones(1, 1, dtype=torch.float64)
        h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        while h.shape[0] < order:
            h = torch.kron(h2, h)
        return h
    if kind == "paley1":
        return torch.eye(order, dtype=torch.float64) + _conference(order - 1)
    if kind == "paley2":
        c = _conference(order // 2 - 1)
        on_nonzero = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        on_zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        return torch.kron(c, on_nonzero) + torch.kron(torch.eye(order // 2, dtype=torch.float64), on_zero)
    raise UnsupportedSpecError(f"no Hadamard matrix construction for order {order}")


def _kronecker_factors(n: int) -> tuple[int, int] | None:
    """(r, p) with n == r * 2**p and H_r constructible, taking the smallest such r, or None.

    A smaller r leaves more of the work to the O(n log n) Sylvester part and less to the dense
    r x r multiply; r is capped at MAX_SMALL_ORDER for the same reason.
    """
    odd = n
    while odd % 2 == 0:
        odd //= 2
    r = odd
    while n % r == 0 and r <= MAX_SMALL_ORDER:
        if r == 1 or _construction(r) is not None:
            return r, (n // r).bit_length() - 1
        r *= 2
    return None


@dataclass(frozen=True)
class RotationPlan:
    """How H_n is built for one width n: (I_blocks kron H_order kron H_sylvester) / sqrt(block).

    blocks == 1 is the full Kronecker transform; otherwise each of `blocks` diagonal blocks of
    `block` entries is rotated on its own. The kernels take the small factor I_blocks kron H_order
    (entries 0 and +-1, exact in tf32) and apply the Sylvester part themselves, so all they need
    besides is `norm`: the small factor's rows have `order` nonzeros, not `small_order`, which is
    why the normalisation is 1 / sqrt(block) and not 1 / sqrt(n).
    """

    blocks: int
    order: int
    sylvester: int

    @property
    def n(self) -> int:
        return self.blocks * self.order * self.sylvester

    @property
    def block(self) -> int:
        return self.order * self.sylvester

    @property
    def small_order(self) -> int:
        return self.blocks * self.order

    @property
    def norm(self) -> float:
        """The factor that makes the +-1 transform orthonormal."""
        return 1.0 / math.sqrt(self.block)


@functools.lru_cache(maxsize=None)
def rotation_plan(n: int) -> RotationPlan:
    """The rotation of width n: the full Kronecker transform when it exists, else (n a multiple
    of BLOCK_MULTIPLE) the largest block with a construction whose small factor stays within
    MAX_SMALL_ORDER, else Sylvester blocks over n's power-of-two part (always constructible).

    The largest block spreads outliers furthest. It contains all of n's power of two: doubling
    the Sylvester part of a block keeps it constructible and halves the number of blocks.
    """
    factors = _kronecker_factors(n) if n >= 1 else None
    if factors is not None:
        r, p = factors
        return RotationPlan(1, r, 1 << p)
    if n < 1 or n % BLOCK_MULTIPLE:
        raise UnsupportedSpecError(
            f"no Hadamard transform for dimension n={n}: n must be r * 2^p with r = 1 or a Paley "
            f"order <= {MAX_SMALL_ORDER}, or a multiple of {BLOCK_MULTIPLE} for a block-diagonal one")
    power = n & -n
    odd = n // power
    best = RotationPlan(odd, 1, power)
    for divisor in range(3, odd, 2):
        factors = _kronecker_factors(divisor * power) if odd % divisor == 0 else None
        if factors is not None:
            r, p = factors
            plan = RotationPlan(odd // divisor, r, 1 << p)
            if plan.small_order <= MAX_SMALL_ORDER and plan.block > best.block:
                best = plan
    return best


def hadamard_factors(n: int) -> tuple[int, int]:
    """(s, p) with n == s * 2**p, s the order of the small factor the kernels take (see
    RotationPlan); raises UnsupportedSpecError for a width that has no rotation."""
    plan = rotation_plan(n)
    return plan.small_order, plan.sylvester.bit_length() - 1


def small_factor(n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The small factor I_k kron H_r of H_n, unnormalized, as the kernels take it: a contiguous
    float32 matrix of order rotation_plan(n).small_order on `device`; [[1]] when n is a power of
    two (the kernels then skip it).

    The Triton and C++ rotations apply the Sylvester part themselves and need only this factor
    and rotation_plan(n).norm.
    """
    plan = rotation_plan(n)
    return _small_factor_on(plan.blocks, plan.order, torch.device(device))


@functools.lru_cache(maxsize=None)
def _small_factor_on(blocks: int, order: int, device: torch.device) -> torch.Tensor:
    hadamard = _small_hadamard_on(order, torch.float32, device)
    if blocks == 1:
        return hadamard
    return torch.kron(torch.eye(blocks, dtype=torch.float32, device=device), hadamard)


@functools.lru_cache(maxsize=None)
def _small_hadamard_on(order: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """small_hadamard converted once per dtype and device, so the hot path does no host copies."""
    return small_hadamard(order).to(dtype=dtype, device=device)


def _fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalized Sylvester transform along the last dim (a power of two), by log2(m) butterflies.

    Stage h pairs the entries whose indices differ only in the bit of weight h; after all stages
    entry i holds sum_j (-1)^popcount(i & j) x_j, which is Sylvester's H_m x.
    """
    lead, m = x.shape[:-1], x.shape[-1]
    h = 1
    while h < m:
        x = x.reshape(*lead, m // (2 * h), 2, h)
        a, b = x[..., 0, :], x[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    return x.reshape(*lead, m)


def hadamard_transform(x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """Apply the orthonormal H_n (or H_n^T) along the last dim of a floating-point tensor.

    Viewing the last dim as an (k r) x 2^p matrix X (row-major, matching the Kronecker index
    order), (I_k kron H_r kron H_{2^p}) x is (I_k kron H_r) X H_{2^p}, since Sylvester's matrix is
    symmetric; I_k kron H_r is H_r on each group of r rows, so the k blocks fold into the batch.
    Only H_r changes under transposition.
    """
    plan = rotation_plan(x.shape[-1])
    r = plan.order
    y = _fwht(x.reshape(-1, r, plan.sylvester))
    if r > 1:
        h = _small_hadamard_on(r, x.dtype, x.device)
        y = torch.matmul(h.T if transpose else h, y)
    return (y * plan.norm).reshape(x.shape)


def random_signs(n: int, seed: int) -> torch.Tensor:
    """n random +-1 values as int8, reproducible anywhere because the CPU generator is seeded."""
    g = torch.Generator().manual_seed(seed)
    bits = torch.randint(0, 2, (n,), generator=g)
    return (1 - 2 * bits).to(torch.int8)


def _signs_for(signs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if signs.shape != (x.shape[-1],):
        raise ValueError(f"signs of shape {tuple(signs.shape)} do not match last dim {x.shape[-1]}")
    return signs.to(dtype=x.dtype, device=x.device)


def rotate(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """H_n (signs * x) along the last dim."""
    return hadamard_transform(x * _signs_for(signs, x))


def unrotate(y: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """signs * (H_n^T y) along the last dim: the exact inverse of rotate."""
    return hadamard_transform(y, transpose=True) * _signs_for(signs, y)


def rotate_weight(w: torch.Tensor, input_signs: torch.Tensor, output_signs: torch.Tensor) -> torch.Tensor:
    """W~ = H_m diag(output_signs) W diag(input_signs) H_n^T for W of shape (m, n).

    Both factors are orthogonal, so W = diag(s_out) H_m^T W~ H_n diag(s_in) and for every x
        W x == unrotate(W~ @ rotate(x, s_in), s_out),
    which is what the runtime computes: it quantizes W~, rotates the activations going in and
    unrotates the outputs coming out. Row-wise, rotate(W, s_in) = W diag(s_in) H_n^T; the left
    factor is the same operation on W^T.
    """
    return rotate(rotate(w, input_signs).mT, output_signs).mT


def unrotate_weight(
    w_rot: torch.Tensor, input_signs: torch.Tensor, output_signs: torch.Tensor
) -> torch.Tensor:
    """W = diag(output_signs) H_m^T W~ H_n diag(input_signs): the inverse of rotate_weight."""
    return unrotate(unrotate(w_rot, input_signs).mT, output_signs).mT
