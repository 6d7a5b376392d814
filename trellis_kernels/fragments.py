"""Packed trellis codes laid out for tensor-core operands, and an emulator of the operation they feed.

A GEMV that decodes straight into mma.m16n8k16 operands (no shared-memory staging of decoded
weights) needs every lane to decode exactly the weights its B fragment holds. The checkpoint's
bit layout already nearly gives that: a tile's stream of 256*K bits, split into 32 chunks of 8K
bits, hands lane l the states of tile positions 8l..8l+7, which are tile row l >> 1, columns
8(l & 1)..8(l & 1)+7. Its last windows run 16 - K*V bits into lane l+1's chunk (lane 31 wraps to
lane 0: the tail-biting).

- `repack`: at load time, the chunks of 4 tiles adjacent along a row become one 32K-bit word per
  lane (K=2: one 8-byte load), so a lane issues two wide loads per 4 tiles: its own word and
  lane l+1's.
- `lane_states`: what a lane decodes from those two words.
- The B operand: lane 4g+t holds B[k, g] for k in {2t, 2t+1, 2t+8, 2t+9} (the PTX fragment layout),
  all from tile row 2g + (t >> 1). So the weights of row pair g fill B's column g; two MMAs per
  tile take a lane's 8 weights, 4 each (`weight_column`).
- The A operand holds the input: row 2b+p carries batch row b at the k-slots of the lanes with
  t >> 1 == p, zero elsewhere (`input_operand`). Then D[2b+p, g] is batch row b times tile row
  2g+p: 8 batch rows, both row parities, in one MMA.

`mma_m16n8k16` emulates the instruction from per-lane fragments (the PTX ISA's tables), so the
mapping is checked bit for bit on a CPU before any kernel relies on it.
"""

from __future__ import annotations

import torch

LANES = 32
TILES_PER_WORD = 4  # tiles along a row whose lane chunks share one repacked word
BATCH_PER_MMA = 8  # batch rows one MMA carries (16 A rows: 2 parities each)


def _bits(words: torch.Tensor) -> torch.Tensor:
    """(..., n) int32 words -> (..., 32n) bits (int64 0/1), most significant first."""
    shifts = torch.arange(31, -1, -1, device=words.device)
    return ((words.to(torch.int64).unsqueeze(-1) >> shifts) & 1).flatten(-2)


def _words(bits: torch.Tensor) -> torch.Tensor:
    """The inverse of _bits: (..., 32n) bits -> (..., n) int32."""
    weights = torch.tensor([1 << (31 - i) for i in range(32)], dtype=torch.int64,
                           device=bits.device)
    words = (bits.unflatten(-1, (-1, 32)) * weights).sum(-1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def repack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(row_tiles, col_tiles, 8K) int32 packed tiles -> (row_tiles, col_tiles/4, 32 lanes, K) int32:
    lane l's word holds its 8K-bit chunk of each of 4 adjacent tiles, the first tile's first."""
    row_tiles, col_tiles, words = codes.shape
    if words != 8 * bits or col_tiles % TILES_PER_WORD:
        raise ValueError(f"repack takes (row_tiles, col_tiles, 8K={8 * bits}) codes with col_tiles "
                         f"a multiple of {TILES_PER_WORD}, got {tuple(codes.shape)}")
    chunks = _bits(codes).reshape(row_tiles, col_tiles // TILES_PER_WORD, TILES_PER_WORD, LANES,
                                  8 * bits)
    return _words(chunks.transpose(2, 3).flatten(-2))


def lane_states(repacked: torch.Tensor, state_bits: int, bits: int, vec: int) -> torch.Tensor:
    """The states each lane decodes from its word and lane l+1's: (row_tiles, col_tiles, steps) in
    the checkpoint's step order (lane l's steps are 8l/V .. 8l/V + 8/V - 1)."""
    row_tiles, groups = repacked.shape[:2]
    own = _bits(repacked).unflatten(-1, (TILES_PER_WORD, 8 * bits))  # (rt, cg, lanes, tiles, 8K)
    following = torch.roll(own, shifts=-1, dims=2)  # lane l+1's chunks, lane 31 -> lane 0
    stream = torch.cat((own, following[..., :16]), dim=-1)
    step_bits, steps_per_lane = bits * vec, 8 // vec
    place = torch.tensor([1 << (state_bits - 1 - i) for i in range(state_bits)],
                         dtype=torch.int64, device=repacked.device)
    states = torch.stack([(stream[..., s * step_bits:s * step_bits + state_bits] * place).sum(-1)
                          for s in range(steps_per_lane)], dim=-1)  # (rt, cg, lanes, tiles, s)
    return states.transpose(2, 3).reshape(row_tiles, groups * TILES_PER_WORD,
                                          LANES * steps_per_lane)


def weight_column(lane: int, mma: int, index: int) -> tuple[int, int]:
    """(tile row, tile column) of the weight that lane `lane` puts in B fragment slot `index` (0-3)
    of the tile's MMA `mma` (0 or 1): its weights 4*mma .. 4*mma+3."""
    return lane >> 1, 8 * (lane & 1) + 4 * mma + index


def b_operand(tile: torch.Tensor, mma: int) -> torch.Tensor:
    """(32 lanes, 4) B fragments of one 16x16 tile (rows, columns) for MMA `mma`."""
    return torch.stack([torch.stack([tile[weight_column(lane, mma, i)] for i in range(4)])
                        for lane in range(LANES)])


def input_operand(x: torch.Tensor, mma: int) -> torch.Tensor:
    """The 16x16 A matrix of MMA `mma` for x (up to 8 batch rows, the tile's 16 input columns)."""
    a = x.new_zeros(16, 16)
    for k in range(16):
        t, index = (k & 7) >> 1, (k & 1) + 2 * (k >> 3)  # the lane 4g+t and slot holding B[k, g]
        column = 8 * (t & 1) + 4 * mma + index
        parity = t >> 1
        a[parity:2 * x.shape[0]:2, k] = x[:, column]
    return a


def a_fragments(a: torch.Tensor) -> torch.Tensor:
    """(32, 8) per-lane A fragments of a 16x16 matrix: lane (group, t) holds a0..a7 at row
    group + 8*((i >> 1) & 1), column 2t + (i & 1) + 8*(i >> 2)."""
    return torch.stack([torch.stack([a[(lane >> 2) + 8 * ((i >> 1) & 1),
                                       2 * (lane & 3) + (i & 1) + 8 * (i >> 2)] for i in range(8)])
                        for lane in range(LANES)])


def mma_m16n8k16(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """D = A B + C from per-lane fragments, as mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32:
    a (32, 8), b (32, 4), c and the result (32, 4). Products are summed in float64 (the hardware
    sums float16 products exactly into float32)."""
    A = torch.zeros(16, 16, dtype=torch.float64)
    B = torch.zeros(16, 8, dtype=torch.float64)
    C = torch.zeros(16, 8, dtype=torch.float64)
    for lane in range(LANES):
        group, t = lane >> 2, lane & 3
        for i in range(8):
            A[group + 8 * ((i >> 1) & 1), 2 * t + (i & 1) + 8 * (i >> 2)] = a[lane, i]
        for i in range(4):
            B[2 * t + (i & 1) + 8 * (i >> 1), group] = b[lane, i]
            C[group + 8 * (i >> 1), 2 * t + (i & 1)] = c[lane, i]
    D = A @ B + C
    return torch.stack([torch.stack([D[(lane >> 2) + 8 * (i >> 1), 2 * (lane & 3) + (i & 1)]
                                     for i in range(4)]) for lane in range(LANES)])


def output_rows(d: torch.Tensor, batch: int) -> torch.Tensor:
    """(batch, 16) tile-row results from (32, 4) D fragments: D[2b+p, g] is batch row b, tile row
    2g+p; lane (group, t) holds D rows group + 8*(i >> 1), columns 2t + (i & 1)."""
    y = torch.zeros(BATCH_PER_MMA, 16, dtype=d.dtype)
    for lane in range(LANES):
        for i in range(4):
            m, g = (lane >> 2) + 8 * (i >> 1), 2 * (lane & 3) + (i & 1)
            y[m >> 1, 2 * g + (m & 1)] = d[lane, i]
    return y[:batch]
