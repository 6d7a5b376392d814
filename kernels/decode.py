"""Trellis decode kernel: packed tile bitstreams -> the rotated, scaled float32 weight matrix.

The packed layout is described once, in trellis_runtime/bitstream.py; this module imports nothing
from the project, so every layout and code fact arrives as an argument or constexpr:

- codes (rt, ct, 8K) int32: tile (r, c) of the (rt*16, ct*16) matrix holds a 256*K-bit stream in
  8K words, most significant bit first, tiles row-major.
- Tile position p (= 16*row + col inside the tile) is slot p % V of step t = p // V. The state of
  step t is the L-bit window starting at bit t*K*V, circular within the tile: it is read from word
  j = start // 32 and word (j + 1) % 8K with unsigned 32-bit shifts.
- The code maps the state to a float32 value (formulas and constants in trellis_runtime/codes.py,
  passed here through `constants`); the value is multiplied by the scale.

The torch reference is trellis_runtime.quantized.QuantizedWeight.decode_rotated; the kernel agrees
with it bit for bit (every step is exact integer work, an exact fp16->fp32 widening, or the same
float32 multiplies/adds in the same order).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

TILE_ROWS = 16
TILE_COLS = 16
TILE_SIZE = TILE_ROWS * TILE_COLS

# Code ids (constexpr) and the V each code can emit.
CODE_IDS = {"1mad": 0, "3inst": 1, "hyb": 2, "lut": 3}
SUPPORTED_VEC = {"1mad": (1,), "3inst": (1,), "hyb": (2,), "lut": (1, 2)}
# Constants each code needs from the caller (trellis_runtime/codes.py is their one definition).
REQUIRED_CONSTANTS = {
    "1mad": ("mad_mul", "mad_add", "mad_mean", "mad_inv_std"),
    "3inst": ("inst_mul", "inst_add", "inst_and", "inst_xor", "inst_rms"),
    "hyb": ("hyb_index_bits",),
    "lut": (),
}
MAX_STATE_BITS = 16  # a window then spans at most two words (offset + L <= 31 + 16 < 64)
MAX_BITS = 4
TABLE_DTYPES = (torch.float16, torch.float32)


@triton.jit
def _decode_kernel(
    codes_ptr, table_ptr, scale_ptr, out_ptr,
    num_tiles, col_tiles, out_stride, table_stride,
    fconst,  # float32 multiplier of the computed codes (1/std for 1MAD, 1/RMS for 3INST)
    STATE_BITS: tl.constexpr, BITS: tl.constexpr, VEC: tl.constexpr, CODE: tl.constexpr,
    MUL: tl.constexpr, ADD: tl.constexpr, AND_MASK: tl.constexpr, XOR_MASK: tl.constexpr,
    MEAN: tl.constexpr, HYB_INDEX_BITS: tl.constexpr,
    TILES_PER_PROGRAM: tl.constexpr,
):
    WORDS: tl.constexpr = 8 * BITS
    pid = tl.program_id(0)
    tile = pid * TILES_PER_PROGRAM + tl.arange(0, TILES_PER_PROGRAM)  # (T,)
    pos = tl.arange(0, 256)  # (256,) position inside a tile
    tile_ok = tile < num_tiles
    tile2 = tile[:, None]
    pos2 = pos[None, :]
    mask = tile_ok[:, None] & (pos2 >= 0)  # (T, 256)

    # Step, slot and the state window of every position.
    step = pos2 // VEC
    slot = pos2 % VEC
    start = step * (BITS * VEC)
    first = start // 32
    nxt = (first + 1) % WORDS
    offset = (start % 32).to(tl.uint32)
    word_base = codes_ptr + tile2.to(tl.int64) * WORDS
    w0 = tl.load(word_base + first, mask=mask, other=0).to(tl.uint32, bitcast=True)
    w1 = tl.load(word_base + nxt, mask=mask, other=0).to(tl.uint32, bitcast=True)
    # The 32 bits starting `offset` bits into w0; (w1 >> 1) >> (31 - offset) keeps every shift
    # below 32, so offset 0 (which contributes nothing from w1) needs no special case.
    window = (w0 << offset) | ((w1 >> 1) >> (31 - offset))
    state = window >> (32 - STATE_BITS)  # uint32 in [0, 2^L)

    if CODE == 0:  # 1MAD: byte sum of a*s + b (mod 2^32), centred and scaled
        x = state * tl.cast(MUL, tl.uint32) + tl.cast(ADD, tl.uint32)
        byte_sum = (x & 0xFF) + ((x >> 8) & 0xFF) + ((x >> 16) & 0xFF) + (x >> 24)
        value = (byte_sum.to(tl.int32) - MEAN).to(tl.float32) * fconst
    elif CODE == 1:  # 3INST: masked a*s + b read as two fp16 halves, summed, divided by the RMS
        x = state * tl.cast(MUL, tl.uint32) + tl.cast(ADD, tl.uint32)
        r = (x & tl.cast(AND_MASK, tl.uint32)) ^ tl.cast(XOR_MASK, tl.uint32)
        hi = (r >> 16).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        lo = (r & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        value = (hi + lo) * fconst
    elif CODE == 2:  # HYB: hash s*(s+1) mod 2^16 into a 2-D table row; bit 15 negates slot 0
        h = (state * (state + 1)) & 0xFFFF
        index = (h >> (15 - HYB_INDEX_BITS)) & ((1 << HYB_INDEX_BITS) - 1)
        entry = tl.load(table_ptr + index.to(tl.int64) * table_stride + slot, mask=mask, other=0.0)
        entry = entry.to(tl.float32)
        flip = ((h >> 15) != 0) & (slot == 0)
        value = tl.where(flip, -entry, entry)
    else:  # LUT: the state indexes a full 2^L x V table
        entry = tl.load(table_ptr + state.to(tl.int64) * table_stride + slot, mask=mask, other=0.0)
        value = entry.to(tl.float32)

    scale = tl.load(scale_ptr)
    value = value * scale

    row = (tile2 // col_tiles) * 16 + pos2 // 16
    col = (tile2 % col_tiles) * 16 + pos2 % 16
    tl.store(out_ptr + row.to(tl.int64) * out_stride + col, value, mask=mask)


def _check(codes: torch.Tensor, state_bits: int, bits: int, vec: int, code: str,
           table: torch.Tensor | None, constants: dict) -> None:
    if code not in CODE_IDS:
        raise ValueError(f"decode kernel: unknown code {code!r}; supported: {', '.join(CODE_IDS)}")
    if vec not in SUPPORTED_VEC[code]:
        raise ValueError(f"decode kernel: code {code} does not support V={vec}")
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"decode kernel: K={bits} unsupported; use 1..{MAX_BITS}")
    if not 1 <= state_bits <= MAX_STATE_BITS:
        raise ValueError(f"decode kernel: L={state_bits} unsupported; use <= {MAX_STATE_BITS}")
    if bits * vec >= state_bits:
        raise ValueError(f"decode kernel: need K*V < L, got K={bits} V={vec} L={state_bits}")
    if codes.dtype != torch.int32 or codes.dim() != 3 or codes.shape[2] != 8 * bits:
        raise ValueError(f"decode kernel: codes must be int32 (rt, ct, {8 * bits}), got "
                         f"{tuple(codes.shape)} {codes.dtype}")
    missing = [k for k in REQUIRED_CONSTANTS[code] if k not in constants]
    if missing:
        raise ValueError(f"decode kernel: code {code} needs constants {', '.join(missing)}")
    if code in ("hyb", "lut"):
        if table is None:
            raise ValueError(f"decode kernel: code {code} needs its table")
        if code == "hyb":
            index_bits = int(constants["hyb_index_bits"])
            if not 1 <= index_bits <= 15:
                raise ValueError(f"decode kernel: hyb_index_bits={index_bits} unsupported")
            expected = (1 << index_bits, 2)
        else:
            expected = (1 << state_bits, vec)
        if tuple(table.shape) != expected:
            raise ValueError(f"decode kernel: {code} table must be {expected}, got "
                             f"{tuple(table.shape)}")
        if table.dtype not in TABLE_DTYPES or table.stride(1) != 1:
            raise ValueError(f"decode kernel: table must be row-contiguous float16/float32, got "
                             f"{table.dtype} strides {table.stride()}")


def decode_matrix(codes: torch.Tensor, state_bits: int, bits: int, vec: int, code: str,
                  table: torch.Tensor | None, scale: float | torch.Tensor, constants: dict,
                  out: torch.Tensor | None = None, tiles_per_program: int = 4,
                  num_warps: int = 4) -> torch.Tensor:
    """Decode packed tiles `codes` (rt, ct, 8K) int32 into the float32 (rt*16, ct*16) matrix.

    `constants` holds the code constants (from trellis_runtime/codes.py): 1mad needs mad_mul,
    mad_add, mad_mean, mad_inv_std; 3inst needs inst_mul, inst_add, inst_and, inst_xor, inst_rms;
    hyb needs hyb_index_bits. `out`, if given, must be a float32 (rt*16, ct*16) tensor with unit
    column stride. Raises ValueError for combinations the kernel does not implement.
    """
    _check(codes, state_bits, bits, vec, code, table, constants)
    if tiles_per_program < 1 or tiles_per_program & (tiles_per_program - 1):
        raise ValueError("decode kernel: tiles_per_program must be a power of two")
    device = codes.device
    codes = codes.contiguous()
    row_tiles, col_tiles, _ = codes.shape
    shape = (row_tiles * TILE_ROWS, col_tiles * TILE_COLS)
    if out is None:
        out = torch.empty(shape, dtype=torch.float32, device=device)
    elif tuple(out.shape) != shape or out.dtype != torch.float32 or out.stride(1) != 1:
        raise ValueError(f"decode kernel: out must be float32 {shape} with unit column stride")
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise ValueError("decode kernel: scale must hold one value")
        scale_t = scale.reshape(1).to(device=device, dtype=torch.float32)
    else:
        scale_t = torch.tensor([float(scale)], dtype=torch.float32, device=device)

    mul = add = and_mask = xor_mask = mean = 0
    index_bits = 1
    fconst = 1.0
    if code == "1mad":
        mul, add = int(constants["mad_mul"]), int(constants["mad_add"])
        mean, fconst = int(constants["mad_mean"]), float(constants["mad_inv_std"])
    elif code == "3inst":
        mul, add = int(constants["inst_mul"]), int(constants["inst_add"])
        and_mask, xor_mask = int(constants["inst_and"]), int(constants["inst_xor"])
        fconst = 1.0 / float(constants["inst_rms"])  # rounded to float32 once, as codes.py does
    elif code == "hyb":
        index_bits = int(constants["hyb_index_bits"])
    for name, v in (("mul", mul), ("add", add), ("and", and_mask), ("xor", xor_mask)):
        if not 0 <= v < 1 << 32:
            raise ValueError(f"decode kernel: {code} {name} constant {v} is not a uint32")
    if table is not None and code in ("hyb", "lut"):
        table_t = table.to(device)
        table_stride = table_t.stride(0)
    else:
        table_t, table_stride = scale_t, 0  # unused placeholder pointer

    num_tiles = row_tiles * col_tiles
    if num_tiles == 0:
        return out
    grid = (triton.cdiv(num_tiles, tiles_per_program),)
    _decode_kernel[grid](
        codes, table_t, scale_t, out,
        num_tiles, col_tiles, out.stride(0), table_stride, fconst,
        STATE_BITS=state_bits, BITS=bits, VEC=vec, CODE=CODE_IDS[code],
        MUL=mul, ADD=add, AND_MASK=and_mask, XOR_MASK=xor_mask, MEAN=mean,
        HYB_INDEX_BITS=index_bits, TILES_PER_PROGRAM=tiles_per_program, num_warps=num_warps,
    )
    return out
