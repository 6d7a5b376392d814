"""Randomized Hadamard rotation of rows: the input and output rotations of a quantized linear.

H_n = norm * (S kron H_{2^p}) for n = r * 2^p, where H_{2^p} is Sylvester's matrix and S a small
r x r matrix of 0 and +-1 the caller supplies with the normalisation that makes H_n orthonormal
(trellis_runtime.hadamard: small_factor and rotation_plan(n).norm; this package imports nothing of
the project). S is a Hadamard matrix (norm = 1 / sqrt(n)) or block-diagonal, I_k kron H_{r/k}
(norm = 1 / sqrt(n / k)). A row x, viewed as an r x A x B array (A*B = 2^p), becomes
S X (H_A kron H_B): the Sylvester part splits into two factors of at most 128, and each
factor is a float32-accurate product on the tensor cores against Sylvester's +-1 matrix. Dots need
every dimension to be at least 16, so S is padded with zeros to 16 or more, and short rows
(r = 1 and A = 1) are stacked several to a program.

- rotate:   y = H_n (s * x)                          (the activations going in)
- unrotate: y = s * (H_n^T sum_k x_k) * scale        (the outputs coming out; it also adds up the
                                                     split-K partial products of trellis_kernels/matmul.py)

The torch references are trellis_runtime.hadamard.rotate and unrotate.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from trellis_kernels.launch import Launch

MAX_SMALL_ORDER = 64  # S padded to at most 64 x 64
MAX_FACTOR = 128  # each Sylvester factor at most 128 x 128
MAX_ELEMENTS = 1 << 15  # one row (padded) held by one program
DOT_MIN = 16
SPLITS_AT_ONCE = tl.constexpr(4)  # partial sums loaded per iteration by the output rotation
OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _split_tf32(a):
    """a as head + tail: head a rounded to tf32 (10 mantissa bits), tail the exact remainder."""
    head = ((a.to(tl.uint32, bitcast=True) + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)
    return head, a - head


@triton.jit
def _sign_dot(a, b, SPLIT_A: tl.constexpr):
    """a @ b on the tensor cores, float32-accurate, when the operand not split (SPLIT_A says
    which is) holds only +-1 and 0, exact in tf32: the split operand's tf32 head and its
    remainder are multiplied in tf32 each. tf32x3 would take three products and split both
    operands; this takes two (half the instructions of the rotation, counted in its sm_90 code).
    The tensor cores truncate the remainder to tf32, which loses at most 2^-21 of the value."""
    if SPLIT_A:
        head, tail = _split_tf32(a)
        out = tl.dot(head, b, input_precision="tf32")
        out = tl.dot(tail, b, out, input_precision="tf32")
    else:
        head, tail = _split_tf32(b)
        out = tl.dot(a, head, input_precision="tf32")
        out = tl.dot(a, tail, out, input_precision="tf32")
    return out


@triton.jit
def _hadamard_kernel(
    x_ptr, signs_ptr, small_ptr, sylvester_a_ptr, sylvester_b_ptr, scale_ptr, out_ptr,
    rows, splits, x_split_stride, x_stride, out_stride, small_stride0, small_stride1, norm,
    R: tl.constexpr, D0: tl.constexpr, A: tl.constexpr, B: tl.constexpr,
    SIGNS_FIRST: tl.constexpr, SCALED: tl.constexpr,
):
    # The block is (D0, A, B). With R == 1, D0 stacks rows of x; otherwise it is the (padded)
    # Kronecker factor of one row and each program owns one row.
    d = tl.arange(0, D0)[:, None, None]
    col_ab = tl.arange(0, A)[None, :, None] * B + tl.arange(0, B)[None, None, :]
    if R == 1:
        row = tl.program_id(0) * D0 + d
        col = col_ab + d * 0
        ok = (row < rows) & (col_ab >= 0)
    else:
        row = tl.program_id(0) + d * 0
        col = d * (A * B) + col_ab
        ok = (d < R) & (col_ab >= 0)
    x = tl.load(x_ptr + row * x_stride + col, mask=ok, other=0.0).to(tl.float32)
    # The split-K partials, SPLITS_AT_ONCE per iteration: their loads are issued together, so
    # the sum waits for memory once per group instead of once per partial.
    for k in range(1, splits, SPLITS_AT_ONCE):
        for j in tl.static_range(SPLITS_AT_ONCE):
            x += tl.load(x_ptr + (k + j) * x_split_stride + row * x_stride + col,
                         mask=ok & (k + j < splits), other=0.0)
    signs = tl.load(signs_ptr + col, mask=ok, other=0).to(tl.float32)
    if SIGNS_FIRST:
        x = x * signs
    # x (D0, A, B) -> x (H_A kron H_B) on each of the D0 slices: first over B, then over A.
    # Each factor is a _sign_dot: H's +-1 entries are exact in tf32, x is split in two tf32 parts.
    h_b = tl.load(sylvester_b_ptr + tl.arange(0, B)[:, None] * B + tl.arange(0, B)[None, :])
    x = _sign_dot(tl.reshape(x, (D0 * A, B)), h_b, True)
    if A > 1:
        h_a = tl.load(sylvester_a_ptr + tl.arange(0, A)[:, None] * A + tl.arange(0, A)[None, :])
        x = tl.permute(tl.reshape(x, (D0, A, B)), (0, 2, 1))
        x = _sign_dot(tl.reshape(x, (D0 * B, A)), h_a, True)
        x = tl.permute(tl.reshape(x, (D0, B, A)), (0, 2, 1))
    if R > 1:  # S on the left: zero-padded rows and columns past R
        i = tl.arange(0, D0)
        small_ok = (i[:, None] < R) & (i[None, :] < R)
        small = tl.load(small_ptr + i[:, None] * small_stride0 + i[None, :] * small_stride1,
                        mask=small_ok, other=0.0)
        x = _sign_dot(small, tl.reshape(x, (D0, A * B)), False)  # S: +-1, 0
    x = tl.reshape(x, (D0, A, B)) * norm
    if SCALED:
        x = x * tl.load(scale_ptr)
    if not SIGNS_FIRST:
        x = x * signs
    tl.store(out_ptr + row * out_stride + col, x.to(out_ptr.dtype.element_ty), mask=ok)


@functools.lru_cache(maxsize=None)
def sylvester(size: int, device: torch.device) -> torch.Tensor:
    """Sylvester's size x size +-1 matrix in float32 on `device`: entry (i, j) = (-1)^popcount(i & j).
    Built once per size and device; callers must not modify it."""
    index = torch.arange(size)
    both = index[:, None] & index[None, :]
    parity = torch.zeros_like(both)
    for bit in range(max(size.bit_length() - 1, 0)):
        parity ^= (both >> bit) & 1
    return (1 - 2 * parity).to(device=device, dtype=torch.float32)


def check_size(n: int, r: int) -> tuple[int, int, int]:
    """(A, B, D0) of the kernel's block for rows of n = r * A * B, or ValueError if unsupported.

    A*B is the power-of-two part, split into two factors of at most MAX_FACTOR (A = 1 below 256);
    D0 is the padded small factor, or with r = 1 the rows stacked per program.
    """
    if n % r or (n // r) & (n // r - 1):
        raise ValueError(f"hadamard: n={n} is not {r} times a power of two")
    power = n // r
    if power < DOT_MIN:
        raise ValueError(f"hadamard: the power-of-two part of n={n} is {power}; need >= {DOT_MIN}")
    p = power.bit_length() - 1
    a = 1 << (p // 2 if p >= 8 else 0)  # both factors >= 16 once 2^p >= 256
    b = power // a
    if a > MAX_FACTOR or b > MAX_FACTOR:
        raise ValueError(f"hadamard: n={n} has a power-of-two part above {MAX_FACTOR ** 2}")
    if r > 1:
        d0 = max(DOT_MIN, triton.next_power_of_2(r))
        if d0 > MAX_SMALL_ORDER:
            raise ValueError(f"hadamard: small factor of order {r} exceeds {MAX_SMALL_ORDER}")
    else:
        d0 = max(1, DOT_MIN // a)  # rows stacked so that every dot has >= 16 rows
    if d0 * a * b > MAX_ELEMENTS:
        raise ValueError(f"hadamard: n={n} (padded {d0 * a * b}) exceeds {MAX_ELEMENTS} elements")
    return a, b, d0


def rotation_launch(x: torch.Tensor, signs: torch.Tensor, small: torch.Tensor | None,
                    scale: torch.Tensor | None, out: torch.Tensor, signs_first: bool,
                    norm: float, num_warps: int | None = None) -> Launch | None:
    """The checked launch that writes `out` (None when it has no rows): rotate_rows and
    unrotate_rows run it."""
    n = x.shape[-1]
    r = 1 if small is None else small.shape[0]
    if small is not None and (small.dim() != 2 or small.shape[1] != r):
        raise ValueError(f"hadamard: the small factor must be square, got {tuple(small.shape)}")
    a, b, d0 = check_size(n, r)
    if signs.shape != (n,):
        raise ValueError(f"hadamard: signs of shape {tuple(signs.shape)} do not match n={n}")
    if x.stride(-1) != 1 or out.stride(-1) != 1 or out.dtype not in OUT_DTYPES:
        raise ValueError("hadamard: rows must have unit stride and out be float32/16/bfloat16")
    rows = out.shape[-2]
    if rows == 0:
        return None
    splits = x.shape[0] if x.dim() == 3 else 1
    small_t = small if small is not None else signs
    grid = (triton.cdiv(rows, d0) if r == 1 else rows,)
    args = (x, signs, small_t, sylvester(a, x.device), sylvester(b, x.device),
            scale if scale is not None else signs, out,
            rows, splits, x.stride(0) if x.dim() == 3 else 0, x.stride(-2), out.stride(-2),
            small_t.stride(0), small_t.stride(-1), float(norm))
    constexprs = dict(R=r, D0=d0, A=a, B=b, SIGNS_FIRST=signs_first, SCALED=scale is not None)
    warps = num_warps or (16 if d0 * a * b >= 16384 else 8 if d0 * a * b >= 4096 else 4)
    return Launch(_hadamard_kernel, grid, args, constexprs, {"num_warps": warps})


def _launch(x: torch.Tensor, signs: torch.Tensor, small: torch.Tensor | None,
            scale: torch.Tensor | None, out: torch.Tensor, signs_first: bool, norm: float,
            num_warps: int | None) -> torch.Tensor:
    launch = rotation_launch(x, signs, small, scale, out, signs_first, norm, num_warps)
    if launch is not None:
        launch.run()
    return out


def rotate_rows(x: torch.Tensor, signs: torch.Tensor, small: torch.Tensor | None,
                out_dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None,
                num_warps: int | None = None, *, norm: float) -> torch.Tensor:
    """H_n (signs * x) for each row of x (rows, n); `small` is S (float32, r x r; [[1]] or None
    when n is a power of two) and `norm` the normalisation of H_n (see the module docstring)."""
    if x.dim() != 2:
        raise ValueError(f"rotate_rows takes (rows, n), got {tuple(x.shape)}")
    if out is None:
        out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    return _launch(x, signs, small, None, out, signs_first=True, norm=norm, num_warps=num_warps)


def unrotate_rows(parts: torch.Tensor, signs: torch.Tensor, small: torch.Tensor | None,
                  scale: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32,
                  out: torch.Tensor | None = None, num_warps: int | None = None, *,
                  norm: float) -> torch.Tensor:
    """signs * (H_n^T sum_k parts[k]) * scale for parts (splits, rows, n) or (rows, n).

    H_n^T only transposes the small factor (Sylvester's matrix is symmetric), so `small` is read
    transposed. `scale` is a float32 (1,) tensor or None; `norm` as for rotate_rows.
    """
    if parts.dim() not in (2, 3):
        raise ValueError(f"unrotate_rows takes (rows, n) or (splits, rows, n), got "
                         f"{tuple(parts.shape)}")
    if out is None:
        out = torch.empty(parts.shape[-2:], dtype=out_dtype, device=parts.device)
    return _launch(parts, signs, None if small is None else small.t(), scale, out,
                   signs_first=False, norm=norm, num_warps=num_warps)
