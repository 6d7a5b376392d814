"""Codes: the map from an L-bit trellis state to V reconstruction values of unit variance.

The computed codes (1MAD, 3INST) use 32-bit integer arithmetic so a GPU kernel can evaluate them with
a handful of instructions; HYB hashes the state into a small per-matrix 512x2 table; LUT is a full
2^L x V table. Every result is float32 computed from exact integers (or fp16 table entries) and a
single float32 multiply, so the torch reference and the kernels agree bit for bit.
"""

from __future__ import annotations

import torch

from trellis_runtime.trellis import TrellisSpec

MASK32 = 0xFFFFFFFF

# 1MAD: x = a*s + b (mod 2^32); the byte sum of x is Irwin-Hall(4): mean 510, std 147.8005...
MAD_MUL, MAD_ADD = 34038481, 76625530
MAD_MEAN = 510
MAD_INV_STD = 1.0 / 147.800537109375

# 3INST: x = a*s + b; keep sign + 12 low bits of each 16-bit half and force the exponent into
# [2^-3, 2), then add the two halves read as fp16. The sum's RMS over all 2^16 states is below;
# we divide by it so every code has unit variance and one scale rule fits all.
INST_MUL, INST_ADD = 89226354, 64248484
INST_AND, INST_XOR = 0x8FFF8FFF, 0x3B603B60
INST_RMS = 1.2437085359793958

# HYB: h = s*(s+1) mod 2^16; table index = bits 6..14 of h; bit 15 flips the sign of value 0.
HYB_INDEX_BITS = 9
HYB_TABLE_ROWS = 1 << HYB_INDEX_BITS


def _f32(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32)


def _fp16_from_bits(bits16: torch.Tensor) -> torch.Tensor:
    """Reinterpret integers in [0, 2^16) as IEEE half floats, returned as float32 (exact)."""
    signed = torch.where(bits16 >= 0x8000, bits16 - 0x10000, bits16).to(torch.int16)
    return signed.view(torch.float16).to(torch.float32)


def mad_values(states: torch.Tensor) -> torch.Tensor:
    x = (states.to(torch.int64) * MAD_MUL + MAD_ADD) & MASK32
    byte_sum = (x & 0xFF) + ((x >> 8) & 0xFF) + ((x >> 16) & 0xFF) + ((x >> 24) & 0xFF)
    return (byte_sum - MAD_MEAN).to(torch.float32) * _f32(MAD_INV_STD)


def inst_values(states: torch.Tensor) -> torch.Tensor:
    x = (states.to(torch.int64) * INST_MUL + INST_ADD) & MASK32
    r = (x & INST_AND) ^ INST_XOR
    return (_fp16_from_bits(r >> 16) + _fp16_from_bits(r & 0xFFFF)) * _f32(1.0 / INST_RMS)


def hyb_index_and_sign(states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Table row and sign flip (True = negate value 0) for each state."""
    s = states.to(torch.int64)
    h = (s * (s + 1)) & 0xFFFF
    index = (h >> (15 - HYB_INDEX_BITS)) & (HYB_TABLE_ROWS - 1)
    return index, (h >> 15).bool()


def hyb_values(states: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    index, flip = hyb_index_and_sign(states)
    values = table.to(torch.float32)[index]
    first = torch.where(flip, -values[..., 0], values[..., 0])
    return torch.stack((first, values[..., 1]), dim=-1)


def code_values(spec: TrellisSpec, states: torch.Tensor, table: torch.Tensor | None = None
                ) -> torch.Tensor:
    """Reconstruction values for `states` (any shape): float32 of shape states.shape + (V,)."""
    if spec.code == "1mad":
        return mad_values(states).unsqueeze(-1)
    if spec.code == "3inst":
        return inst_values(states).unsqueeze(-1)
    if table is None:
        raise ValueError(f"code {spec.code} needs its table")
    if spec.code == "hyb":
        return hyb_values(states, table)
    return table.to(torch.float32)[states.to(torch.int64)]


def state_values(spec: TrellisSpec, table: torch.Tensor | None = None,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """The full (2^L, V) table of every state's values: what the Viterbi encoder searches."""
    states = torch.arange(spec.num_states, device=device)
    return code_values(spec, states, None if table is None else table.to(device))


def table_shape(spec: TrellisSpec) -> tuple[int, int] | None:
    """Shape of the per-matrix table the code needs, or None for computed codes."""
    if spec.code == "hyb":
        return (HYB_TABLE_ROWS, 2)
    if spec.code == "lut":
        return (spec.num_states, spec.vec)
    return None


def _kmeans(points: torch.Tensor, k: int, iters: int, gen: torch.Generator) -> torch.Tensor:
    """Plain Lloyd iterations from k distinct random points; deterministic for a given generator.

    Distances are taken pair by pair, not through cdist's default matrix-product path: that one
    rounds differently from one process to the next (the BLAS kernel it lands on varies), which
    flipped near-tie assignments and so the table a run starts from."""
    centroids = points[torch.randperm(points.shape[0], generator=gen)[:k]].clone()
    for _ in range(iters):
        nearest = torch.cdist(points, centroids,
                              compute_mode="donot_use_mm_for_euclid_dist").argmin(dim=1)
        sums = torch.zeros_like(centroids).index_add_(0, nearest, points)
        counts = torch.bincount(nearest, minlength=k).unsqueeze(1)
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
    return centroids


def initial_table(spec: TrellisSpec, seed: int = 0) -> torch.Tensor | None:
    """The starting table for table codes, rounded to fp16 (the stored precision).

    HYB: k-means of 2-D Gaussian samples into 512 centroids (QTIP's initialisation). LUT: i.i.d.
    Gaussian entries (a random codebook). Both are rescaled to unit mean square, because the trellis
    visits table rows roughly uniformly rather than with Gaussian weights.
    """
    shape = table_shape(spec)
    if shape is None:
        return None
    gen = torch.Generator().manual_seed(seed)
    if spec.code == "hyb":
        samples = torch.randn(1 << 16, 2, generator=gen)
        table = _kmeans(samples, HYB_TABLE_ROWS, iters=30, gen=gen)
    else:
        table = torch.randn(*shape, generator=gen)
    table = table / table.pow(2).mean().sqrt()
    return table.to(torch.float16)


def kernel_constants() -> dict[str, int | float]:
    """The code constants as the Triton kernels take them (kernels import nothing of the project)."""
    return {"mad_mul": MAD_MUL, "mad_add": MAD_ADD, "mad_mean": MAD_MEAN, "mad_inv_std": MAD_INV_STD,
            "inst_mul": INST_MUL, "inst_add": INST_ADD, "inst_and": INST_AND, "inst_xor": INST_XOR,
            "inst_rms": INST_RMS, "hyb_index_bits": HYB_INDEX_BITS}
