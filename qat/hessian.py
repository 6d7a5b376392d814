"""Input second moments H = E[x x^T] of every linear, collected on calibration text.

Linears that read the same input (q/k/v, gate/up) share one matrix, as in QTIP. Hessians come from
the float model (not the partly quantized one), so every layer can be quantized independently.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from trellis_runtime.architecture import ModelShape


def hessian_key(layer: int, group: str) -> str:
    return f"model.layers.{layer}.{group}"


@torch.no_grad()
def collect_hessians(model, shape: ModelShape, windows: torch.Tensor, batch_size: int = 4
                     ) -> dict[str, torch.Tensor]:
    """{hessian_key: (n, n) float64} averaged over all tokens of `windows` (N, ctx)."""
    # The first linear of each input group: hooking it sees the group's shared input.
    probes = {group: members[0] for group, members in shape.input_groups().items()}
    sums: dict[str, torch.Tensor] = {}
    handles = []
    for layer, block in enumerate(model.model.layers):
        for group, probe in probes.items():
            key = hessian_key(layer, group)

            def hook(module, inputs, key=key):
                x = inputs[0].reshape(-1, inputs[0].shape[-1]).to(torch.float32)
                partial = (x.t() @ x).to(torch.float64)  # fp32 within a batch, fp64 across
                sums[key] = partial if key not in sums else sums[key].add_(partial)

            handles.append(block.get_submodule(probe).register_forward_pre_hook(hook))
    device = next(model.parameters()).device
    try:
        for start in tqdm(range(0, windows.shape[0], batch_size), desc="hessians", unit="batch",
                          leave=False):
            model.model(windows[start:start + batch_size].to(device))
    finally:
        for handle in handles:
            handle.remove()
    count = windows.numel()
    return {key: (total / count).cpu() for key, total in sums.items()}


def damp(hessian: torch.Tensor, ratio: float) -> torch.Tensor:
    """H + ratio * mean(diag H) * I: keeps H positive definite and the feedback well conditioned."""
    bump = ratio * hessian.diagonal().mean().clamp(min=1e-12)
    return hessian + bump * torch.eye(hessian.shape[0], dtype=hessian.dtype)
