"""Setting up a QAT run: the checkpoint to train, its trained layers, and the learning rate.

The learning rate is checked against the drift budget (qat.drift) before any training: a run whose
steps x lr cannot move any matrix out of its PTQ solution's Voronoi cell is refused, since hardening
would give back the PTQ codes unchanged.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from qat.distill import TextWindows, layer_gains
from qat.drift import budgets, suggested_lr, voronoi_radius
from qat.snapshot import RunState
from qat.soft_linear import SoftTrellisLinear
from trellis_runtime.checkpoint import SIGNS_VERSION, Checkpoint, is_checkpoint, load_checkpoint
from trellis_runtime.errors import TrellisError

# Layers trained by default on a CPU: the one whose quantization costs the most KL (see
# distill.layer_gains). Every step runs one BCJR forward+backward over all of a trained layer's tiles
# (13,824 for a SmolLM2-135M layer at L=12), so the cost grows with layers x steps; on a CPU the
# default is one layer x 12 steps with its snapshots, which keeps the default run of the built-in
# model to about 11 minutes on 2 cores with the C++ BCJR. The time of one layer's step is in
# benchmarks/results/bcjr_speed.json (cpu, smollm2_layer_step_s), that of the default stage in
# benchmarks/results/recipe_smollm2.json (row bcjr_one_layer) and the README's Measured section.
# A GPU trains all of them.
AUTO_LAYERS_CPU = 1


def load_trainable(checkpoint_dir: Path, train_table: bool) -> Checkpoint:
    """The packed checkpoint to train, refused early when it cannot be trained as asked."""
    if not is_checkpoint(checkpoint_dir):
        raise TrellisError(f"{checkpoint_dir} is not a packed trellis checkpoint; run "
                           f"`trellis quantize` first and train its output")
    checkpoint = load_checkpoint(checkpoint_dir)
    if checkpoint.trellis["format_version"] != SIGNS_VERSION:
        raise TrellisError(f"{checkpoint_dir} has fine-tuned real input/output vectors (format "
                           f"{checkpoint.trellis['format_version']}); BCJR-QAT trains the codes of "
                           f"a sign-vector checkpoint: run it before fine-tuning")
    if train_table and checkpoint.spec.code not in ("hyb", "lut"):
        raise TrellisError(f"--train-table needs a table code (hyb or lut); this checkpoint "
                           f"uses {checkpoint.spec.code}")
    return checkpoint


def parse_layers(text: str, count: int, device: str) -> list[int] | None:
    """Layer indices, or None for "auto" (chosen by measured gain; all layers on a GPU)."""
    if text == "all" or (text == "auto" and device == "cuda"):
        return list(range(count))
    if text == "auto":
        return None
    try:
        layers = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise TrellisError(f"--layers must be all, auto or comma-separated indices, got {text!r}") from None
    bad = [layer for layer in layers if not 0 <= layer < count]
    if not layers or bad:
        raise TrellisError(f"--layers {text!r}: the model has layers 0..{count - 1}")
    return layers


def choose_layers(student, teacher, checkpoint: Checkpoint, windows: TextWindows) -> list[int]:
    """The AUTO_LAYERS_CPU layers whose float weights save the most KL, measured on a window."""
    gains = layer_gains(student, teacher, checkpoint, windows.train[0])
    chosen = sorted(sorted(range(len(gains)), key=lambda i: -gains[i])[:AUTO_LAYERS_CPU])
    print("layers by KL saved when restored to float: " +
          ", ".join(f"{i}: {gains[i]:.3f}" for i in chosen) + f" -> training {chosen}")
    return chosen


def plan_run(soft: dict[str, SoftTrellisLinear], layers: list[int], lr: float | None, steps: int,
             seed: int) -> RunState:
    """Measure the radii and settle the learning rate (`lr`, or the budget's suggestion)."""
    radii = _radii(soft, seed)
    lr = lr if lr is not None else suggested_lr(radii, steps)
    _check_budget(radii, steps, lr)
    return RunState(layers=layers, radii=radii, lr=lr)


def _radii(soft: dict[str, SoftTrellisLinear], seed: int) -> dict[str, float]:
    radii = {}
    for name, module in tqdm(soft.items(), desc="voronoi radii", unit="matrix", leave=False):
        with torch.no_grad():
            radii[name] = voronoi_radius(module.unit_tiles(), module.ptq, module.values(), seed=seed)
    return radii


def _check_budget(radii: dict[str, float], steps: int, lr: float) -> None:
    rows = budgets(radii, steps, lr)
    stuck = [row for row in rows if not row.escapes]
    budget = steps * lr
    if len(stuck) == len(rows):
        raise TrellisError(
            f"steps x lr = {steps} x {lr:g} = {budget:.2e} cannot move any "
            f"trained matrix out of its PTQ solution (smallest Voronoi radius "
            f"{min(radii.values()):.2e}); use --lr {suggested_lr(radii, steps):.1e} "
            f"or more --steps")
    if stuck:
        print(f"warning: drift budget {budget:.2e} is below the Voronoi radius of "
              f"{len(stuck)} of {len(rows)} matrices (largest {max(r.radius for r in stuck):.2e}); "
              f"they will likely keep their PTQ codes. --lr "
              f"{suggested_lr(radii, steps):.1e} would cover all")
    else:
        print(f"drift budget {steps} x lr {lr:.2e} = {budget:.2e} exceeds every Voronoi "
              f"radius (largest {max(radii.values()):.2e}, in units of each matrix's scale): "
              f"escape predicted")
