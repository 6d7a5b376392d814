"""BCJR-QAT: train trellis latents through the soft trellis against the float model, then harden.

One run: check the drift budget, then for each step take a window of calibration text, compute the
forward KL between the float teacher and the student (whose trained layers use the BCJR soft
reconstruction at the step's temperature), and take an AdamW step on the latents. Every
`eval_every` steps and at the end, the latents are hardened by Viterbi and the hardened student is
scored on held-out text; the best hardened snapshot (the PTQ solution itself counts as step 0) is
what the output checkpoint stores, in the same packed format `trellis serve` loads.

Like `trellis quantize`, the run is atomic and resumable: everything lives in `.<out>.partial`
beside the output (arguments, the latest snapshot with optimizer state, the best hardened codes,
the record) until the finished checkpoint is renamed into place. A run that fails before its first
snapshot removes the directory; after it, the directory stays for a rerun to resume.

This module holds the order of a run; its parts live beside it: train_options (what the command
takes), train_setup (the checkpoint, the trained layers, the learning rate against the drift
budget), train_loop (the optimizer and the steps), hardened_eval (scoring hardened snapshots,
keeping the best), snapshot (what a resume restores) and train_output (the summary and the
published checkpoint).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from qat.distill import TextWindows, dense_student, load_teacher, make_soft
from qat.hardened_eval import BEST_FILE, score_ptq
from qat.record import Record
from qat.snapshot import SNAPSHOT_FILE, RunState, load_snapshot, read_run_state, save_snapshot
from qat.soft_linear import SoftTrellisLinear
from qat.text import training_text
from qat.train_loop import make_optimizer, train
from qat.train_options import QatOptions
from qat.train_output import summarize, trained_weights, write_checkpoint
from qat.train_setup import choose_layers, load_trainable, parse_layers, plan_run
from qat.workdir import prepare, publish, removed_unless_resumable, work_dir
from trellis_runtime.checkpoint import Checkpoint
from trellis_runtime.errors import TrellisError


class Trainer:
    """One QAT run from a PTQ checkpoint to `out`: set up or resume, train, publish."""

    def __init__(self, checkpoint_dir: Path, out: Path, options: QatOptions) -> None:
        self.checkpoint_dir, self.out, self.options = Path(checkpoint_dir), Path(out), options
        self.work = work_dir(self.out)
        self.record = Record(self.work / "record.jsonl")

    def run(self) -> dict:
        options = self.options
        options.check()
        started = time.time()
        checkpoint = load_trainable(self.checkpoint_dir, options.train_table)
        layers = parse_layers(options.layers, checkpoint.shape.layers, options.device)
        text = training_text(options.calib_text)
        if self.out.exists():
            raise TrellisError(f"{self.out} already exists; remove it or choose another --out")
        # Worth resuming once the first snapshot is saved; refused before that, nothing stays.
        with removed_unless_resumable(self.out, lambda work: (work / SNAPSHOT_FILE).is_file()):
            resuming = self._prepare_work()
            teacher, tokenizer = load_teacher(checkpoint, options.teacher, options.device)
            teacher.requires_grad_(False)
            windows = TextWindows.from_text(tokenizer, text, options.ctx, options.steps,
                                            options.validation_tokens, options.seed)
            student = dense_student(checkpoint, options.device)
            if layers is None:
                layers = choose_layers(student, teacher, checkpoint, windows)
            soft = make_soft(student, checkpoint, layers, options.train_table, options.train_scale,
                             options.device)
            if resuming:
                run = read_run_state(self.work / SNAPSHOT_FILE)
                optimizer = make_optimizer(soft, run.lr)
                load_snapshot(self.work / SNAPSHOT_FILE, soft, optimizer)
                self.record.truncate_after(run.step)
                print(f"resuming {self.out.name} from step {run.step} of {options.steps}")
            else:
                run = plan_run(soft, layers, options.lr, options.steps, options.seed)
                optimizer = make_optimizer(soft, run.lr)
                self._start(run, student, soft, optimizer, windows)
            train(run, student, teacher, soft, optimizer, windows, options, self.record, self.work)
            return self._finish(run, checkpoint, time.time() - started)

    def _prepare_work(self) -> bool:
        """Create or reuse the work directory; True when resuming."""
        prepare(self.out, json.dumps({"checkpoint": str(self.checkpoint_dir.resolve()),
                                      "options": asdict(self.options)}, sort_keys=True))
        return (self.work / SNAPSHOT_FILE).is_file()

    def _start(self, run: RunState, student, soft: dict[str, SoftTrellisLinear],
               optimizer: torch.optim.Optimizer, windows: TextWindows) -> None:
        """Step 0: the PTQ solution's score and the first snapshot."""
        score_ptq(run, student, soft, windows.validation, self.work)
        self.record.path.unlink(missing_ok=True)
        self.record.append({"step": 0, "hard_ppl": run.ptq_ppl, "escape_frac": 0.0,
                            "temperature": self.options.temperature(0), "event": "ptq"})
        save_snapshot(self.work / SNAPSHOT_FILE, run, soft, optimizer)

    def _finish(self, run: RunState, checkpoint: Checkpoint, seconds: float) -> dict:
        quantized = trained_weights(checkpoint, self.work / BEST_FILE)
        lines = self.record.lines()
        summary = summarize(run, self.options, lines, seconds)
        publish(self.out, lambda final: write_checkpoint(final, checkpoint, self.checkpoint_dir,
                                                         quantized, summary, lines))
        return summary


def train_qat(checkpoint_dir: str | Path, out: str | Path, options: QatOptions) -> dict:
    """Run BCJR-QAT from a PTQ checkpoint into a new packed checkpoint; returns the run summary."""
    return Trainer(Path(checkpoint_dir), Path(out), options).run()
