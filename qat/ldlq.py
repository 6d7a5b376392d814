"""BlockLDLQ: Hessian-aware rounding with the trellis encoder as the block quantizer.

With the damped, rotated Hessian H = L D L^T (L unit block-lower-triangular in 16x16 blocks), the
proxy loss tr((W - Q) H (W - Q)^T) = |(W - Q) L D^(1/2)|^2. Quantizing column blocks from last to
first, block i of (W - Q) L is (W - Q)_i + sum_{j>i} (W - Q)_j L_ji, so choosing
Q_i = quantize(W_i + sum_{j>i} (W - Q)_j L_ji) leaves only block i's own rounding error there.
Many matrices (all linears of several layers) advance in lockstep so every encoder call sees a
large batch of tiles.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from trellis_runtime.trellis import TILE_COLS, TILE_ROWS

BLOCK = TILE_COLS

# (tiles (B, 256)) -> (reconstruction (B, 256), states (B, steps))
TileQuantizer = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def block_feedback(hessian: torch.Tensor) -> torch.Tensor:
    """The strictly block-lower feedback matrix L - I of the block LDL of `hessian` (float64)."""
    n = hessian.shape[0]
    chol = torch.linalg.cholesky(hessian)
    blocks = chol.view(n // BLOCK, BLOCK, n // BLOCK, BLOCK)
    diag_inverse = torch.linalg.inv(torch.stack([blocks[i, :, i, :] for i in range(n // BLOCK)]))
    unit = torch.einsum("iajb,jbc->iajc", blocks, diag_inverse).reshape(n, n)
    return torch.tril(unit, diagonal=-1).masked_fill_(
        torch.block_diag(*[torch.ones(BLOCK, BLOCK, dtype=torch.bool)] * (n // BLOCK)), 0.0)


@dataclass
class LdlqJob:
    """Rows that share one feedback matrix: W (m, n) in the rotated, unit-scaled basis."""

    weight: torch.Tensor
    feedback: torch.Tensor | None  # (n, n) or None for plain rounding without a Hessian
    reconstruction: torch.Tensor | None = None
    states: torch.Tensor | None = None  # (m/16, n/16, steps)

    @property
    def blocks(self) -> int:
        return self.weight.shape[1] // BLOCK


def run_ldlq(jobs: list[LdlqJob], quantize: TileQuantizer,
             on_block: Callable[[int], None] | None = None) -> None:
    """Quantize every job in place, column block by column block from the last one."""
    for job in jobs:
        job.reconstruction = torch.zeros_like(job.weight)
        job.states = None
    for k in range(max(job.blocks for job in jobs)):
        active = [job for job in jobs if job.blocks > k]
        targets = []
        for job in active:
            i = job.blocks - 1 - k
            cols = slice(i * BLOCK, (i + 1) * BLOCK)
            target = job.weight[:, cols]
            if job.feedback is not None and i + 1 < job.blocks:
                done = slice((i + 1) * BLOCK, None)
                error = job.weight[:, done] - job.reconstruction[:, done]
                target = target + error @ job.feedback[done, cols]
            targets.append(target.reshape(-1, TILE_ROWS * BLOCK))  # (m/16, 256): tiles row-major
        recon, states = quantize(torch.cat(targets))
        offset = 0
        for job, target in zip(active, targets):
            i = job.blocks - 1 - k
            count = target.shape[0]
            job.reconstruction[:, i * BLOCK:(i + 1) * BLOCK] = recon[offset:offset + count].reshape(
                -1, BLOCK)
            if job.states is None:
                job.states = torch.empty(count, job.blocks, states.shape[1], dtype=torch.int64)
            job.states[:, i] = states[offset:offset + count]
            offset += count
        if on_block is not None:
            on_block(sum(t.shape[0] for t in targets))
