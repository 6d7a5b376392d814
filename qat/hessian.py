"""Input second moments H = E[x x^T]: how each is keyed, and how it is kept well conditioned.

Linears that read the same input (q/k/v, gate/up) share one matrix, as in QTIP; qat/float_layers.py
accumulates them layer by layer from the float model's activations.
"""

from __future__ import annotations

import torch


def hessian_key(layer: int, group: str) -> str:
    return f"model.layers.{layer}.{group}"


def damp(hessian: torch.Tensor, ratio: float) -> torch.Tensor:
    """H + ratio * mean(diag H) * I: keeps H positive definite and the feedback well conditioned."""
    bump = ratio * hessian.diagonal().mean().clamp(min=1e-12)
    return hessian + bump * torch.eye(hessian.shape[0], dtype=hessian.dtype)
