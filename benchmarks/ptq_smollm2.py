"""The built-in SmolLM2-135M at 2 bits on this machine: time, size on disk and perplexity.

Runs, in one process and on the same evaluation text:
  float model | trellis --no-hessian | trellis with Hessian (BlockLDLQ) | 3-bit RTN, groups of 64
and writes benchmarks/results/ptq_smollm2.json. Each quantization goes through the real CLI
(`trellis quantize`) with its default settings for the device, so the times are what a user sees.

    .venv/bin/python benchmarks/ptq_smollm2.py [--max-tokens 16384] [--work DIR]
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
from qat.rtn import rtn_quantize_
from qat.sources import load_any_model, load_float_model, resolve_source
from qat.text import evaluation_text
from trellis_runtime.checkpoint import WEIGHTS_FILE, load_checkpoint

RESULTS = Path(__file__).parent / "results" / "ptq_smollm2.json"


def evaluate(model, tokenizer, text: str, max_tokens: int) -> float:
    tokens = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.int64)
    return perplexity(model, tokens, ctx=512, max_tokens=max_tokens)[0]


def quantize(out: Path, extra: list[str]) -> float:
    started = time.time()
    subprocess.run([sys.executable, "-m", "trellis_cli", "quantize", "smollm2-135m",
                    "--out", str(out), *extra], check=True)
    return time.time() - started


def linear_bits(directory: Path) -> dict:
    checkpoint = load_checkpoint(directory)
    code_bytes = sum(q.codes.numel() * 4 for q in checkpoint.quantized.values())
    weights = sum(q.shape[0] * q.shape[1] for q in checkpoint.quantized.values())
    return {"disk_bytes": sum(f.stat().st_size for f in directory.iterdir()),
            "weights_file_bytes": (directory / WEIGHTS_FILE).stat().st_size,
            "code_bytes": code_bytes, "quantized_weights": weights,
            "code_bits_per_weight": code_bytes * 8 / weights, "spec": checkpoint.trellis["spec"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--work", default=None, help="directory for the checkpoints (default: temp)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="ptq-smollm2-"))
    text = evaluation_text(None)
    rows = {}

    model, tokenizer = load_float_model(resolve_source("smollm2-135m"))
    rows["float"] = {"ppl": evaluate(model, tokenizer, text, args.max_tokens)}
    rtn_quantize_(model, bits=3, group=64)
    rows["rtn_3bit_g64"] = {"ppl": evaluate(model, tokenizer, text, args.max_tokens),
                            "bits_per_weight": 3 + 2 * 16 / 64}  # fp16 scale and offset per group
    del model

    for name, extra in (("trellis_no_hessian", ["--no-hessian"]), ("trellis_hessian", [])):
        out = work / name
        seconds = quantize(out, extra) if not out.exists() else None
        model, tokenizer = load_any_model(str(out))
        rows[name] = {"seconds": seconds, "ppl": evaluate(model, tokenizer, text, args.max_tokens),
                      **linear_bits(out)}
        del model

    result = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "eval": {"text": "built-in Wikipedia evaluation part", "ctx": 512,
                       "max_tokens": args.max_tokens}, "rows": rows}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'model':<22}{'ppl':>10}{'time s':>10}{'bits/w':>8}")
    for name, row in rows.items():
        seconds = row.get("seconds")
        bits = row.get("code_bits_per_weight", row.get("bits_per_weight", 32))
        print(f"{name:<22}{row['ppl']:>10.3f}{seconds if seconds else '':>10}{bits:>8.3f}")


if __name__ == "__main__":
    main()
