"""BCJR-QAT: train trellis latents through the soft trellis against the float model, then harden.

One run: check the drift budget, then for each step take a window of calibration text, compute the
forward KL between the float teacher and the student (whose trained layers use the BCJR soft
reconstruction at the step's temperature), and take an AdamW step on the latents. Every
`eval_every` steps and at the end, the latents are hardened by Viterbi and the hardened student is
scored on held-out text; the best hardened snapshot (the PTQ solution itself counts as step 0) is
what the output checkpoint stores, in the same packed format `trellis serve` loads.

Like `trellis quantize`, the run is atomic and resumable: everything lives in `.<out>.partial`
beside the output (arguments, the latest snapshot with optimizer state, the best hardened codes,
the record) until the finished checkpoint is renamed into place.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm import tqdm

from qat.distill import (TextWindows, dense_student, kl_to_teacher, layer_gains, load_teacher,
                         make_soft)
from qat.drift import budgets, escape_stats, suggested_lr, voronoi_radius
from qat.perplexity import perplexity
from qat.record import Record, plot
from qat.soft_linear import SoftTrellisLinear
from qat.text import calibration_text
from qat.workdir import atomic_save, prepare, read_metadata, work_dir
from trellis_runtime.checkpoint import (CONFIG_FILE, WEIGHTS_FILE, Checkpoint, is_checkpoint,
                                        load_checkpoint, save_checkpoint)
from trellis_runtime.errors import TrellisError
from trellis_runtime.quantized import QuantizedWeight, quantized_from_tensors

# Layers trained by default on a CPU: the one whose quantization costs the most KL (see
# distill.layer_gains). One BCJR forward+backward over a SmolLM2-135M layer (13,824 tiles at L=12)
# takes about 100 s on 2 cores, so one layer x 12 steps fits the ~45-minute CPU budget with its
# snapshots. A GPU trains all of them.
AUTO_LAYERS_CPU = 1
VALIDATION_CTX = 512


@dataclass(frozen=True)
class QatOptions:
    layers: str = "auto"  # "auto", "all" or comma-separated layer indices
    steps: int = 12
    lr: float | None = None  # relative to each matrix's scale; None = the drift budget's suggestion
    t_start: float = 0.3
    t_end: float = 0.05
    calib_text: str | None = None
    teacher: str | None = None
    device: str = "cpu"
    ctx: int = 1024  # tokens per training window (one window per step)
    eval_every: int = 4
    validation_tokens: int = 8192
    loss: str = "kl"  # "kl" end to end, or "mse": per-layer output MSE to the teacher's layers
    train_table: bool = False
    train_scale: bool = False
    clip: float = 1.0
    seed: int = 0

    def temperature(self, step: int) -> float:
        """Exponential schedule t_start -> t_end over the steps (step counts from 0)."""
        if self.steps == 1:
            return self.t_end
        return self.t_start * (self.t_end / self.t_start) ** (step / (self.steps - 1))

    def check(self) -> None:
        if self.steps < 1:
            raise TrellisError(f"--steps must be at least 1, got {self.steps}")
        if self.lr is not None and not self.lr > 0:
            raise TrellisError(f"--lr must be positive, got {self.lr}")
        if not (0 < self.t_end <= self.t_start):
            raise TrellisError(f"temperatures must satisfy 0 < --t-end <= --t-start, got "
                               f"{self.t_start} -> {self.t_end}")
        if self.t_end < 1e-2:
            raise TrellisError(f"--t-end {self.t_end} is below 0.01, where float32 forward-backward "
                               f"loses its precision")
        if self.loss not in ("kl", "mse"):
            raise TrellisError(f"--loss must be kl or mse, got {self.loss!r}")
        if self.eval_every < 1:
            raise TrellisError(f"--eval-every must be at least 1, got {self.eval_every}")


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


@dataclass
class _Run:
    """The mutable state a snapshot holds."""

    step: int = 0  # steps done
    best_ppl: float = math.inf
    best_step: int = 0
    ptq_ppl: float = math.inf
    lr: float = 0.0  # relative to each matrix's scale: the option, or the budget's suggestion
    layers: list[int] = field(default_factory=list)
    radii: dict[str, float] = field(default_factory=dict)


class Trainer:
    def __init__(self, checkpoint_dir: Path, out: Path, options: QatOptions) -> None:
        self.checkpoint_dir, self.out, self.options = Path(checkpoint_dir), Path(out), options
        self.work = work_dir(self.out)
        self.record = Record(self.work / "record.jsonl")

    # -- set-up ---------------------------------------------------------------------------------

    def _load(self) -> Checkpoint:
        if not is_checkpoint(self.checkpoint_dir):
            raise TrellisError(f"{self.checkpoint_dir} is not a packed trellis checkpoint; run "
                               f"`trellis quantize` first and train its output")
        checkpoint = load_checkpoint(self.checkpoint_dir)
        if self.options.train_table and checkpoint.spec.code not in ("hyb", "lut"):
            raise TrellisError(f"--train-table needs a table code (hyb or lut); this checkpoint "
                               f"uses {checkpoint.spec.code}")
        return checkpoint

    def _prepare_work(self) -> bool:
        """Create or reuse the work directory; True when resuming."""
        if self.out.exists():
            raise TrellisError(f"{self.out} already exists; remove it or choose another --out")
        prepare(self.out, json.dumps({"checkpoint": str(self.checkpoint_dir.resolve()),
                                      "options": asdict(self.options)}, sort_keys=True))
        return (self.work / "snapshot.safetensors").is_file()

    # -- snapshots ------------------------------------------------------------------------------

    def _save_snapshot(self, run: _Run, soft: dict[str, SoftTrellisLinear],
                       optimizer: torch.optim.Optimizer) -> None:
        tensors: dict[str, torch.Tensor] = {}
        for name, module in soft.items():
            for pname, param in module.named_parameters():
                tensors[f"{name}.{pname}"] = param
        state = optimizer.state_dict()["state"]
        for index, slots in state.items():
            for key, value in slots.items():
                tensors[f"adam.{index}.{key}"] = torch.as_tensor(value).reshape(-1) if key == "step" \
                    else value
        atomic_save(tensors, self.work / "snapshot.safetensors", asdict(run))

    def _load_snapshot(self, soft: dict[str, SoftTrellisLinear],
                       optimizer: torch.optim.Optimizer) -> None:
        tensors = load_file(str(self.work / "snapshot.safetensors"))
        with torch.no_grad():
            for name, module in soft.items():
                for pname, param in module.named_parameters():
                    param.copy_(tensors[f"{name}.{pname}"])
        state = optimizer.state_dict()
        slots: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("adam."):
                _, index, slot = key.split(".", 2)
                slots.setdefault(int(index), {})[slot] = value.reshape(()) if slot == "step" else value
        state["state"] = slots
        optimizer.load_state_dict(state)

    # -- evaluation -----------------------------------------------------------------------------

    @torch.no_grad()
    def _evaluate(self, student, soft: dict[str, SoftTrellisLinear], hard: dict[str, QuantizedWeight],
                  validation: torch.Tensor) -> float:
        for name, module in soft.items():
            module.use_hard(hard[name])
        try:
            ppl, _ = perplexity(student, validation, ctx=VALIDATION_CTX)
        finally:
            for module in soft.values():
                module.use_hard(None)
        return ppl

    # -- the run --------------------------------------------------------------------------------

    def run(self) -> dict:
        options = self.options
        options.check()
        started = time.time()
        checkpoint = self._load()
        layers = parse_layers(options.layers, checkpoint.shape.layers, options.device)
        resuming = self._prepare_work()
        teacher, tokenizer = load_teacher(checkpoint, options.teacher, options.device)
        teacher.requires_grad_(False)
        windows = TextWindows.from_text(tokenizer, calibration_text(options.calib_text), options.ctx,
                                        options.steps, options.validation_tokens, options.seed)
        student = dense_student(checkpoint, options.device)
        if layers is None:
            layers = self._choose_layers(student, teacher, checkpoint, windows)
        soft = make_soft(student, checkpoint, layers, options.train_table, options.train_scale,
                         options.device)
        if resuming:
            run = _Run(**read_metadata(self.work / "snapshot.safetensors"))
            optimizer = self._optimizer(soft, run.lr)
            self._load_snapshot(soft, optimizer)
            self.record.truncate_after(run.step)
            print(f"resuming {self.out.name} from step {run.step} of {options.steps}")
        else:
            try:
                run = self._plan(soft, layers)
                optimizer = self._optimizer(soft, run.lr)
                self._start(run, student, soft, optimizer, windows)
            except BaseException:
                shutil.rmtree(self.work, ignore_errors=True)  # refused before any work worth keeping
                raise
        self._train(run, student, teacher, soft, optimizer, windows)
        return self._finish(run, checkpoint, time.time() - started)

    def _plan(self, soft: dict[str, SoftTrellisLinear], layers: list[int]) -> _Run:
        """Measure the radii and settle the learning rate against the drift budget."""
        radii = self._radii(soft)
        lr = self.options.lr if self.options.lr is not None else suggested_lr(radii, self.options.steps)
        self._check_budget(radii, lr)
        return _Run(layers=layers, radii=radii, lr=lr)

    @staticmethod
    def _optimizer(soft: dict[str, SoftTrellisLinear], lr: float) -> torch.optim.Optimizer:
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

    def _start(self, run: _Run, student, soft: dict[str, SoftTrellisLinear],
               optimizer: torch.optim.Optimizer, windows: TextWindows) -> None:
        """Step 0: the PTQ solution's score and the first snapshot."""
        ptq = {name: module.ptq for name, module in soft.items()}
        run.ptq_ppl = run.best_ppl = self._evaluate(student, soft, ptq, windows.validation)
        atomic_save({k: v for name, w in ptq.items() for k, v in w.tensors(name).items()},
                     self.work / "best.safetensors")
        self.record.path.unlink(missing_ok=True)
        self.record.append({"step": 0, "hard_ppl": run.ptq_ppl, "escape_frac": 0.0,
                            "temperature": self.options.temperature(0), "event": "ptq"})
        self._save_snapshot(run, soft, optimizer)

    def _choose_layers(self, student, teacher, checkpoint: Checkpoint, windows: TextWindows
                       ) -> list[int]:
        gains = layer_gains(student, teacher, checkpoint, windows.train[0])
        chosen = sorted(sorted(range(len(gains)), key=lambda i: -gains[i])[:AUTO_LAYERS_CPU])
        print("layers by KL saved when restored to float: " +
              ", ".join(f"{i}: {gains[i]:.3f}" for i in chosen) + f" -> training {chosen}")
        return chosen

    def _radii(self, soft: dict[str, SoftTrellisLinear]) -> dict[str, float]:
        radii = {}
        for name, module in tqdm(soft.items(), desc="voronoi radii", unit="matrix", leave=False):
            with torch.no_grad():
                radii[name] = voronoi_radius(module.unit_tiles(), module.ptq, module.values(),
                                             seed=self.options.seed)
        return radii

    def _check_budget(self, radii: dict[str, float], lr: float) -> None:
        options = self.options
        rows = budgets(radii, options.steps, lr)
        stuck = [row for row in rows if not row.escapes]
        budget = options.steps * lr
        if len(stuck) == len(rows):
            raise TrellisError(
                f"steps x lr = {options.steps} x {lr:g} = {budget:.2e} cannot move any "
                f"trained matrix out of its PTQ solution (smallest Voronoi radius "
                f"{min(radii.values()):.2e}); use --lr {suggested_lr(radii, options.steps):.1e} "
                f"or more --steps")
        if stuck:
            print(f"warning: drift budget {budget:.2e} is below the Voronoi radius of "
                  f"{len(stuck)} of {len(rows)} matrices (largest {max(r.radius for r in stuck):.2e}); "
                  f"they will likely keep their PTQ codes. --lr "
                  f"{suggested_lr(radii, options.steps):.1e} would cover all")
        else:
            print(f"drift budget {options.steps} x lr {lr:.2e} = {budget:.2e} exceeds every Voronoi "
                  f"radius (largest {max(radii.values()):.2e}, in units of each matrix's scale): "
                  f"escape predicted")

    def _train(self, run: _Run, student, teacher, soft: dict[str, SoftTrellisLinear],
               optimizer: torch.optim.Optimizer, windows: TextWindows) -> None:
        options = self.options
        start_latents = {name: module.ptq.dequantize() for name, module in soft.items()}
        captured: dict[str, list[torch.Tensor]] = {"student": [], "teacher": []}
        hooks = self._layer_hooks(student, teacher, run.layers, captured) if options.loss == "mse" else []
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
                loss = kl if options.loss == "kl" else self._mse(captured)
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
                    entry.update(self._snapshot(run, student, soft, optimizer, windows))
                self.record.append(entry)
                progress.set_postfix(kl=f"{kl.item():.3f}", T=f"{temperature:.3f}",
                                     best=f"{run.best_ppl:.2f}")
                progress.update(1)
        finally:
            progress.close()
            for hook in hooks:
                hook.remove()

    def _snapshot(self, run: _Run, student, soft: dict[str, SoftTrellisLinear],
                  optimizer: torch.optim.Optimizer, windows: TextWindows) -> dict:
        """Harden, score, keep the best, and save everything a resume needs."""
        hard = {name: module.harden() for name, module in soft.items()}
        ppl = self._evaluate(student, soft, hard, windows.validation)
        stats = {name: escape_stats(soft[name].ptq, weight) for name, weight in hard.items()}
        if ppl < run.best_ppl:
            run.best_ppl, run.best_step = ppl, run.step
            atomic_save({k: v for name, w in hard.items() for k, v in w.tensors(name).items()},
                         self.work / "best.safetensors")
        self._save_snapshot(run, soft, optimizer)
        return {"hard_ppl": ppl, "event": "snapshot",
                "escape_frac": sum(s["escape_frac"] for s in stats.values()) / len(stats),
                "rel_drift": sum(s["rel_drift"] for s in stats.values()) / len(stats),
                "matrices": stats}

    @staticmethod
    def _layer_hooks(student, teacher, layers: list[int], captured: dict[str, list[torch.Tensor]]):
        def keep(key: str):
            return lambda _module, _inputs, output: captured[key].append(
                output[0] if isinstance(output, tuple) else output)

        hooks = []
        for layer in layers:
            hooks.append(student.model.layers[layer].register_forward_hook(keep("student")))
            hooks.append(teacher.model.layers[layer].register_forward_hook(keep("teacher")))
        return hooks

    @staticmethod
    def _mse(captured: dict[str, list[torch.Tensor]]) -> torch.Tensor:
        """Per-layer output MSE to the teacher's layer outputs, relative to their power."""
        pairs = list(zip(captured["student"], captured["teacher"]))
        captured["student"].clear()
        captured["teacher"].clear()
        return sum((s - t.detach()).pow(2).mean() / t.detach().pow(2).mean() for s, t in pairs
                   ) / len(pairs)

    def _finish(self, run: _Run, checkpoint: Checkpoint, seconds: float) -> dict:
        options = self.options
        best = load_file(str(self.work / "best.safetensors"))
        quantized = dict(checkpoint.quantized)
        for name in quantized:
            if f"{name}.codes" in best:
                quantized[name] = quantized_from_tensors(best, name, checkpoint.spec)
        last = [line for line in self.record.lines() if line.get("event") == "snapshot"][-1]
        observed = {name: stats["escape_frac"] for name, stats in last["matrices"].items()}
        budget = options.steps * run.lr
        predicted = {name: budget > radius for name, radius in run.radii.items()}
        summary = {
            "layers": run.layers, "steps": options.steps, "lr": run.lr,
            "temperature": [options.t_start, options.t_end], "loss": options.loss,
            "validation_ppl": {"ptq": run.ptq_ppl, "best_hardened": run.best_ppl},
            "best_step": run.best_step, "seconds": round(seconds, 1),
            # Held: every matrix predicted to escape did change codes by the last snapshot, and
            # every matrix predicted to stay kept its PTQ codes.
            "drift_budget": {"budget": budget, "radii": run.radii, "predicted_escape": predicted,
                             "observed_escape_frac": observed,
                             "escape_condition_held": all(predicted[n] == (observed[n] > 0)
                                                          for n in predicted)},
        }
        final = self.work / "final"
        if final.exists():
            shutil.rmtree(final)
        final.mkdir()
        trellis = dict(checkpoint.trellis)
        trellis.pop("format_version", None)
        trellis["qat"] = {"method": "bcjr", "from": self.checkpoint_dir.name, **{
            k: summary[k] for k in ("layers", "steps", "lr", "temperature", "loss", "best_step",
                                    "validation_ppl")}}
        save_checkpoint(final, checkpoint.config, trellis, quantized, checkpoint.dense)
        for item in self.checkpoint_dir.iterdir():
            if item.is_file() and item.name not in (CONFIG_FILE, WEIGHTS_FILE):
                shutil.copy2(item, final / item.name)
        lines = self.record.lines()
        (final / "qat_record.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        plot(lines, final / "qat_record.png")
        (final / "qat_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        load_checkpoint(final)  # never publish a checkpoint that does not load
        os.replace(final, self.out)
        shutil.rmtree(self.work)
        return summary


def train_qat(checkpoint_dir: str | Path, out: str | Path, options: QatOptions) -> dict:
    """Run BCJR-QAT from a PTQ checkpoint into a new packed checkpoint; returns the run summary."""
    return Trainer(Path(checkpoint_dir), Path(out), options).run()
