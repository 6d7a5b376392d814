"""Drift budget: whether training can move a latent out of its PTQ solution's Voronoi cell.

Training starts at the PTQ reconstruction and the deployed weight is the Viterbi re-encoding of the
final latent, so a matrix changes at all only if its latent drifts past the boundary of the set of
latents that Viterbi maps back to the PTQ codes. With Adam every element moves by about lr per
step, so after N steps the drift is at most N * lr per element: the budget.

The radius is measured, not assumed: for a sample of tiles, the smallest per-element RMS
perturbation (along a random direction) at which the tile's hard codes change, as a median over
the sample. Radii, budgets and learning rates are all in units of each matrix's scale (the rotation
to the quantized basis is orthogonal, so an RMS perturbation of the latent is the same RMS there):
measured that way, the radius is about the same for every matrix of a model, whereas in weight units
it varies with each matrix's spread, which one absolute learning rate could not serve.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trellis_runtime.bitstream import unpack_states
from trellis_runtime.quantized import QuantizedWeight
from trellis_runtime.viterbi import encode

# Perturbation sizes tried, as RMS per element in the unit-scaled basis (the code's own units).
RADIUS_GRID = torch.logspace(-3.5, 0.0, 22)
SAMPLE_TILES = 32


@torch.no_grad()
def voronoi_radius(unit_tiles: torch.Tensor, weight: QuantizedWeight, values: torch.Tensor,
                   sample_tiles: int = SAMPLE_TILES, seed: int = 0) -> float:
    """Median smallest perturbation (RMS per element, in units of the scale) that changes a tile's codes.

    `unit_tiles` (tiles, 256) is the latent in the rotated, unit-scaled basis (at PTQ init, the PTQ
    reconstruction itself); `values` are the states' values the encoder searches.
    """
    gen = torch.Generator().manual_seed(seed)
    count = min(sample_tiles, unit_tiles.shape[0])
    chosen = torch.randperm(unit_tiles.shape[0], generator=gen)[:count]
    start = unit_tiles[chosen]
    reference = unpack_states(weight.codes, weight.spec).flatten(0, 1)[chosen]
    direction = torch.randn(start.shape, generator=gen)
    direction /= direction.pow(2).mean(dim=1, keepdim=True).sqrt()
    grid = RADIUS_GRID.to(start.dtype)
    trials = start.unsqueeze(0) + grid[:, None, None] * direction.unsqueeze(0)  # (G, S, 256)
    states = encode(trials.flatten(0, 1), values, weight.spec).view(len(grid), count, -1)
    changed = (states != reference.unsqueeze(0)).any(dim=2)  # (G, S)
    # The first grid size that changes each tile; a tile never changed counts as the largest size.
    first = torch.where(changed.any(dim=0), changed.float().argmax(dim=0),
                        torch.full((count,), len(grid) - 1))
    return float(grid[first].median())


@dataclass(frozen=True)
class Budget:
    """One matrix's drift budget against its measured radius."""

    name: str
    radius: float
    budget: float  # steps * lr, lr relative to the matrix's scale

    @property
    def escapes(self) -> bool:
        return self.budget > self.radius

    def to_json(self) -> dict:
        return {"radius": self.radius, "budget": self.budget, "escapes": self.escapes}


def budgets(radii: dict[str, float], steps: int, lr: float) -> list[Budget]:
    return [Budget(name, radius, steps * lr) for name, radius in radii.items()]


def suggested_lr(radii: dict[str, float], steps: int, margin: float = 2.0) -> float:
    """The learning rate that gives every matrix `margin` times its radius as budget."""
    return margin * max(radii.values()) / steps


@torch.no_grad()
def escape_stats(ptq: QuantizedWeight, hard: QuantizedWeight) -> dict[str, float]:
    """escape_frac: share of tiles whose hard codes differ from PTQ; rel_drift of the weight."""
    changed = (hard.codes != ptq.codes).any(dim=-1)
    before, after = ptq.dequantize(), hard.dequantize()
    return {"escape_frac": float(changed.float().mean()),
            "rel_drift": float((after - before).norm() / before.norm())}
