"""The models and data of distillation: a float teacher, a student with soft trellis layers, text windows.

The student is the PTQ checkpoint as a transformers model in float32; the linears of the trained
layers are swapped for SoftTrellisLinear modules, and every other parameter is frozen. The teacher is
the float model the checkpoint was quantized from (its trellis block names it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qat.soft_linear import SoftTrellisLinear
from qat.sources import dense_model_from_checkpoint, load_float_model, resolve_source
from trellis_runtime.checkpoint import Checkpoint
from trellis_runtime.errors import SourceError, TrellisError


def load_teacher(checkpoint: Checkpoint, override: str | None, device: str):
    """(float model, tokenizer) the checkpoint was made from, or `override`."""
    name = override or checkpoint.trellis.get("source")
    if not name:
        raise TrellisError("the checkpoint does not name its float source model; pass --teacher")
    try:
        return load_float_model(resolve_source(name), device)
    except SourceError as err:
        raise TrellisError(f"cannot load the float teacher {name!r} ({err}); pass --teacher") from None


def layer_linears(checkpoint: Checkpoint, layer: int) -> list[str]:
    prefix = f"model.layers.{layer}."
    return [name for name in checkpoint.quantized if name.startswith(prefix)]


def dense_student(checkpoint: Checkpoint, device: str) -> nn.Module:
    """The PTQ checkpoint as a frozen float32 transformers model."""
    return dense_model_from_checkpoint(checkpoint, device).requires_grad_(False)


def make_soft(model: nn.Module, checkpoint: Checkpoint, layers: list[int], train_table: bool,
              train_scale: bool, device: str) -> dict[str, SoftTrellisLinear]:
    """Swap the given layers' linears for trainable soft trellis linears, in place."""
    soft: dict[str, SoftTrellisLinear] = {}
    for layer in layers:
        for name in layer_linears(checkpoint, layer):
            bias = model.get_submodule(name).bias
            module = SoftTrellisLinear(checkpoint.quantized[name], train_table, train_scale,
                                       bias).to(device)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module)
            soft[name] = module
    return soft


def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Forward KL(teacher || student) over the full vocabulary, mean over positions."""
    student = F.log_softmax(student_logits.float(), dim=-1)
    teacher = F.log_softmax(teacher_logits.float(), dim=-1)
    return (teacher.exp() * (teacher - student)).sum(dim=-1).mean()


@dataclass
class TextWindows:
    """Training windows and a disjoint validation stream, both from the calibration text."""

    train: torch.Tensor  # (windows, ctx) int64
    validation: torch.Tensor  # (tokens,) int64

    @classmethod
    def from_text(cls, tokenizer, text: str, ctx: int, count: int, validation_tokens: int,
                  seed: int) -> "TextWindows":
        ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.int64)
        usable = ids.numel() - validation_tokens
        if usable < 2 * ctx:
            raise TrellisError(f"calibration text has {ids.numel()} tokens; need at least "
                               f"{validation_tokens + 2 * ctx} ({validation_tokens} held out for "
                               f"validation and two windows of {ctx})")
        gen = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, usable - ctx, (count,), generator=gen)
        return cls(train=torch.stack([ids[s:s + ctx] for s in starts.tolist()]),
                   validation=ids[usable:])


@torch.no_grad()
def layer_gains(student: nn.Module, teacher: nn.Module, checkpoint: Checkpoint,
                window: torch.Tensor) -> list[float]:
    """For each layer, the KL to the teacher saved by giving the student that layer's float weights.

    The layers where quantization costs the most are the ones worth training first.
    """
    teacher_logits = teacher(window[None]).logits
    base = float(kl_to_teacher(student(window[None]).logits, teacher_logits))
    gains = []
    for layer in range(checkpoint.shape.layers):
        names = layer_linears(checkpoint, layer)
        saved = {name: student.get_submodule(name).weight.data for name in names}
        for name in names:
            student.get_submodule(name).weight.data = teacher.get_submodule(name).weight.data
        gains.append(base - float(kl_to_teacher(student(window[None]).logits, teacher_logits)))
        for name in names:
            student.get_submodule(name).weight.data = saved[name]
    return gains
