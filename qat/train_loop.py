"""The QAT training loop: AdamW on the trellis latents, one calibration window per step.

Each step sets the soft layers to the step's temperature, runs the float teacher and the student on
the step's window, and takes an optimizer step on the loss: the forward KL to the teacher end to
end, or each trained layer's output MSE to the teacher's. Every `eval_every` steps and at the last,
the latents are hardened and scored (qat.hardened_eval), which also writes the resume snapshot.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from qat.distill import TextWindows, kl_to_teacher
from qat.hardened_eval import evaluate_snapshot
from qat.record import Record
from qat.snapshot import RunState
from qat.soft_linear import SoftTrellisLinear
from qat.train_options import QatOptions


def make_optimizer(soft: dict[str, SoftTrellisLinear], lr: float) -> torch.optim.Optimizer:
    """AdamW with each matrix's step in units of its own scale (the code table's are ~1)."""
    groups = []
    for module in soft.values():
        scale = float(module.ptq.scale)
        groups.append({"params": [module.latent], "lr": lr * scale})
        if module.table is not None:
            groups.append({"params": [module.table], "lr": lr})
        if isinstance(module.scale, torch.nn.Parameter):
            groups.append({"params": [module.scale], "lr": lr * scale})
    return torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)


def train(run: RunState, student, teacher, soft: dict[str, SoftTrellisLinear],
          optimizer: torch.optim.Optimizer, windows: TextWindows, options: QatOptions, record: Record,
          work: Path) -> None:
    """Take the steps from `run.step` to `options.steps`, appending one record entry per step."""
    start_latents = {name: module.ptq.dequantize() for name, module in soft.items()}
    captured: dict[str, list[torch.Tensor]] = {"student": [], "teacher": []}
    hooks = _layer_hooks(student, teacher, run.layers, captured) if options.loss == "mse" else []
    progress = tqdm(total=options.steps, initial=run.step, desc="qat", unit="step")
    try:
        while run.step < options.steps:
            step = run.step
            temperature = options.temperature(step)
            for module in soft.values():
                module.temperature = temperature
            window = windows.train[step][None].to(options.device)
            with torch.no_grad():
                teacher_logits = teacher(window).logits
            student_logits = student(window).logits
            kl = kl_to_teacher(student_logits, teacher_logits)
            loss = kl if options.loss == "kl" else _mse(captured)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(
                [p for m in soft.values() for p in m.parameters()], options.clip)
            optimizer.step()
            run.step += 1
            drift = {name: float((m.latent.detach() - start_latents[name]).pow(2).mean().sqrt()
                                 / m.ptq.scale) for name, m in soft.items()}
            entry = {"step": run.step, "temperature": temperature, "kl": kl.item(),
                     "loss": loss.item(), "grad_norm": grad_norm.item(),
                     "drift_over_radius": sum(drift[n] / run.radii[n] for n in drift) / len(drift)}
            if run.step % options.eval_every == 0 or run.step == options.steps:
                entry.update(evaluate_snapshot(run, student, soft, optimizer, windows.validation,
                                               work))
            record.append(entry)
            progress.set_postfix(kl=f"{kl.item():.3f}", T=f"{temperature:.3f}",
                                 best=f"{run.best_ppl:.2f}")
            progress.update(1)
    finally:
        progress.close()
        for hook in hooks:
            hook.remove()


def _layer_hooks(student, teacher, layers: list[int], captured: dict[str, list[torch.Tensor]]):
    def keep(key: str):
        return lambda _module, _inputs, output: captured[key].append(
            output[0] if isinstance(output, tuple) else output)

    hooks = []
    for layer in layers:
        hooks.append(student.model.layers[layer].register_forward_hook(keep("student")))
        hooks.append(teacher.model.layers[layer].register_forward_hook(keep("teacher")))
    return hooks


def _mse(captured: dict[str, list[torch.Tensor]]) -> torch.Tensor:
    """Per-layer output MSE to the teacher's layer outputs, relative to their power."""
    pairs = list(zip(captured["student"], captured["teacher"]))
    captured["student"].clear()
    captured["teacher"].clear()
    return sum((s - t.detach()).pow(2).mean() / t.detach().pow(2).mean() for s, t in pairs
               ) / len(pairs)
