"""The bitshift trellis: its parameters and the facts every other module derives from them.

A tile of 256 weights (16x16) is one trellis sequence. The code is a cyclic bitstream of 256*K bits;
the state at step t is the L-bit window that starts at bit t*K*V (indices taken modulo the stream
length), and each state emits V weights through a code (see `codes.py`). Consecutive states overlap
in L-K*V bits, so every state has 2^(K*V) successors and 2^(K*V) predecessors, and because the stream
is circular the last state wraps into the first: a tile costs exactly 256*K bits ("tail-biting").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from trellis_runtime.errors import UnsupportedSpecError

TILE_ROWS = 16
TILE_COLS = 16
TILE_SIZE = TILE_ROWS * TILE_COLS

CODES = ("1mad", "3inst", "hyb", "lut")
# Values per step each code emits by default (QTIP's choice): the computed codes are scalar, the
# table codes are 2-D.
DEFAULT_VEC = {"1mad": 1, "3inst": 1, "hyb": 2, "lut": 2}
# Which V each code can emit: 1MAD/3INST produce one number per state; HYB's table holds 2-D points.
SUPPORTED_VEC = {"1mad": (1,), "3inst": (1,), "hyb": (2,), "lut": (1, 2)}
MIN_STATE_BITS, MAX_STATE_BITS = 8, 16
MAX_BITS = 4
# A full 2^L x V table only makes sense while it stays small (it is stored per matrix).
LUT_MAX_STATE_BITS = 12


@dataclass(frozen=True)
class TrellisSpec:
    """One trellis configuration: L state bits, K bits per weight, V weights per step, and a code."""

    state_bits: int = 16
    bits: int = 2
    vec: int = 2
    code: str = "hyb"

    def __post_init__(self) -> None:
        L, K, V, code = self.state_bits, self.bits, self.vec, self.code
        if code not in CODES:
            raise UnsupportedSpecError(f"unknown code {code!r}; choose one of {', '.join(CODES)}")
        if not MIN_STATE_BITS <= L <= MAX_STATE_BITS:
            raise UnsupportedSpecError(
                f"state bits L={L} unsupported; use {MIN_STATE_BITS}..{MAX_STATE_BITS}")
        if not 1 <= K <= MAX_BITS:
            raise UnsupportedSpecError(f"bits per weight K={K} unsupported; use 1..{MAX_BITS}")
        if V not in SUPPORTED_VEC[code]:
            allowed = " or ".join(str(v) for v in SUPPORTED_VEC[code])
            raise UnsupportedSpecError(f"code {code} emits V={allowed} values per step, not V={V}")
        if K * V >= L:
            raise UnsupportedSpecError(
                f"(L={L}, K={K}, V={V}) leaves no overlap between states: need K*V < L")
        if code == "lut" and L > LUT_MAX_STATE_BITS:
            raise UnsupportedSpecError(
                f"code lut stores a 2^L table per matrix; use L <= {LUT_MAX_STATE_BITS}, not {L}")

    @property
    def step_bits(self) -> int:
        """New bits consumed per step (K*V); also the shift between consecutive windows."""
        return self.bits * self.vec

    @property
    def num_states(self) -> int:
        return 1 << self.state_bits

    @property
    def num_groups(self) -> int:
        """States sharing their low L-KV bits form a predecessor group of 2^(KV) members."""
        return 1 << (self.state_bits - self.step_bits)

    @property
    def steps(self) -> int:
        """Trellis steps per tile."""
        return TILE_SIZE // self.vec

    @property
    def tile_bits(self) -> int:
        return TILE_SIZE * self.bits

    @property
    def words_per_tile(self) -> int:
        """32-bit words holding one tile's bitstream (256*K/32 = 8K)."""
        return self.tile_bits // 32

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"L={self.state_bits} K={self.bits} V={self.vec} code={self.code}"


def spec_for(code: str, bits: int = 2, state_bits: int = 16, vec: int | None = None) -> TrellisSpec:
    """Build a spec, filling V with the code's default as QTIP does."""
    if code not in CODES:
        raise UnsupportedSpecError(f"unknown code {code!r}; choose one of {', '.join(CODES)}")
    return TrellisSpec(state_bits=state_bits, bits=bits,
                       vec=DEFAULT_VEC[code] if vec is None else vec, code=code)
