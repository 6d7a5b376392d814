"""The packed bit layout of a tile: the one description shared by the packer, decoder and kernels.

Layout (for a spec with L state bits, K bits per weight, V values per step):
- A tile's stream is 256*K bits b_0..b_{256K-1}, stored in 8K 32-bit words, most significant bit
  first: word j holds b_{32j} (bit 31) .. b_{32j+31} (bit 0). Stored as int32 (same bit pattern).
- The state of step t is the L-bit window starting at bit t*K*V, read MSB first, with bit indices
  taken modulo 256*K (the stream is circular: that is the tail-biting).
- A window never spans more than two words (L <= 16 < 32), so a reader loads the word j = start // 32
  and its successor (j + 1) mod 8K, both aligned 32-bit loads, and shifts.
- Step t emits values for tile positions t*V .. t*V+V-1; tile positions run row-major over the
  16x16 tile (position = 16*row + col), and tiles run row-major over the matrix.
"""

from __future__ import annotations

import torch

from trellis_runtime.trellis import TrellisSpec


def window_start_bits(spec: TrellisSpec) -> torch.Tensor:
    """First bit of each step's state window: t*K*V for t in 0..steps-1."""
    return torch.arange(spec.steps, dtype=torch.int64) * spec.step_bits


def window_words_and_shifts(spec: TrellisSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per step: index of the first word, index of the next word (circular), and bit offset."""
    start = window_start_bits(spec)
    first = start // 32
    return first, (first + 1) % spec.words_per_tile, start % 32


def read_window(first_word: torch.Tensor, next_word: torch.Tensor, offset: torch.Tensor,
                state_bits: int) -> torch.Tensor:
    """The L-bit window starting `offset` bits into `first_word` and continuing into `next_word`.

    Words are int64 holding unsigned 32-bit values. The top 16 bits of the next word suffice
    because offset + L <= 31 + 16.
    """
    joined = (first_word << 16) | (next_word >> 16)  # 48 bits: the first word and 16 more
    return (joined >> (48 - state_bits - offset)) & ((1 << state_bits) - 1)


def unpack_states(words: torch.Tensor, spec: TrellisSpec) -> torch.Tensor:
    """States (..., steps) int64 of packed tiles (..., 8K) int32."""
    unsigned = words.to(torch.int64) & 0xFFFFFFFF
    first, nxt, offset = (t.to(words.device) for t in window_words_and_shifts(spec))
    return read_window(unsigned[..., first], unsigned[..., nxt], offset, spec.state_bits)


def pack_states(states: torch.Tensor, spec: TrellisSpec) -> torch.Tensor:
    """Packed words (..., 8K) int32 of a valid tail-biting state path (..., steps).

    Each state contributes its top K*V bits, which are exactly the bits b_{tKV}..b_{tKV+KV-1}
    of the stream; the remaining bits of every window are supplied by the following states.
    Raises if the path is not a valid tail-biting trellis path.
    """
    check_path(states, spec)
    kv, L = spec.step_bits, spec.state_bits
    chunks = (states.to(torch.int64) >> (L - kv))  # (..., steps) values < 2^KV
    shifts = torch.arange(kv - 1, -1, -1, device=states.device)
    bits = ((chunks.unsqueeze(-1) >> shifts) & 1).flatten(-2)  # (..., 256K) MSB first
    bits = bits.unflatten(-1, (spec.words_per_tile, 32))
    weights = torch.tensor([1 << (31 - i) for i in range(32)], dtype=torch.int64,
                           device=states.device)
    words = (bits * weights).sum(-1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def check_path(states: torch.Tensor, spec: TrellisSpec) -> None:
    """Raise ValueError unless consecutive states (cyclically) overlap in L-KV bits."""
    if states.shape[-1] != spec.steps:
        raise ValueError(f"expected {spec.steps} states per tile, got {states.shape[-1]}")
    s = states.to(torch.int64)
    overlap_mask = spec.num_groups - 1
    following = torch.roll(s, shifts=-1, dims=-1)
    if not torch.equal(s & overlap_mask, following >> spec.step_bits):
        raise ValueError("state sequence is not a tail-biting path of the bitshift trellis")
