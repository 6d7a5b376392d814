"""The student of end-to-end distillation: every quantized linear with frozen codes, trainable rest.

Built from a packed checkpoint as a transformers model (qat.distill.dense_student), with each
quantized linear swapped for a FrozenCodesLinear and the RMSNorm weights unfrozen. What trains:
- per linear, a real output vector; per input group of a layer (q/k/v, gate/up, o, down), one real
  input vector its linears share;
- every RMSNorm weight (the layers' and the final one);
- the code tables, when asked;
- the embeddings and the head (one matrix when tied), when asked: they stay in 16-bit floats, so
  training them costs no bits, only optimizer memory.
Nothing else moves: the codes stay as quantization left them.
"""

from __future__ import annotations

import torch
from torch import nn

from qat.frozen_codes import FrozenCodesLinear
from trellis_runtime.checkpoint import DENSE_DTYPE, Checkpoint
from trellis_runtime.quantized import QuantizedWeight


def make_tuned(model: nn.Module, checkpoint: Checkpoint, train_table: bool
               ) -> dict[str, FrozenCodesLinear]:
    """Swap every quantized linear of `model` for a FrozenCodesLinear, in place; by module name.
    train_table trains the tables of the codes that have one (hyb, lut) and is moot for the rest."""
    tuned: dict[str, FrozenCodesLinear] = {}
    shape = checkpoint.shape
    for layer in range(shape.layers):
        for group in shape.input_groups().values():
            names = [f"model.layers.{layer}.{name}" for name in group]
            first = checkpoint.quantized[names[0]]
            vector = nn.Parameter(first.input_signs.to(torch.float32).clone())
            for name in names:
                weight = checkpoint.quantized[name]
                if not torch.equal(weight.input_signs, first.input_signs):
                    raise ValueError(f"{name} does not share its group's input vector")
                module = FrozenCodesLinear(weight, vector, model.get_submodule(name).bias,
                                           train_table and weight.table is not None)
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, module)
                tuned[name] = module
    return tuned


def norm_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The RMSNorm modules of `model` (their weights train), by module name."""
    return {name: module for name, module in model.named_modules()
            if name.rpartition(".")[2].endswith("norm") and isinstance(
                getattr(module, "weight", None), nn.Parameter)}


def embedding_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The input embedding and the output head of `model`, by module name; one entry when tied."""
    wanted = [model.get_input_embeddings(), model.get_output_embeddings()]
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if any(module is w for w in wanted) and not any(
                other.weight is module.weight for other in found.values()):
            found[name] = module
    return found


def trained_modules(model: nn.Module, tuned: dict[str, FrozenCodesLinear],
                    train_embeddings: bool) -> dict[str, nn.Module]:
    """Every module with trained parameters, by name, in a fixed order (snapshots rely on it)."""
    dense = {**norm_modules(model), **(embedding_modules(model) if train_embeddings else {})}
    for module in dense.values():
        module.weight.requires_grad_(True)
    return {**tuned, **dense}


@torch.no_grad()
def round_to_storage(modules: dict[str, nn.Module]) -> None:
    """Round every trained parameter to the dtype the checkpoint stores it in, in place: scores
    taken after this are the scores of what the checkpoint will serve."""
    for module in modules.values():
        if isinstance(module, FrozenCodesLinear):
            module.round_to_storage()
        else:
            module.weight.copy_(module.weight.to(DENSE_DTYPE).to(module.weight.dtype))


def exported(checkpoint: Checkpoint, modules: dict[str, nn.Module]
             ) -> tuple[dict[str, QuantizedWeight], dict[str, torch.Tensor]]:
    """(quantized weights, dense tensors) of the checkpoint with the trained parts replaced."""
    quantized = dict(checkpoint.quantized)
    dense = dict(checkpoint.dense)
    for name, module in modules.items():
        if isinstance(module, FrozenCodesLinear):
            quantized[name] = module.export()
        else:
            dense[f"{name}.weight"] = module.weight.detach().to(DENSE_DTYPE).clone()
    return quantized, dense
