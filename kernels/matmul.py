"""Fused decode + matmul: y = x @ C^T straight from the packed codes; C is never materialized.

C is the matrix of unscaled code values of a quantized weight (its rotated weight divided by the
scale): the caller applies the scale and the output rotation afterwards, in the Hadamard kernel.
The torch reference is `x.double() @ (QuantizedWeight.decode_rotated() / scale).double().T`.

One kernel body serves both shapes of work, decoding each (BLOCK_O x BLOCK_I) block of C in
registers with kernels/tile.py and multiplying it at once:

- GEMV, 1-16 rows (decode steps). The bytes of C dominate, so each program streams a strip of
  BLOCK_O output rows over one slice of the input dimension ("split-K") and every packed word is
  loaded once per call. Enough splits keep every SM streaming even for a 1024-row matrix. Each
  split writes its own partial sums (no atomics, so results are deterministic); the output
  Hadamard kernel adds them up while it reads them. One row multiplies with FMAs in float32;
  2-16 rows use the tensor cores (`tl.dot`) with the rows padded to 16.
- GEMM, more rows (prefill, large batches): programs tile (rows x outputs) and run over the whole
  input dimension with `tl.dot`, decoding each block of C once per block of BLOCK_M rows.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kernels.tile import (TILE_COLS, TILE_DIM, TrellisCode, check_power_of_two, computed_value,
                          group_state, group_words, table_index)

GEMV_MAX_ROWS = 16
DOT_MIN = 16  # tl.dot needs every dimension of a block to be at least 16
DOT_DTYPES = (torch.float16, torch.bfloat16)
FMA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Programs per SM a GEMV aims for when it chooses its split of the input dimension.
GEMV_PROGRAMS_PER_SM = 4


@triton.jit
def _step_values(w0, w1, w2, w3, wn, table_ptr, fconst, STEP: tl.constexpr,
                 STATE_BITS: tl.constexpr, BITS: tl.constexpr, VEC: tl.constexpr,
                 CODE: tl.constexpr, MUL: tl.constexpr, ADD: tl.constexpr,
                 AND_MASK: tl.constexpr, XOR_MASK: tl.constexpr, MEAN: tl.constexpr,
                 HYB_INDEX_BITS: tl.constexpr):
    """Values of step STEP of every group: (pairs, tiles), or (pairs, tiles, 2) when V=2.

    Computed codes give float32, table codes their float16 entries. A V=2 table row is read as
    one 32-bit word (table_ptr then points at int32 words) and HYB's sign flip is one XOR.
    """
    state = group_state(w0, w1, w2, w3, wn, STEP, STATE_BITS, BITS, VEC)
    if CODE <= 1:
        values = computed_value(state, fconst, CODE, MUL, ADD, AND_MASK, XOR_MASK, MEAN)
    else:
        index, sign = table_index(state, CODE, HYB_INDEX_BITS)
        if VEC == 1:
            values = tl.load(table_ptr + index)  # every state indexes a valid row
        else:
            row = tl.load(table_ptr + index).to(tl.uint32, bitcast=True)
            row = row ^ sign
            first = (row & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True)
            second = (row >> 16).to(tl.uint16).to(tl.float16, bitcast=True)
            values = tl.join(first, second)
    return values


@triton.jit
def _values_tree(w0, w1, w2, w3, wn, table_ptr, fconst, FIRST: tl.constexpr,
                 COUNT: tl.constexpr, STATE_BITS: tl.constexpr, BITS: tl.constexpr,
                 VEC: tl.constexpr, CODE: tl.constexpr, MUL: tl.constexpr, ADD: tl.constexpr,
                 AND_MASK: tl.constexpr, XOR_MASK: tl.constexpr, MEAN: tl.constexpr,
                 HYB_INDEX_BITS: tl.constexpr):
    """Values of group positions FIRST..FIRST+COUNT-1, joined into (pairs, tiles, 2, ..., 2).

    Joins keep each lane's values in its own registers. The trailing dims are the bits of the
    position, least significant first (each join appends the next higher bit).
    """
    if COUNT == VEC:
        values = _step_values(w0, w1, w2, w3, wn, table_ptr, fconst, FIRST // VEC,
                              STATE_BITS, BITS, VEC, CODE, MUL, ADD, AND_MASK, XOR_MASK, MEAN,
                              HYB_INDEX_BITS)
    else:
        HALF: tl.constexpr = COUNT // 2
        values = tl.join(
            _values_tree(w0, w1, w2, w3, wn, table_ptr, fconst, FIRST, HALF, STATE_BITS,
                         BITS, VEC, CODE, MUL, ADD, AND_MASK, XOR_MASK, MEAN, HYB_INDEX_BITS),
            _values_tree(w0, w1, w2, w3, wn, table_ptr, fconst, FIRST + HALF, HALF,
                         STATE_BITS, BITS, VEC, CODE, MUL, ADD, AND_MASK, XOR_MASK, MEAN,
                         HYB_INDEX_BITS))
    return values


@triton.jit
def _fma(acc0, acc1, values, POSITION: tl.constexpr, x_base, x_cols_ok, EVEN: tl.constexpr):
    """One row: add values (pairs, tiles) times x at that position's column of every tile to the
    accumulator of its row (positions 0-15 are row 2g of the tile, 16-31 row 2g+1)."""
    if EVEN:
        x = tl.load(x_base + POSITION % 16).to(tl.float32)  # (1, tiles)
    else:
        x = tl.load(x_base + POSITION % 16, mask=x_cols_ok, other=0.0).to(tl.float32)
    if POSITION < 16:
        acc0 += values.to(tl.float32) * x
    else:
        acc1 += values.to(tl.float32) * x
    return acc0, acc1


@triton.jit
def _matmul_kernel(
    x_ptr, codes_ptr, table_ptr, out_ptr,
    rows, out_features, col_tiles, tiles_per_split,
    x_stride, out_split_stride, out_stride, fconst,
    STATE_BITS: tl.constexpr, BITS: tl.constexpr, VEC: tl.constexpr, CODE: tl.constexpr,
    MUL: tl.constexpr, ADD: tl.constexpr, AND_MASK: tl.constexpr, XOR_MASK: tl.constexpr,
    MEAN: tl.constexpr, HYB_INDEX_BITS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr, USE_DOT: tl.constexpr,
    EVEN: tl.constexpr,
):
    # A program owns BLOCK_G row pairs (a pair is one tile's group g: rows 2g, 2g+1 of the tile,
    # K packed words) and walks its split of the tile columns BLOCK_T at a time. Each lane loads
    # the K+1 words of its groups once and decodes their 32 positions with constant shifts.
    split = tl.program_id(1)
    pair = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
    pair_ok = pair < out_features // 2
    tile_row = pair // 8
    group = (pair % 8)[:, None]
    row = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = row < rows
    first_tile = split * tiles_per_split
    end_tile = tl.minimum(first_tile + tiles_per_split, col_tiles)
    if USE_DOT:
        acc = tl.zeros((BLOCK_M, 2 * BLOCK_G), tl.float32)
    else:  # one row: per-lane partial products, summed over tiles once at the end
        acc0 = tl.zeros((BLOCK_G, BLOCK_T), tl.float32)
        acc1 = tl.zeros((BLOCK_G, BLOCK_T), tl.float32)
    for tile_col0 in range(first_tile, end_tile, BLOCK_T):
        tile_col = tile_col0 + tl.arange(0, BLOCK_T)
        # Without EVEN, zero inputs past the split's end cancel the garbage decoded there.
        if EVEN:  # whole blocks everywhere: no masks in the loop
            mask = None
            x_cols_ok = tile_row < 0  # unused
        else:
            col_ok = tile_col < end_tile
            mask = pair_ok[:, None] & col_ok[None, :]
            x_cols_ok = col_ok[None, :]
        tile = tile_row[:, None] * col_tiles + tile_col[None, :]
        w0, w1, w2, w3, wn = group_words(codes_ptr, tile, group, mask, BITS)
        if USE_DOT:
            values = _values_tree(w0, w1, w2, w3, wn, table_ptr, fconst, 0, 32,
                                  STATE_BITS, BITS, VEC, CODE, MUL, ADD, AND_MASK, XOR_MASK,
                                  MEAN, HYB_INDEX_BITS)  # (pair, tile, c0, c1, c2, c3, row bit)
            values = tl.permute(values, (1, 5, 4, 3, 2, 0, 6))  # (tile, c3..c0, pair, row bit)
            values = tl.reshape(values, (BLOCK_T * TILE_DIM, 2 * BLOCK_G))
            cols = tile_col0 * TILE_DIM + tl.arange(0, BLOCK_T * TILE_DIM)
            if EVEN:
                x_mask = row_ok[:, None]
            else:
                x_mask = row_ok[:, None] & (cols < end_tile * TILE_DIM)[None, :]
            x = tl.load(x_ptr + row[:, None] * x_stride + cols[None, :], mask=x_mask, other=0.0)
            acc = tl.dot(x, values.to(x.dtype), acc)
        else:  # row < rows: one program per row
            x_base = x_ptr + row[:, None] * x_stride + tile_col[None, :] * TILE_DIM
            for step in tl.static_range(32 // VEC):
                values = _step_values(w0, w1, w2, w3, wn, table_ptr, fconst, step,
                                      STATE_BITS, BITS, VEC, CODE, MUL, ADD, AND_MASK, XOR_MASK,
                                      MEAN, HYB_INDEX_BITS)
                if VEC == 1:
                    acc0, acc1 = _fma(acc0, acc1, values, step, x_base, x_cols_ok, EVEN)
                else:
                    first, second = tl.split(values)
                    acc0, acc1 = _fma(acc0, acc1, first, 2 * step, x_base, x_cols_ok, EVEN)
                    acc0, acc1 = _fma(acc0, acc1, second, 2 * step + 1, x_base, x_cols_ok, EVEN)
    out = out_ptr + split * out_split_stride
    if USE_DOT:
        outs = tl.program_id(0) * 2 * BLOCK_G + tl.arange(0, 2 * BLOCK_G)
        tl.store(out + row[:, None] * out_stride + outs[None, :], acc,
                 mask=row_ok[:, None] & (outs < out_features)[None, :])
    else:
        ptr = out + row * out_stride + 2 * pair
        tl.store(ptr, tl.sum(acc0, axis=1), mask=pair_ok)
        tl.store(ptr + 1, tl.sum(acc1, axis=1), mask=pair_ok)


def _check(x: torch.Tensor, codes: torch.Tensor, code: TrellisCode, dtypes: tuple) -> None:
    code.check_codes(codes)
    if x.dim() != 2 or x.shape[1] != codes.shape[1] * TILE_COLS or x.stride(1) != 1:
        raise ValueError(f"x must be (rows, {codes.shape[1] * TILE_COLS}) with unit column "
                         f"stride, got {tuple(x.shape)} strides {x.stride()}")
    if x.dtype not in dtypes:
        raise ValueError(f"x must be one of {dtypes}, got {x.dtype}")
    if x.device != codes.device:
        raise ValueError(f"x is on {x.device} but codes are on {codes.device}")


def _launch(x: torch.Tensor, codes: torch.Tensor, code: TrellisCode, out: torch.Tensor,
            grid: tuple[int, int, int], tiles_per_split: int, block_m: int, block_g: int,
            block_t: int, use_dot: bool, num_warps: int, num_stages: int) -> None:
    col_tiles = codes.shape[1]
    even = (codes.shape[0] * 16) % (2 * block_g) == 0 and col_tiles % tiles_per_split == 0 \
        and tiles_per_split % block_t == 0
    _matmul_kernel[grid](
        x, codes, _packed_table(code, codes), out, x.shape[0], codes.shape[0] * 16,
        codes.shape[1], tiles_per_split, x.stride(0), out.stride(0) if out.dim() == 3 else 0,
        out.stride(-2), code.fconst(), **code.constexprs(), BLOCK_M=block_m, BLOCK_G=block_g, BLOCK_T=block_t,
        USE_DOT=use_dot, EVEN=even, num_warps=num_warps, num_stages=num_stages,
    )


def _packed_table(code: TrellisCode, placeholder: torch.Tensor) -> torch.Tensor:
    """The table as the matmul kernel reads it: float16 entries, a V=2 row as one int32 word."""
    if code.table is None or code.code not in ("hyb", "lut"):
        return placeholder
    if code.table.dtype != torch.float16 or not code.table.is_contiguous():
        raise ValueError(f"the fused matmul reads a contiguous float16 {code.code} table, got "
                         f"{code.table.dtype}")
    table = code.table.to(placeholder.device)
    return table.view(torch.int32) if code.vec == 2 else table


def _check_blocks(kernel: str, blocks: dict[str, int], minimum: int) -> None:
    for name, value in blocks.items():
        check_power_of_two(f"{kernel} {name}", value)
        if value < minimum:
            raise ValueError(f"{kernel} {name} must be at least {minimum}, got {value}")


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def default_splits(out_features: int, col_tiles: int, block_rows: int, block_tiles: int,
                   device: torch.device) -> int:
    """Splits of the input dimension that give every SM a few programs (1 off the GPU)."""
    if device.type != "cuda":
        return 1
    programs = GEMV_PROGRAMS_PER_SM * _multiprocessors(device)
    col_blocks = triton.cdiv(col_tiles, block_tiles)
    return max(1, min(col_blocks, triton.cdiv(programs, triton.cdiv(out_features, block_rows))))


# Block shapes (block_rows, block_tiles, num_warps) of the GEMV: the fastest of a sweep on an H200
# (benchmarks/kernels_gpu.py, gemv_configs) for 4096x4096 and 14336x4096 at K=2.
GEMV_BLOCKS = {"fma": (256, 2, 8), "dot": (128, 2, 4)}


def gemv_partials(x: torch.Tensor, codes: torch.Tensor, code: TrellisCode,
                  splits: int | None = None, block_rows: int | None = None,
                  block_tiles: int | None = None, num_warps: int | None = None,
                  num_stages: int = 2, out: torch.Tensor | None = None) -> torch.Tensor:
    """Split-K partial products (splits, rows, out) float32 of x (rows <= 16, in) with C^T.

    Their sum over the first dimension is x @ C^T. A program covers `block_rows` output rows and
    walks `block_tiles` tile columns (16 inputs each) per iteration (defaults: GEMV_BLOCKS). One row multiplies in float32
    (x may be float32/float16/bfloat16); more rows use tl.dot (x float16/bfloat16, rows padded to
    16, block_rows at least 16). `out` may be a preallocated contiguous
    (splits, rows, out) float32 buffer (CUDA graphs keep it static); `splits` is then fixed by it.
    """
    rows = x.shape[0] if x.dim() == 2 else -1
    use_dot = rows > 1
    _check(x, codes, code, DOT_DTYPES if use_dot else FMA_DTYPES)
    default_rows, default_tiles, default_warps = GEMV_BLOCKS["dot" if use_dot else "fma"]
    block_rows = block_rows or default_rows
    block_tiles = block_tiles or default_tiles
    num_warps = num_warps or default_warps
    if not 1 <= rows <= GEMV_MAX_ROWS:
        raise ValueError(f"gemv takes 1..{GEMV_MAX_ROWS} rows, got {rows}; use gemm")
    _check_blocks("gemv", {"block_rows": block_rows}, DOT_MIN if use_dot else 2)
    _check_blocks("gemv", {"block_tiles": block_tiles}, 1)
    row_tiles, col_tiles, _ = codes.shape
    out_features = row_tiles * 16
    if out is not None and out.dim() == 3:
        splits = out.shape[0]
    elif splits is None:
        splits = default_splits(out_features, col_tiles, block_rows, block_tiles, codes.device)
    tiles_per_split = split_tiles(col_tiles, splits, block_tiles)
    shape = (triton.cdiv(col_tiles, tiles_per_split) if col_tiles else 1, rows, out_features)
    if out is None:
        out = torch.empty(shape, dtype=torch.float32, device=codes.device)
    elif tuple(out.shape) != shape or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"gemv out must be a contiguous float32 {shape}, got "
                         f"{tuple(out.shape)} {out.dtype}")
    grid = (triton.cdiv(out_features, block_rows), shape[0], 1 if use_dot else rows)
    _launch(x, codes, code, out, grid, tiles_per_split, DOT_MIN if use_dot else 1,
            block_rows // 2, block_tiles, use_dot, num_warps, num_stages)
    return out


def split_tiles(col_tiles: int, splits: int, block_tiles: int) -> int:
    """Tile columns per split: whole blocks, so that the splits cover col_tiles with none empty
    (their number is then cdiv(col_tiles, result))."""
    if splits < 1:
        raise ValueError(f"gemv splits must be at least 1, got {splits}")
    return max(1, triton.cdiv(triton.cdiv(col_tiles, splits), block_tiles)) * block_tiles


def gemm(x: torch.Tensor, codes: torch.Tensor, code: TrellisCode, block_m: int = 64,
         block_rows: int = 128, block_tiles: int = 4, num_warps: int = 8, num_stages: int = 2,
         out: torch.Tensor | None = None) -> torch.Tensor:
    """x @ C^T, (rows, out) float32, for float16/bfloat16 x of any number of rows, with tl.dot.

    A program covers block_m rows of x and block_rows outputs, walking the whole input dimension
    block_tiles tile columns at a time.
    """
    _check(x, codes, code, DOT_DTYPES)
    _check_blocks("gemm", {"block_m": block_m, "block_rows": block_rows}, DOT_MIN)
    _check_blocks("gemm", {"block_tiles": block_tiles}, 1)
    rows, out_features, col_tiles = x.shape[0], codes.shape[0] * 16, codes.shape[1]
    shape = (rows, out_features)
    if out is None:
        out = torch.empty(shape, dtype=torch.float32, device=codes.device)
    elif tuple(out.shape) != shape or out.dtype != torch.float32 or out.stride(1) != 1:
        raise ValueError(f"gemm out must be float32 {shape} with unit column stride")
    if rows == 0:
        return out
    grid = (triton.cdiv(out_features, block_rows), 1, triton.cdiv(rows, block_m))
    _launch(x, codes, code, out, grid, max(col_tiles, 1), block_m, block_rows // 2, block_tiles,
            True, num_warps, num_stages)
    return out
