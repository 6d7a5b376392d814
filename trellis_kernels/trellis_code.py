"""The trellis code math every kernel shares: read a state from packed words, map it to values.

The packed layout is described once, in trellis_runtime/bitstream.py; this package imports nothing
from the project, so every layout and code fact arrives as an argument or constexpr:

- codes (rt, ct, 8K) int32: tile (r, c) of the (rt*16, ct*16) matrix holds a 256*K-bit stream in
  8K words, most significant bit first, tiles row-major.
- Tile position p (= 16*row + col inside the tile) is slot p % V of step t = p // V. The state of
  step t is the L-bit window starting at bit t*K*V, circular within the tile. A kernel lane owns
  one group of a tile (rows 2g and 2g+1: exactly K words) and reads every window of the group
  from those words and the next group's first word with constant shifts (group_words,
  group_state).
- The code maps the state to V float32 values (formulas and constants in trellis_runtime/codes.py,
  passed here through `constants`).

Every step is exact integer work, an exact fp16->fp32 widening, or the float32 multiplies and adds
the torch reference does in the same order, so decoded values agree with it bit for bit.
`TrellisCode` is the host-side half: it validates one (L, K, V, code, table) combination once and
hands each launch its arguments.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# The trellis facts below restate trellis_runtime's (trellis.py, codes.py), which this package cannot
# import; tests/test_kernels_decode.py (test_kernels_cover_the_trellis_definition) asserts they agree.
TILE_ROWS = TILE_COLS = 16
TILE_DIM = tl.constexpr(TILE_ROWS)  # the same tile side, as kernels read it (they see no plain globals)

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
TABLE_DTYPES = (torch.float16,)  # checkpoints store float16 tables
# Offsets into codes are int32 inside the kernels.
MAX_CODE_WORDS = 2**31 - 1


@triton.jit
def computed_value(state, fconst, CODE: tl.constexpr, MUL: tl.constexpr, ADD: tl.constexpr,
                   AND_MASK: tl.constexpr, XOR_MASK: tl.constexpr, MEAN: tl.constexpr):
    """The float32 value of a scalar computed code (1MAD or 3INST) for uint32 states."""
    x = state * tl.cast(MUL, tl.uint32) + tl.cast(ADD, tl.uint32)
    if CODE == 0:  # 1MAD: byte sum of a*s + b (mod 2^32), centred and scaled
        byte_sum = (x & 0xFF) + ((x >> 8) & 0xFF) + ((x >> 16) & 0xFF) + (x >> 24)
        value = (byte_sum.to(tl.int32) - MEAN).to(tl.float32) * fconst
    else:  # 3INST: masked a*s + b read as two fp16 halves, summed, divided by the RMS
        r = (x & tl.cast(AND_MASK, tl.uint32)) ^ tl.cast(XOR_MASK, tl.uint32)
        hi = (r >> 16).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        lo = (r & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        value = (hi + lo) * fconst
    return value


@triton.jit
def group_words(codes_ptr, tile, group, mask, BITS: tl.constexpr):
    """The K words of `group` (0..7: tile rows 2g and 2g+1) of each tile, plus word 0 of the next
    group (circularly: the last group's windows wrap into word 0 of the same tile).

    Returned as (w0, w1, w2, w3, wn) uint32; the ones past K are w0 again, unused. Masked-off
    words are undefined (any bits decode to some finite value); `mask` may be None.
    """
    base = codes_ptr + tile * (8 * BITS)
    w0 = tl.load(base + group * BITS, mask=mask).to(tl.uint32, bitcast=True)
    w1 = w0
    w2 = w0
    w3 = w0
    if BITS > 1:
        w1 = tl.load(base + group * BITS + 1, mask=mask).to(tl.uint32, bitcast=True)
    if BITS > 2:
        w2 = tl.load(base + group * BITS + 2, mask=mask).to(tl.uint32, bitcast=True)
    if BITS > 3:
        w3 = tl.load(base + group * BITS + 3, mask=mask).to(tl.uint32, bitcast=True)
    wn = tl.load(base + ((group + 1) % 8) * BITS, mask=mask).to(tl.uint32, bitcast=True)
    return w0, w1, w2, w3, wn


@triton.jit
def _pick(w0, w1, w2, w3, wn, INDEX: tl.constexpr, BITS: tl.constexpr):
    if INDEX == BITS:
        word = wn
    elif INDEX == 0:
        word = w0
    elif INDEX == 1:
        word = w1
    elif INDEX == 2:
        word = w2
    else:
        word = w3
    return word


@triton.jit
def group_state(w0, w1, w2, w3, wn, STEP: tl.constexpr, STATE_BITS: tl.constexpr,
                BITS: tl.constexpr, VEC: tl.constexpr):
    """The state of step STEP (0..32/V-1) of a group from its words: constant shifts only."""
    START: tl.constexpr = STEP * BITS * VEC
    OFFSET: tl.constexpr = START % 32
    first = _pick(w0, w1, w2, w3, wn, START // 32, BITS)
    if OFFSET + STATE_BITS <= 32:
        window = first << OFFSET
    else:
        window = (first << OFFSET) | (_pick(w0, w1, w2, w3, wn, START // 32 + 1, BITS)
                                      >> (32 - OFFSET))
    return window >> (32 - STATE_BITS)


@triton.jit
def table_index(state, CODE: tl.constexpr, HYB_INDEX_BITS: tl.constexpr):
    """(table row, sign) of uint32 states for the table codes HYB and LUT.

    sign is 0x8000 where value 0 is negated (HYB's bit 15), else 0: XOR-ed into a float16's bits it
    flips the sign, as negating it does.
    """
    if CODE == 2:  # HYB: hash s*(s+1) mod 2^16 into a 2-D table row; bit 15 negates value 0
        h = (state * (state + 1)) & 0xFFFF
        index = (h >> (15 - HYB_INDEX_BITS)) & ((1 << HYB_INDEX_BITS) - 1)
        sign = h & 0x8000
    else:  # LUT: the state indexes a full 2^L x V table, values never negated
        index = state
        sign = state & 0
    return index, sign


@triton.jit
def signed_table_index(state, CODE: tl.constexpr, HYB_INDEX_BITS: tl.constexpr):
    """Table rows of uint32 states for a table that holds HYB's rows twice, the second copy
    (rows 2^HYB_INDEX_BITS and up) with value 0 negated: HYB's sign bit 15 sits right above its
    index bits, so one shift yields both. LUT states index their table directly."""
    if CODE == 2:
        index = ((state * (state + 1)) & 0xFFFF) >> (15 - HYB_INDEX_BITS)
    else:
        index = state
    return index


def _uint32(name: str, value: int, code: str) -> int:
    if not 0 <= value < 1 << 32:
        raise ValueError(f"{code} constant {name}={value} is not a uint32")
    return value


@dataclass(frozen=True)
class TrellisCode:
    """One validated (L, K, V, code) with its table and constants, as the kernels take it.

    `constants` holds the code constants (from trellis_runtime/codes.py): 1mad needs mad_mul,
    mad_add, mad_mean, mad_inv_std; 3inst needs inst_mul, inst_add, inst_and, inst_xor, inst_rms;
    hyb needs hyb_index_bits. Raises ValueError for combinations the kernels do not implement.
    """

    state_bits: int
    bits: int
    vec: int
    code: str
    table: torch.Tensor | None
    constants: dict

    def __post_init__(self) -> None:
        L, K, V, code, table = self.state_bits, self.bits, self.vec, self.code, self.table
        if code not in CODE_IDS:
            raise ValueError(f"unknown code {code!r}; the kernels support {', '.join(CODE_IDS)}")
        if V not in SUPPORTED_VEC[code]:
            raise ValueError(f"code {code} does not support V={V}")
        if not 1 <= K <= MAX_BITS:
            raise ValueError(f"K={K} unsupported; the kernels take 1..{MAX_BITS} bits per weight")
        if not 1 <= L <= MAX_STATE_BITS:
            raise ValueError(f"L={L} unsupported; the kernels take up to {MAX_STATE_BITS} state "
                             "bits")
        if K * V >= L:
            raise ValueError(f"need K*V < L, got K={K} V={V} L={L}")
        missing = [k for k in REQUIRED_CONSTANTS[code] if k not in self.constants]
        if missing:
            raise ValueError(f"code {code} needs constants {', '.join(missing)}")
        if code in ("hyb", "lut"):
            if table is None:
                raise ValueError(f"code {code} needs its table")
            if code == "hyb":
                index_bits = int(self.constants["hyb_index_bits"])
                if not 1 <= index_bits <= 15:
                    raise ValueError(f"hyb_index_bits={index_bits} unsupported")
                expected = (1 << index_bits, 2)
            else:
                expected = (1 << L, V)
            if tuple(table.shape) != expected:
                raise ValueError(f"{code} table must be {expected}, got {tuple(table.shape)}")
            if table.dtype not in TABLE_DTYPES or not table.is_contiguous():
                raise ValueError(f"{code} table must be a contiguous float16 tensor, got "
                                 f"{table.dtype} strides {table.stride()}")

    @property
    def words_per_tile(self) -> int:
        return 8 * self.bits

    def check_codes(self, codes: torch.Tensor) -> None:
        """Raise ValueError unless `codes` is an int32 (rt, ct, 8K) tensor the kernels can index."""
        if codes.dtype != torch.int32 or codes.dim() != 3 or codes.shape[2] != self.words_per_tile:
            raise ValueError(f"codes must be int32 (rt, ct, {self.words_per_tile}), got "
                             f"{tuple(codes.shape)} {codes.dtype}")
        if codes.numel() > MAX_CODE_WORDS:
            raise ValueError(f"codes hold {codes.numel()} words; the kernels index at most "
                             f"{MAX_CODE_WORDS}")
        if not codes.is_contiguous():
            raise ValueError("codes must be contiguous")

    def constexprs(self) -> dict[str, int]:
        """The compile-time arguments of the code, as the kernels take them."""
        c = self.constants
        mul = add = and_mask = xor_mask = mean = 0
        index_bits = 1
        if self.code == "1mad":
            mul, add, mean = int(c["mad_mul"]), int(c["mad_add"]), int(c["mad_mean"])
        elif self.code == "3inst":
            mul, add = int(c["inst_mul"]), int(c["inst_add"])
            and_mask, xor_mask = int(c["inst_and"]), int(c["inst_xor"])
        elif self.code == "hyb":
            index_bits = int(c["hyb_index_bits"])
        return {"STATE_BITS": self.state_bits, "BITS": self.bits, "VEC": self.vec,
                "CODE": CODE_IDS[self.code], "MUL": _uint32("mul", mul, self.code),
                "ADD": _uint32("add", add, self.code),
                "AND_MASK": _uint32("and", and_mask, self.code),
                "XOR_MASK": _uint32("xor", xor_mask, self.code), "MEAN": mean,
                "HYB_INDEX_BITS": index_bits}

    def fconst(self) -> float:
        """The float32 multiplier of the computed codes (1/std for 1MAD, 1/RMS for 3INST)."""
        if self.code == "1mad":
            return float(self.constants["mad_inv_std"])
        if self.code == "3inst":
            return 1.0 / float(self.constants["inst_rms"])  # rounded to float32 once, as codes.py
        return 1.0


def scale_tensor(scale: float | torch.Tensor, device: torch.device) -> torch.Tensor:
    """A float32 (1,) tensor on `device` holding one scale."""
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise ValueError("scale must hold one value")
        return scale.reshape(1).to(device=device, dtype=torch.float32)
    return torch.tensor([float(scale)], dtype=torch.float32, device=device)


def check_power_of_two(name: str, value: int) -> None:
    if value < 1 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two, got {value}")

