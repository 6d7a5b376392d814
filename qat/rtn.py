"""Round-to-nearest with per-group min/max scales: the plain baseline a trellis code must beat."""

from __future__ import annotations

import torch

from trellis_runtime.architecture import ModelShape


def rtn(weight: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Asymmetric uniform quantization of each run of `group` input weights to 2^bits levels."""
    out_features, in_features = weight.shape
    if in_features % group:
        raise ValueError(f"in_features {in_features} is not a multiple of the group size {group}")
    groups = weight.to(torch.float32).reshape(out_features, in_features // group, group)
    low = groups.amin(dim=-1, keepdim=True)
    step = (groups.amax(dim=-1, keepdim=True) - low).clamp(min=1e-12) / (2 ** bits - 1)
    levels = ((groups - low) / step).round().clamp(0, 2 ** bits - 1)
    return (levels * step + low).reshape(out_features, in_features).to(weight.dtype)


@torch.no_grad()
def rtn_quantize_(model, bits: int = 3, group: int = 64) -> None:
    """Replace every decoder linear weight of a Llama-family model by its RTN reconstruction."""
    shape = ModelShape.from_config(model.config.to_dict())
    for name in shape.all_linear_shapes():
        linear = model.get_submodule(name)
        linear.weight.copy_(rtn(linear.weight, bits, group))
