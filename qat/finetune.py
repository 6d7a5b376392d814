"""End-to-end distillation of a packed checkpoint's continuous parameters, its codes frozen.

QuIP#'s and QTIP's fine-tuning stage, on our format: the student is the whole quantized model
(qat.finetune_model), trained by forward KL to the float teacher's full-vocabulary distribution on
calibration windows, with AdamW and a cosine learning rate. Every `eval_every` steps the trained
parameters are rounded to their stored dtypes and the student is scored on held-out calibration text;
the best scored state is what the output stores (the starting checkpoint is the step-0 candidate, so
the output is never worse than the input on that text).

The output is format 2 (trellis_runtime.checkpoint): real input/output vectors in float16 where
format 1 has ±1 signs, which every backend multiplies the same way. Like `trellis qat`, the run works
in `.<out>.partial`, snapshots its parameters and optimizer state at every evaluation, and resumes
from the last one when started again with the same arguments.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from qat.distill import TextWindows, dense_student, kl_to_teacher, load_teacher
from qat.finetune_model import exported, make_tuned, round_to_storage, trained_modules
from qat.hardened_eval import VALIDATION_CTX
from qat.perplexity import perplexity
from qat.record import Record, plot
from qat.snapshot import load_snapshot, save_snapshot
from qat.text import training_text
from qat.train_options import FINETUNE_STEPS
from qat.workdir import prepare, publish, read_metadata, removed_unless_resumable, work_dir
from trellis_runtime.checkpoint import CONFIG_FILE, WEIGHTS_FILE, Checkpoint, save_checkpoint
from trellis_runtime.errors import TrellisError

SNAPSHOT_FILE = "finetune.safetensors"
BEST_FILE = "finetune-best.safetensors"


@dataclass(frozen=True)
class FinetuneOptions:
    """One end-to-end distillation run."""

    steps: int = FINETUNE_STEPS["cpu"]  # the CLI's CPU default (the recipe passes its own)
    lr: float = 2e-3  # vectors and norms (both are ~1 in size)
    table_lr: float = 5e-4  # table entries are ~1 in size, and each moves many weights
    train_table: bool = True  # moot for computed codes (no table)
    embedding_lr: float = 1e-4  # embedding entries are ~0.1 in size
    train_embeddings: bool = False
    ctx: int = 512
    eval_every: int = 16
    validation_tokens: int = 8192
    calib_text: str | None = None
    teacher: str | None = None
    seed: int = 0
    device: str = "cpu"

    def check(self) -> None:
        if self.steps < 1 or self.eval_every < 1:
            raise TrellisError(f"fine-tuning needs steps >= 1 and eval_every >= 1, got "
                               f"{self.steps} and {self.eval_every}")
        if not (self.lr > 0 and self.table_lr > 0 and self.embedding_lr > 0):
            raise TrellisError(f"fine-tuning learning rates must be positive, got {self.lr}, "
                               f"{self.table_lr} and {self.embedding_lr}")

    def learning_rate_factor(self, step: int) -> float:
        """Cosine decay from 1 to 0 over the steps (step counts from 0)."""
        return 0.5 * (1 + math.cos(math.pi * step / self.steps))


@dataclass
class FinetuneState:
    step: int = 0
    start_ppl: float = math.inf
    best_ppl: float = math.inf
    best_step: int = 0


def _optimizer(modules: dict[str, nn.Module], options: FinetuneOptions) -> torch.optim.Optimizer:
    """AdamW over the trained parameters, each once (input vectors are shared within a group), with
    one learning rate per kind: vectors and norms, code tables, embeddings."""
    seen: set[int] = set()
    kinds: dict[str, list[nn.Parameter]] = {"plain": [], "table": [], "embedding": []}
    for module in modules.values():
        for name, param in module.named_parameters():
            if id(param) in seen or not param.requires_grad:
                continue
            seen.add(id(param))
            kind = "table" if name == "table" else (
                "embedding" if isinstance(module, (nn.Embedding, nn.Linear)) else "plain")
            kinds[kind].append(param)
    rates = {"plain": options.lr, "table": options.table_lr, "embedding": options.embedding_lr}
    return torch.optim.AdamW([{"params": params, "lr": rates[kind]}
                              for kind, params in kinds.items() if params], weight_decay=0.0)


@torch.no_grad()
def _score(student: nn.Module, modules: dict[str, nn.Module], validation: torch.Tensor) -> float:
    round_to_storage(modules)
    return perplexity(student, validation, ctx=VALIDATION_CTX)[0]


class Finetuner:
    """One fine-tuning run from a packed checkpoint to `out`: set up or resume, train, publish."""

    def __init__(self, checkpoint: Checkpoint, checkpoint_dir: Path, out: Path,
                 options: FinetuneOptions) -> None:
        self.checkpoint, self.checkpoint_dir, self.out = checkpoint, Path(checkpoint_dir), Path(out)
        self.options = options
        self.work = work_dir(self.out)
        self.record = Record(self.work / "finetune_record.jsonl")

    def run(self) -> dict:
        options, checkpoint = self.options, self.checkpoint
        options.check()
        started = time.time()
        text = training_text(options.calib_text)
        if self.out.exists():
            raise TrellisError(f"{self.out} already exists; remove it or choose another --out")
        with removed_unless_resumable(self.out, lambda work: (work / SNAPSHOT_FILE).is_file()):
            resuming = prepare(self.out, json.dumps({
                "checkpoint": str(self.checkpoint_dir.resolve()), "finetune": asdict(options)},
                sort_keys=True)) and (self.work / SNAPSHOT_FILE).is_file()
            teacher, tokenizer = load_teacher(checkpoint, options.teacher, options.device)
            teacher.requires_grad_(False)
            windows = TextWindows.from_text(tokenizer, text, options.ctx, options.steps,
                                            options.validation_tokens, options.seed)
            student = dense_student(checkpoint, options.device)
            modules = trained_modules(student, make_tuned(student, checkpoint, options.train_table),
                                      options.train_embeddings)
            optimizer = _optimizer(modules, options)
            if resuming:
                state = FinetuneState(**read_metadata(self.work / SNAPSHOT_FILE))
                load_snapshot(self.work / SNAPSHOT_FILE, modules, optimizer)
                self.record.truncate_after(state.step)
                print(f"resuming {self.out.name} from step {state.step} of {options.steps}")
            else:
                state = FinetuneState()
                state.start_ppl = state.best_ppl = _score(student, modules, windows.validation)
                self.record.path.unlink(missing_ok=True)
                self.record.append({"step": 0, "hard_ppl": state.start_ppl, "event": "start"})
                save_snapshot(self.work / BEST_FILE, state, modules, optimizer)
                save_snapshot(self.work / SNAPSHOT_FILE, state, modules, optimizer)
            self._train(state, student, teacher, modules, optimizer, windows)
            load_snapshot(self.work / BEST_FILE, modules, None)
            summary = {"steps": options.steps, "lr": options.lr, "train_table": options.train_table,
                       "train_embeddings": options.train_embeddings, "ctx": options.ctx, "best_step": state.best_step,
                       "validation_ppl": {"start": state.start_ppl, "best": state.best_ppl},
                       "seconds": round(time.time() - started, 1)}
            quantized, dense = exported(checkpoint, modules)
            publish(self.out, lambda final: self._write(final, quantized, dense, summary))
            return summary

    def _train(self, state: FinetuneState, student, teacher, modules: dict[str, nn.Module],
               optimizer: torch.optim.Optimizer, windows: TextWindows) -> None:
        options = self.options
        base_lrs = [group["lr"] for group in optimizer.param_groups]
        params = [p for group in optimizer.param_groups for p in group["params"]]
        progress = tqdm(total=options.steps, initial=state.step, desc="fine-tune", unit="step")
        try:
            while state.step < options.steps:
                factor = options.learning_rate_factor(state.step)
                for group, base in zip(optimizer.param_groups, base_lrs):
                    group["lr"] = base * factor
                window = windows.train[state.step][None].to(options.device)
                with torch.no_grad():
                    teacher_logits = teacher(window).logits
                kl = kl_to_teacher(student(window).logits, teacher_logits)
                optimizer.zero_grad(set_to_none=True)
                kl.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                state.step += 1
                entry = {"step": state.step, "kl": kl.item(), "grad_norm": grad_norm.item(),
                         "lr_factor": factor}
                if state.step % options.eval_every == 0 or state.step == options.steps:
                    entry.update(self._evaluate(state, student, modules, optimizer, windows))
                self.record.append(entry)
                progress.set_postfix(kl=f"{kl.item():.3f}", best=f"{state.best_ppl:.2f}")
                progress.update(1)
        finally:
            progress.close()

    def _evaluate(self, state: FinetuneState, student, modules: dict[str, nn.Module],
                  optimizer: torch.optim.Optimizer, windows: TextWindows) -> dict:
        ppl = _score(student, modules, windows.validation)
        if ppl < state.best_ppl:
            state.best_ppl, state.best_step = ppl, state.step
            save_snapshot(self.work / BEST_FILE, state, modules, optimizer)
        save_snapshot(self.work / SNAPSHOT_FILE, state, modules, optimizer)
        return {"hard_ppl": ppl, "event": "snapshot"}

    def _write(self, final: Path, quantized, dense, summary: dict) -> None:
        trellis = dict(self.checkpoint.trellis)
        trellis.pop("format_version", None)
        trellis["finetune"] = {"from": self.checkpoint_dir.name, **summary}
        save_checkpoint(final, self.checkpoint.config, trellis, quantized, dense)
        for item in self.checkpoint_dir.iterdir():
            if item.is_file() and item.name not in (CONFIG_FILE, WEIGHTS_FILE):
                shutil.copy2(item, final / item.name)
        lines = self.record.lines()
        (final / "finetune_record.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        plot(lines, final / "finetune_record.png")
        (final / "finetune_summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def finetune(checkpoint_dir: str | Path, out: str | Path, options: FinetuneOptions) -> dict:
    """Distil a packed checkpoint's continuous parameters end to end into a new checkpoint."""
    from trellis_runtime.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(checkpoint_dir)
    return Finetuner(checkpoint, Path(checkpoint_dir), Path(out), options).run()
