"""`trellis qat`: the training recipe from a PTQ checkpoint, stage after stage.

The stages (QatOptions.stages) run in a fixed order, each from the previous one's checkpoint:
1. bcjr: BCJR-QAT of the codes (qat.train), hardened back to packed codes;
2. finetune: end-to-end distillation of the continuous parameters with the codes frozen
   (qat.finetune), QuIP#'s and QTIP's last stage.

A single stage writes `out` itself. Several stages work inside `.<out>.partial`: each stage's
finished checkpoint is a directory there named after the stage (with its own resumable work
directory beside it while it runs), and the last one is renamed to `out` when it is done. A killed
recipe resumes at the stage it was in, from that stage's last snapshot.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

from qat.finetune import FinetuneOptions, finetune
from qat.train import train_qat
from qat.train_options import QatOptions
from qat.workdir import prepare, removed_unless_resumable, work_dir
from trellis_runtime.checkpoint import is_checkpoint
from trellis_runtime.errors import TrellisError


SUMMARY_FILES = {"bcjr": "qat_summary.json", "finetune": "finetune_summary.json"}  # in each output


def finetune_options(options: QatOptions) -> FinetuneOptions:
    """The fine-tuning stage's options, from the recipe's."""
    steps = options.finetune_step_count()
    return FinetuneOptions(
        steps=steps, lr=options.finetune_lr, ctx=options.finetune_ctx,
        eval_every=max(1, steps // 4), train_table=options.finetune_table,
        train_embeddings=options.finetune_embeddings,
        validation_tokens=options.validation_tokens, calib_text=options.calib_text,
        teacher=options.teacher, seed=options.seed, device=options.device)


def _run_stage(stage: str, source: Path, out: Path, options: QatOptions) -> dict:
    if stage == "bcjr":
        return train_qat(source, out, options)
    return finetune(source, out, finetune_options(options))


def _started(work: Path) -> bool:
    """Whether a recipe's work directory holds anything a rerun resumes from."""
    return any(path.is_dir() for path in work.iterdir()) if work.is_dir() else False


def run_recipe(checkpoint_dir: str | Path, out: str | Path, options: QatOptions) -> dict:
    """Run the options' stages from `checkpoint_dir` into `out`; the summaries by stage."""
    options.check()
    stages = options.stage_list()
    source, out = Path(checkpoint_dir), Path(out)
    if len(stages) == 1:
        return {stages[0]: _run_stage(stages[0], source, out, options)}
    if out.exists():
        raise TrellisError(f"{out} already exists; remove it or choose another --out")
    work = work_dir(out)
    summaries: dict[str, dict] = {}
    with removed_unless_resumable(out, _started):
        prepare(out, json.dumps({"checkpoint": str(source.resolve()), "options": asdict(options)},
                                sort_keys=True))
        for stage in stages:
            target = work / stage
            if is_checkpoint(target):
                summaries[stage] = json.loads((target / SUMMARY_FILES[stage]).read_text())
                print(f"stage {stage}: done earlier, resuming after it")
            else:
                summaries[stage] = _run_stage(stage, source, target, options)
            source = target
        os.replace(source, out)
        shutil.rmtree(work)
    return summaries
