"""BCJR-QAT of the built-in SmolLM2-135M with the default CPU settings, against its PTQ checkpoint.

Runs `trellis qat PTQ --out QAT` through the real CLI with no tuning flags (so the wall time is what
a user sees), then scores the PTQ checkpoint it started from and the hardened QAT checkpoint on the
same evaluation text as benchmarks/ptq_smollm2.py (the first 16,384 tokens of the built-in
evaluation part, 512-token windows; QAT selects its snapshot on held-out calibration text, never on
this). Writes benchmarks/results/qat_smollm2.json with the run's summary (drift budget included).

    .venv/bin/python benchmarks/qat_smollm2.py [PTQ_CHECKPOINT] [--work DIR] [--qat-flag=VALUE ...]

Flags it does not know (write them as --flag=value) go to `trellis qat`, e.g. --steps=24 --layers=0,7.

PTQ_CHECKPOINT defaults to the cached 2-bit checkpoint `trellis serve` makes on first use.
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

from qat.perplexity import perplexity
from qat.sources import load_any_model
from qat.text import evaluation_text

RESULTS = Path(__file__).parent / "results" / "qat_smollm2.json"


def evaluate(path: Path, text: str, max_tokens: int) -> float:
    model, tokenizer = load_any_model(str(path))
    tokens = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.int64)
    return perplexity(model, tokens, ctx=512, max_tokens=max_tokens)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("checkpoint", nargs="?", default=None)
    parser.add_argument("--work", default=None, help="directory for the QAT checkpoint (default: temp)")
    parser.add_argument("--max-tokens", type=int, default=16384)
    args, extra = parser.parse_known_args()  # anything else is passed to `trellis qat`
    if args.checkpoint is None:
        from trellis_cli.serve_commands import checkpoint_for

        args.checkpoint = str(checkpoint_for(None, "cpu"))
    ptq = Path(args.checkpoint)
    out = Path(args.work or tempfile.mkdtemp(prefix="qat-smollm2-")) / "qat"

    started = time.time()
    subprocess.run([sys.executable, "-m", "trellis_cli", "qat", str(ptq), "--out", str(out),
                    *extra], check=True)
    seconds = time.time() - started

    text = evaluation_text(None)
    rows = {"ptq": evaluate(ptq, text, args.max_tokens), "qat": evaluate(out, text, args.max_tokens)}
    summary = json.loads((out / "qat_summary.json").read_text())
    result = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "checkpoint": ptq.name, "qat_flags": extra, "wall_seconds": round(seconds, 1),
              "eval": {"text": "built-in Wikipedia evaluation part", "ctx": 512,
                       "max_tokens": args.max_tokens},
              "eval_ppl": rows, "qat_summary": summary}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"PTQ {rows['ptq']:.3f} -> QAT {rows['qat']:.3f} on the evaluation text; "
          f"trellis qat took {seconds / 60:.1f} min (layers {summary['layers']}, "
          f"{summary['steps']} steps, escape condition held: "
          f"{summary['drift_budget']['escape_condition_held']})")


if __name__ == "__main__":
    main()
