"""Scoring hardened latents, and the rule that picks the snapshot a QAT run publishes.

Training runs on the soft (BCJR) reconstruction, but a checkpoint stores hard Viterbi codes, so
progress is judged on what would be stored: the latents are hardened and the student is scored with
those weights on held-out text. The PTQ solution itself is scored first (step 0), and a hardened
snapshot replaces the kept codes only when its perplexity is lower, so a run never publishes worse
codes than it started from.
"""

from __future__ import annotations

from pathlib import Path

import torch

from qat.drift import escape_stats
from qat.perplexity import perplexity
from qat.snapshot import SNAPSHOT_FILE, RunState, save_snapshot
from qat.soft_linear import SoftTrellisLinear
from qat.workdir import atomic_save
from trellis_runtime.quantized import QuantizedWeight

VALIDATION_CTX = 512
BEST_FILE = "best.safetensors"  # the packed codes of the best hardened snapshot so far


@torch.no_grad()
def hardened_perplexity(student, soft: dict[str, SoftTrellisLinear], hard: dict[str, QuantizedWeight],
                        validation: torch.Tensor) -> float:
    """The student's perplexity on `validation` with the trained layers set to the `hard` weights."""
    for name, module in soft.items():
        module.use_hard(hard[name])
    try:
        ppl, _ = perplexity(student, validation, ctx=VALIDATION_CTX)
    finally:
        for module in soft.values():
            module.use_hard(None)
    return ppl


def _keep(hard: dict[str, QuantizedWeight], work: Path) -> None:
    atomic_save({k: v for name, w in hard.items() for k, v in w.tensors(name).items()},
                work / BEST_FILE)


def score_ptq(run: RunState, student, soft: dict[str, SoftTrellisLinear], validation: torch.Tensor,
              work: Path) -> None:
    """Step 0: the PTQ solution's score, which is the first best and what later snapshots must beat."""
    ptq = {name: module.ptq for name, module in soft.items()}
    run.ptq_ppl = run.best_ppl = hardened_perplexity(student, soft, ptq, validation)
    _keep(ptq, work)


def evaluate_snapshot(run: RunState, student, soft: dict[str, SoftTrellisLinear],
                      optimizer: torch.optim.Optimizer, validation: torch.Tensor, work: Path) -> dict:
    """Harden, score, keep the best, and save everything a resume needs; the record's fields."""
    hard = {name: module.harden() for name, module in soft.items()}
    ppl = hardened_perplexity(student, soft, hard, validation)
    stats = {name: escape_stats(soft[name].ptq, weight) for name, weight in hard.items()}
    if ppl < run.best_ppl:
        run.best_ppl, run.best_step = ppl, run.step
        _keep(hard, work)
    save_snapshot(work / SNAPSHOT_FILE, run, soft, optimizer)
    return {"hard_ppl": ppl, "event": "snapshot",
            "escape_frac": sum(s["escape_frac"] for s in stats.values()) / len(stats),
            "rel_drift": sum(s["rel_drift"] for s in stats.values()) / len(stats),
            "matrices": stats}
