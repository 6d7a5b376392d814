"""Fused decode + matmul: y = x @ C^T straight from the packed codes; C is never materialized.

C is the matrix of unscaled code values of a quantized weight (its rotated weight divided by the
scale): the caller applies the scale and the output rotation afterwards, in the Hadamard kernel.
The torch reference is `x.double() @ (QuantizedWeight.decode_rotated() / scale).double().T`.

One kernel body serves three kinds of work (its MODE), decoding each (BLOCK_O x BLOCK_I) block
of C in registers with trellis_kernels/trellis_code.py and using it at once:

- GEMV, 1-16 rows (decode steps). The bytes of C dominate, so each program streams a strip of
  BLOCK_O output rows over one slice of the input dimension ("split-K") and every packed word is
  loaded once per call. Enough splits keep every SM streaming even for a 1024-row matrix. Each
  split writes its own partial sums (no atomics, so results are deterministic); the output
  Hadamard kernel adds them up while it reads them. One row multiplies with FMAs in float32;
  2-16 rows use the tensor cores (`tl.dot`) with the rows padded to 16.
- GEMM, more rows (prefill, large batches): programs tile (rows x outputs) and run over the whole
  input dimension with `tl.dot`, decoding each block of C once per block of BLOCK_M rows.
- DECODE: no x; each block is stored, times the scale, into the dense matrix (trellis_kernels/decode.py,
  for the decode-then-cuBLAS path of the largest batches).

Decoding is the cost (a GEMV reads 8x fewer bytes than float16 and must not spend more time), so
the loop is built for few instructions per weight (benchmarks/kernels_sass.py counts them in the
compiled code):
- A lane decodes all 32 positions of its group from K+1 words with constant shifts, and loads the
  next block's words before decoding this one, so that memory latency overlaps the decode.
- Table codes (HYB, small LUTs) are looked up in shared memory: the program holds the table as a
  register tensor and indexes it with one `tl.gather` per block of states. Gathers from global
  memory through L1 are served one cache line at a time; with a lookup per two weights they
  are the likely reason the earlier global-lookup kernel took the same time at K=2, 3 and 4.
- The one-row product keeps the table as float32 pairs (HYB's rows twice, once with the first
  value negated, so that the sign needs no instruction): a looked-up pair is two FMAs away from
  the accumulators. Inputs are read two at a time as one double-width word.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from trellis_kernels.launch import Launch
from trellis_kernels.trellis_code import (TILE_COLS, TILE_DIM, TILE_ROWS, TrellisCode,
                                          check_power_of_two, computed_value, group_state,
                                          group_words, signed_table_index, table_index)

GEMV_MAX_ROWS = 16
# What the shared kernel does with the decoded block: multiply one row with FMAs, multiply rows
# on the tensor cores, or store it (trellis_kernels/decode.py).
FMA = tl.constexpr(0)
DOT = tl.constexpr(1)
DECODE = tl.constexpr(2)
DOT_MIN = 16  # tl.dot needs every dimension of a block to be at least 16
DOT_DTYPES = (torch.float16, torch.bfloat16)
FMA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Programs per SM a GEMV aims for when it chooses its split of the input dimension.
GEMV_PROGRAMS_PER_SM = 4
# Tables of up to this many rows are looked up in shared memory (HYB's 512, held twice by the
# one-row product; LUT up to L=10). A program holds the table in registers between blocks (rows
# / threads words per thread) and stages it in shared memory for each block's lookups.
SHARED_TABLE_ROWS = 1024


@triton.jit
def _state_tree(w0, w1, w2, w3, wn, FIRST: tl.constexpr, COUNT: tl.constexpr,
                STATE_BITS: tl.constexpr, BITS: tl.constexpr, VEC: tl.constexpr):
    """States of steps FIRST..FIRST+COUNT-1 of every group, joined into (pairs, tiles, 2, ..., 2).

    Joins keep each lane's states in its own registers. The trailing dims are the bits of the
    step, least significant first (each join appends the next higher bit).
    """
    if COUNT == 1:
        states = group_state(w0, w1, w2, w3, wn, FIRST, STATE_BITS, BITS, VEC)
    else:
        HALF: tl.constexpr = COUNT // 2
        states = tl.join(_state_tree(w0, w1, w2, w3, wn, FIRST, HALF, STATE_BITS, BITS, VEC),
                         _state_tree(w0, w1, w2, w3, wn, FIRST + HALF, HALF, STATE_BITS, BITS,
                                     VEC))
    return states


@triton.jit
def _codes_of(states, table, table_ptr, fconst, VEC: tl.constexpr, CODE: tl.constexpr,
              MUL: tl.constexpr, ADD: tl.constexpr, AND_MASK: tl.constexpr,
              XOR_MASK: tl.constexpr, MEAN: tl.constexpr, HYB_INDEX_BITS: tl.constexpr,
              TABLE_SHARED: tl.constexpr, FLOAT_PAIRS: tl.constexpr):
    """The code of every state, same shape: float32 values for computed codes, the float16 entry
    of a V=1 table, or a V=2 table row with HYB's sign flip applied: an int32 word of two float16
    (flipped by one XOR) or, with FLOAT_PAIRS, an int64 word of two float32 (first value low)
    from a table that holds HYB's rows twice, the second time with the first value negated.

    A shared table is a register tensor that one gather indexes for all the states at once, so
    it is staged in shared memory once per block of states and every lookup is a shared-memory
    load; otherwise each state is a gather from global memory through L1, where lanes reading
    different cache lines are served one line at a time.
    """
    if CODE <= 1:
        codes = computed_value(states, fconst, CODE, MUL, ADD, AND_MASK, XOR_MASK, MEAN)
    else:
        if FLOAT_PAIRS:
            index = signed_table_index(states, CODE, HYB_INDEX_BITS)
        else:
            index, sign = table_index(states, CODE, HYB_INDEX_BITS)
        if TABLE_SHARED:
            flat = tl.reshape(index, (index.numel,)).to(tl.int32)
            codes = tl.reshape(tl.gather(table, flat, 0), index.shape)
        else:
            codes = tl.load(table_ptr + index)  # every state indexes a valid row
        if VEC == 2 and not FLOAT_PAIRS:
            codes = codes.to(tl.uint32, bitcast=True) ^ sign
    return codes


@triton.jit
def _shared_table(table_ptr, TABLE_ROWS: tl.constexpr, CODE: tl.constexpr,
                  FLOAT_PAIRS: tl.constexpr):
    """The table a program holds in registers for _codes_of's gathers.

    With FLOAT_PAIRS the rows are float32 pairs, and HYB's come twice, the second copy with the
    first value negated (row index + TABLE_ROWS), so that its sign flip costs no instruction.
    """
    if FLOAT_PAIRS:
        COPIES: tl.constexpr = 2 if CODE == 2 else 1
        row = tl.arange(0, COPIES * TABLE_ROWS)
        table = _float_pairs(tl.load(table_ptr + row % TABLE_ROWS))
        table = table ^ ((row >= TABLE_ROWS).to(tl.int64) << 31)
    else:
        table = tl.load(table_ptr + tl.arange(0, TABLE_ROWS))
    return table


@triton.jit
def _float_pairs(words):
    """V=2 table rows, int32 words of two float16, as int64 words of the same two values widened
    (exactly) to float32: a one-row product then multiplies them with no conversion per use."""
    first, second = _pair_values(words, False)
    first = first.to(tl.float32).to(tl.uint32, bitcast=True).to(tl.int64)
    second = second.to(tl.float32).to(tl.uint32, bitcast=True).to(tl.int64)
    return first | (second << 32)


@triton.jit
def _pair_values(words, FLOAT_PAIRS: tl.constexpr):
    """The two values of V=2 table rows: float16 from int32 words, float32 from int64 words."""
    if FLOAT_PAIRS:
        first = words.to(tl.int32).to(tl.float32, bitcast=True)
        second = (words >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    else:
        words = words.to(tl.uint32, bitcast=True)
        first = (words & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True)
        second = (words >> 16).to(tl.uint16).to(tl.float16, bitcast=True)
    return first, second


@triton.jit
def _x_pair(x_base, COLUMN: tl.constexpr, x_cols_ok, EVEN: tl.constexpr):
    """x at the even column COLUMN and the next one of every tile, float32 (1, tiles) each,
    read as one word of twice x's width: half the loads of reading them one by one."""
    if x_base.dtype.element_ty == tl.float32:
        word_type: tl.constexpr = tl.int64
        half_type: tl.constexpr = tl.int32
    else:
        word_type: tl.constexpr = tl.int32
        half_type: tl.constexpr = tl.int16
    ptr = x_base.to(tl.pointer_type(word_type)) + COLUMN // 2
    if EVEN:
        word = tl.load(ptr)
    else:
        word = tl.load(ptr, mask=x_cols_ok, other=0)
    x_type: tl.constexpr = x_base.dtype.element_ty
    first = word.to(half_type).to(x_type, bitcast=True).to(tl.float32)
    second = (word >> half_type.primitive_bitwidth).to(half_type).to(x_type, bitcast=True)
    return first, second.to(tl.float32)


@triton.jit
def _fma(acc0, acc1, values, x, POSITION: tl.constexpr):
    """One row: add values (pairs, tiles) times x (1, tiles), the input at that position's column
    of every tile, to the accumulator of its row (positions 0-15 are row 2g of the tile, 16-31
    row 2g+1)."""
    if POSITION < 16:
        acc0 += values.to(tl.float32) * x
    else:
        acc1 += values.to(tl.float32) * x
    return acc0, acc1


@triton.jit
def _fma_tree(codes, acc0, acc1, x_base, x_cols_ok, FIRST: tl.constexpr, COUNT: tl.constexpr,
              VEC: tl.constexpr, EVEN: tl.constexpr, FLOAT_PAIRS: tl.constexpr):
    """One row: accumulate steps FIRST..FIRST+COUNT-1 of a tree from _codes_of, splitting off
    its last dim (the highest step bit) until the steps of two adjacent positions remain (one
    V=2 step, or two V=1 steps), whose inputs are read in one load."""
    if COUNT * VEC == 2:
        if VEC == 1:
            first, second = tl.split(codes)
        else:
            first, second = _pair_values(codes, FLOAT_PAIRS)
        x0, x1 = _x_pair(x_base, (VEC * FIRST) % 16, x_cols_ok, EVEN)
        acc0, acc1 = _fma(acc0, acc1, first, x0, VEC * FIRST)
        acc0, acc1 = _fma(acc0, acc1, second, x1, VEC * FIRST + 1)
    else:
        HALF: tl.constexpr = COUNT // 2
        low, high = tl.split(codes)
        acc0, acc1 = _fma_tree(low, acc0, acc1, x_base, x_cols_ok, FIRST, HALF, VEC, EVEN,
                               FLOAT_PAIRS)
        acc0, acc1 = _fma_tree(high, acc0, acc1, x_base, x_cols_ok, FIRST + HALF, HALF, VEC,
                               EVEN, FLOAT_PAIRS)
    return acc0, acc1


@triton.jit
def _dot_operand(codes, VEC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr):
    """A tree from _codes_of as the (BLOCK_T*16 inputs, 2*BLOCK_G outputs) operand of tl.dot.

    Position p = V*step + slot of a group is column p % 16 (bits c0..c3) of tile row 2g + p // 16
    (the row bit); the operand's rows run over (tile, c3..c0) and its columns over (pair, row bit).
    """
    if VEC == 1:  # dims (pair, tile, c0, c1, c2, c3, row bit)
        values = tl.permute(codes, (1, 5, 4, 3, 2, 0, 6))
    else:  # dims (pair, tile, c1, c2, c3, row bit, c0): the slot is c0
        first, second = _pair_values(codes, False)
        values = tl.permute(tl.join(first, second), (1, 4, 3, 2, 6, 0, 5))
    return tl.reshape(values, (BLOCK_T * TILE_DIM, 2 * BLOCK_G))


@triton.jit
def _matmul_kernel(
    x_ptr, codes_ptr, table_ptr, scale_ptr, out_ptr,
    rows, out_features, col_tiles, tiles_per_split,
    x_stride, out_split_stride, out_stride, fconst,
    STATE_BITS: tl.constexpr, BITS: tl.constexpr, VEC: tl.constexpr, CODE: tl.constexpr,
    MUL: tl.constexpr, ADD: tl.constexpr, AND_MASK: tl.constexpr, XOR_MASK: tl.constexpr,
    MEAN: tl.constexpr, HYB_INDEX_BITS: tl.constexpr, TABLE_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr, MODE: tl.constexpr,
    EVEN: tl.constexpr,
):
    # A program owns BLOCK_G row pairs (a pair is one tile's group g: rows 2g, 2g+1 of the tile,
    # K packed words) and walks its split of the tile columns BLOCK_T at a time. Each lane loads
    # the K+1 words of its groups once, one block ahead of their use so that the next block's
    # loads are in flight while this one decodes, and decodes their 32 positions with constant
    # shifts. TABLE_ROWS > 0 holds the code table in registers for shared-memory lookups.
    # MODE: FMA (one row), DOT (tensor cores) or DECODE (store C times the scale, no x).
    split = tl.program_id(1)
    pair = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
    pair_ok = pair < out_features // 2
    tile_row = pair // 8
    group = (pair % 8)[:, None]
    row = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = row < rows
    first_tile = split * tiles_per_split
    end_tile = tl.minimum(first_tile + tiles_per_split, col_tiles)
    TABLE_SHARED: tl.constexpr = TABLE_ROWS > 0
    FLOAT_PAIRS: tl.constexpr = TABLE_SHARED and VEC == 2 and MODE == FMA
    if TABLE_SHARED:
        table = _shared_table(table_ptr, TABLE_ROWS, CODE, FLOAT_PAIRS)
    else:
        table = table_ptr  # unused
    STEPS: tl.constexpr = 32 // VEC
    if MODE == DOT:
        acc = tl.zeros((BLOCK_M, 2 * BLOCK_G), tl.float32)
    elif MODE == FMA:  # one row: per-lane partial products, summed over tiles once at the end
        acc0 = tl.zeros((BLOCK_G, BLOCK_T), tl.float32)
        acc1 = tl.zeros((BLOCK_G, BLOCK_T), tl.float32)
    else:
        scale = tl.load(scale_ptr)
        outs = tl.program_id(0) * 2 * BLOCK_G + tl.arange(0, 2 * BLOCK_G)
    # Without EVEN, masked loads read zero words past the split's end (finite garbage values,
    # cancelled by zero inputs); with EVEN every block is whole and the loop has no masks, and
    # the prefetch after the last block rereads the last block instead of leaving the matrix.
    tile_col = first_tile + tl.arange(0, BLOCK_T)
    mask = None if EVEN else pair_ok[:, None] & (tile_col < end_tile)[None, :]
    w0, w1, w2, w3, wn = group_words(codes_ptr, tile_row[:, None] * col_tiles + tile_col[None, :],
                                     group, mask, BITS)
    for tile_col0 in range(first_tile, end_tile, BLOCK_T):
        tile_col = tile_col0 + tl.arange(0, BLOCK_T)
        if EVEN:
            next_col = tl.minimum(tile_col0 + BLOCK_T, end_tile - BLOCK_T) + tl.arange(0, BLOCK_T)
            next_mask = None
            x_cols_ok = tile_row < 0  # unused
        else:
            next_col = tile_col + BLOCK_T
            next_mask = pair_ok[:, None] & (next_col < end_tile)[None, :]
            x_cols_ok = (tile_col < end_tile)[None, :]
        n0, n1, n2, n3, nn = group_words(codes_ptr, tile_row[:, None] * col_tiles
                                         + next_col[None, :], group, next_mask, BITS)
        states = _state_tree(w0, w1, w2, w3, wn, 0, STEPS, STATE_BITS, BITS, VEC)
        codes = _codes_of(states, table, table_ptr, fconst, VEC, CODE, MUL, ADD, AND_MASK,
                          XOR_MASK, MEAN, HYB_INDEX_BITS, TABLE_SHARED, FLOAT_PAIRS)
        if MODE == DECODE:  # C^T block scaled, stored transposed; garbage past the ends masked
            values = _dot_operand(codes, VEC, BLOCK_T, BLOCK_G).to(tl.float32) * scale
            cols = tile_col0 * TILE_DIM + tl.arange(0, BLOCK_T * TILE_DIM)
            ptr = out_ptr + outs[None, :].to(tl.int64) * out_stride + cols[:, None]
            if EVEN:
                tl.store(ptr, values.to(out_ptr.dtype.element_ty))
            else:
                tl.store(ptr, values.to(out_ptr.dtype.element_ty),
                         mask=(cols < end_tile * TILE_DIM)[:, None]
                         & (outs < out_features)[None, :])
        elif MODE == DOT:
            values = _dot_operand(codes, VEC, BLOCK_T, BLOCK_G)
            cols = tile_col0 * TILE_DIM + tl.arange(0, BLOCK_T * TILE_DIM)
            if EVEN:
                x_mask = row_ok[:, None]
            else:
                x_mask = row_ok[:, None] & (cols < end_tile * TILE_DIM)[None, :]
            x = tl.load(x_ptr + row[:, None] * x_stride + cols[None, :], mask=x_mask, other=0.0)
            acc = tl.dot(x, values.to(x.dtype), acc)
        else:  # row < rows: one program per row
            x_base = x_ptr + row[:, None] * x_stride + tile_col[None, :] * TILE_DIM
            acc0, acc1 = _fma_tree(codes, acc0, acc1, x_base, x_cols_ok, 0, STEPS, VEC, EVEN,
                                   FLOAT_PAIRS)
        w0, w1, w2, w3, wn = n0, n1, n2, n3, nn
    out = out_ptr + split * out_split_stride
    if MODE == DOT:
        outs = tl.program_id(0) * 2 * BLOCK_G + tl.arange(0, 2 * BLOCK_G)
        tl.store(out + row[:, None] * out_stride + outs[None, :], acc,
                 mask=row_ok[:, None] & (outs < out_features)[None, :])
    elif MODE == FMA:
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


def kernel_launch(x: torch.Tensor | None, codes: torch.Tensor, code: TrellisCode,
                  out: torch.Tensor, grid: tuple[int, int, int], tiles_per_split: int,
                  block_m: int, block_g: int, block_t: int, mode: tl.constexpr, num_warps: int,
                  num_stages: int, scale: torch.Tensor | None = None,
                  shared_tables: bool = True) -> Launch:
    """The shared kernel's launch: x (rows, in) for FMA and DOT, the (1,) float32 scale for
    DECODE (out is then the decoded matrix). Arguments are checked by the callers. Tables of up
    to SHARED_TABLE_ROWS are looked up in shared memory unless `shared_tables` is False."""
    col_tiles = codes.shape[1]
    even = (codes.shape[0] * TILE_ROWS) % (2 * block_g) == 0 and col_tiles % tiles_per_split == 0 \
        and tiles_per_split % block_t == 0
    table = _packed_table(code, codes)
    copies = 2 if code.code == "hyb" and mode.value == FMA.value else 1  # see _shared_table
    shared_rows = table.shape[0] if shared_tables and table is not codes \
        and copies * table.shape[0] <= SHARED_TABLE_ROWS else 0
    rows, x_stride = (x.shape[0], x.stride(0)) if x is not None else (0, 0)
    args = (codes if x is None else x, codes, table, codes if scale is None else scale, out,
            rows, codes.shape[0] * TILE_ROWS, codes.shape[1], tiles_per_split, x_stride,
            out.stride(0) if out.dim() == 3 else 0, out.stride(-2), code.fconst())
    constexprs = dict(code.constexprs(), TABLE_ROWS=shared_rows, BLOCK_M=block_m,
                      BLOCK_G=block_g, BLOCK_T=block_t, MODE=mode.value, EVEN=even)
    return Launch(_matmul_kernel, grid, args, constexprs,
                  {"num_warps": num_warps, "num_stages": num_stages})


def _packed_table(code: TrellisCode, placeholder: torch.Tensor) -> torch.Tensor:
    """The table as the kernel reads it: float16 entries (TrellisCode checked them), a V=2 row as
    one int32 word."""
    if code.table is None or code.code not in ("hyb", "lut"):
        return placeholder
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
    return splits_for(out_features, col_tiles, block_rows, block_tiles, _multiprocessors(device))


def splits_for(out_features: int, col_tiles: int, block_rows: int, block_tiles: int,
               multiprocessors: int) -> int:
    """Splits of the input dimension that give each of `multiprocessors` SMs a few programs."""
    programs = GEMV_PROGRAMS_PER_SM * multiprocessors
    col_blocks = triton.cdiv(col_tiles, block_tiles)
    return max(1, min(col_blocks, triton.cdiv(programs, triton.cdiv(out_features, block_rows))))


# Block shapes (block_rows, block_tiles, num_warps) of the GEMV: the fastest of a sweep on an H200
# (benchmarks/kernels_gpu.py, gemv_configs) for 4096x4096 and 14336x4096 at K=2.
GEMV_BLOCKS = {"fma": (256, 2, 8), "dot": (128, 2, 4)}


def gemv_partials(x: torch.Tensor, codes: torch.Tensor, code: TrellisCode,
                  splits: int | None = None, block_rows: int | None = None,
                  block_tiles: int | None = None, num_warps: int | None = None,
                  num_stages: int = 2, out: torch.Tensor | None = None,
                  shared_tables: bool = True) -> torch.Tensor:
    """Split-K partial products (splits, rows, out) float32 of x (rows <= 16, in) with C^T.

    Their sum over the first dimension is x @ C^T. A program covers `block_rows` output rows and
    walks `block_tiles` tile columns (16 inputs each) per iteration (defaults: GEMV_BLOCKS). One
    row multiplies in float32 (x may be float32/float16/bfloat16); more rows use tl.dot (x
    float16/bfloat16, rows padded to 16, block_rows at least 16). `out` may be a preallocated
    contiguous (splits, rows, out) float32 buffer (CUDA graphs keep it static); `splits` is then
    fixed by it. `shared_tables=False` reads tables from global memory (to compare the two).
    """
    launch, out = gemv_launch(x, codes, code, splits, block_rows, block_tiles, num_warps,
                              num_stages, out, shared_tables)
    launch.run()
    return out


def gemv_launch(x: torch.Tensor, codes: torch.Tensor, code: TrellisCode,
                splits: int | None = None, block_rows: int | None = None,
                block_tiles: int | None = None, num_warps: int | None = None,
                num_stages: int = 2, out: torch.Tensor | None = None,
                shared_tables: bool = True) -> tuple[Launch, torch.Tensor]:
    """gemv_partials' launch and output buffer, checked and built but not run."""
    rows = x.shape[0] if x.dim() == 2 else -1
    use_dot = rows > 1
    _check(x, codes, code, DOT_DTYPES if use_dot else FMA_DTYPES)
    if not use_dot and (x.data_ptr() % (2 * x.element_size()) or x.stride(0) % 2):
        raise ValueError("a one-row x must start at an even element with an even row stride "
                         "(the kernel reads its inputs two at a time)")
    default_rows, default_tiles, default_warps = GEMV_BLOCKS["dot" if use_dot else "fma"]
    block_rows = block_rows or default_rows
    block_tiles = block_tiles or default_tiles
    num_warps = num_warps or default_warps
    if not 1 <= rows <= GEMV_MAX_ROWS:
        raise ValueError(f"gemv takes 1..{GEMV_MAX_ROWS} rows, got {rows}; use gemm")
    _check_blocks("gemv", {"block_rows": block_rows}, DOT_MIN if use_dot else 2)
    _check_blocks("gemv", {"block_tiles": block_tiles}, 1)
    row_tiles, col_tiles, _ = codes.shape
    out_features = row_tiles * TILE_ROWS
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
    return kernel_launch(x, codes, code, out, grid, tiles_per_split, DOT_MIN if use_dot else 1,
                         block_rows // 2, block_tiles, DOT if use_dot else FMA, num_warps,
                         num_stages, shared_tables=shared_tables), out


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
    rows, out_features, col_tiles = x.shape[0], codes.shape[0] * TILE_ROWS, codes.shape[1]
    shape = (rows, out_features)
    if out is None:
        out = torch.empty(shape, dtype=torch.float32, device=codes.device)
    elif tuple(out.shape) != shape or out.dtype != torch.float32 or out.stride(1) != 1:
        raise ValueError(f"gemm out must be float32 {shape} with unit column stride")
    if rows == 0:
        return out
    grid = (triton.cdiv(out_features, block_rows), 1, triton.cdiv(rows, block_m))
    kernel_launch(x, codes, code, out, grid, max(col_tiles, 1), block_m, block_rows // 2,
                  block_tiles, DOT, num_warps, num_stages).run()
    return out
