"""The training recipe on the built-in SmolLM2-135M: each stage alone and the default, in one run.

From one PTQ checkpoint, runs `trellis qat` through the real CLI once per row (so wall times are what
a user sees) and scores every result on the same evaluation text as benchmarks/ptq_smollm2.py (the
first 16,384 tokens of the built-in evaluation part, 512-token windows; training chooses its
snapshots on held-out calibration text, never on this). Rows:

    float            the float model (the reference)
    ptq              the PTQ checkpoint the rows start from
    bcjr_one_layer   BCJR-QAT alone on the layer that costs the most KL, 12 steps
    finetune         end-to-end fine-tuning alone (codes frozen), 128 steps
    bcjr_all_layers  BCJR-QAT alone on every layer
    bcjr_then_finetune  BCJR-QAT of one layer, then fine-tuning (128 steps, as the finetune row)
    recipe           `trellis qat` with no flags (on CPU: fine-tuning alone, 384 steps)

Each row reports perplexity, its ratio to float, the wall time and the bits per quantized weight
with every piece of side data counted (codes, vectors, scale, table); trained rows also give each
stage's gain on held-out calibration text against that stage's own starting checkpoint. Results go to
benchmarks/results/recipe_smollm2.json, written after every row, so `--rows` can fill a table in
parts; a row measured again replaces its old entry.

    .venv/bin/python benchmarks/recipe_smollm2.py PTQ_CHECKPOINT [--rows ptq,finetune,...]
        [--work DIR] [--max-tokens 16384]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from ptq_smollm2 import evaluate as evaluate_model

from qat.recipe import SUMMARY_FILES
from qat.sources import load_any_model
from qat.text import evaluation_text
from trellis_runtime.checkpoint import load_checkpoint

RESULTS = Path(__file__).parent / "results" / "recipe_smollm2.json"
TRAINED_ROWS = {"bcjr_one_layer": ["--stages", "bcjr", "--layers", "auto", "--steps", "12"],
                "finetune": ["--stages", "finetune", "--finetune-steps", "128"],
                "bcjr_all_layers": ["--stages", "bcjr", "--layers", "all"],
                "bcjr_then_finetune": ["--stages", "bcjr,finetune", "--finetune-steps", "128"],
                "recipe": []}
ROWS = ("float", "ptq", *TRAINED_ROWS)


def evaluate(source: str, text: str, max_tokens: int) -> float:
    """The PTQ table's protocol (benchmarks/ptq_smollm2.py) on any model source."""
    return evaluate_model(*load_any_model(source), text, max_tokens)


def bits_per_weight(directory: Path) -> float:
    """Every stored bit of the quantized linears (codes, vectors, scales, tables) per weight."""
    checkpoint = load_checkpoint(directory)
    bits = weights = 0
    for name, weight in checkpoint.quantized.items():
        bits += sum(t.numel() * t.element_size() * 8 for t in weight.tensors(name).values())
        weights += weight.shape[0] * weight.shape[1]
    return bits / weights


def stage_gains(directory: Path) -> dict:
    """Per stage that made `directory`: held-out calibration perplexity at its start and at the
    snapshot it kept, and its seconds (from the summaries each stage leaves in its output)."""
    gains = {}
    for stage, name in SUMMARY_FILES.items():
        summary = directory / name
        if summary.is_file():
            data = json.loads(summary.read_text())
            gains[stage] = {**data["validation_ppl"], "seconds": data["seconds"]}
    return gains


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("checkpoint", help="the PTQ checkpoint every row starts from")
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--work", default=None, help="directory for the trained checkpoints")
    parser.add_argument("--max-tokens", type=int, default=16384)
    args = parser.parse_args()
    rows = [row.strip() for row in args.rows.split(",") if row.strip()]
    unknown = [row for row in rows if row not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    ptq = Path(args.checkpoint)
    work = Path(args.work or tempfile.mkdtemp(prefix="recipe-smollm2-"))
    text = evaluation_text(None)
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"rows": {}}
    results.update({"machine": platform.processor() or platform.machine(),
                    "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "checkpoint": ptq.name, "eval": {"text": "built-in Wikipedia evaluation part",
                                                     "ctx": 512, "max_tokens": args.max_tokens}})
    for row in rows:
        entry: dict = {"date": time.strftime("%Y-%m-%d %H:%M")}
        if row == "float":
            entry["ppl"] = evaluate(load_checkpoint(ptq).trellis["source"], text, args.max_tokens)
        elif row == "ptq":
            entry.update(ppl=evaluate(str(ptq), text, args.max_tokens), bits=bits_per_weight(ptq))
        else:
            out = work / row
            started = time.time()
            subprocess.run([sys.executable, "-m", "trellis_cli", "qat", str(ptq), "--out", str(out),
                            *TRAINED_ROWS[row]], check=True)
            entry.update(flags=TRAINED_ROWS[row], wall_seconds=round(time.time() - started, 1),
                         ppl=evaluate(str(out), text, args.max_tokens), bits=bits_per_weight(out),
                         stages=stage_gains(out))
        float_ppl = results["rows"].get("float", entry if row == "float" else {}).get("ppl")
        if float_ppl:
            entry["ratio_to_float"] = entry["ppl"] / float_ppl
        results["rows"][row] = entry
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")
        print(f"{row}: {json.dumps(entry)}", flush=True)


if __name__ == "__main__":
    main()
