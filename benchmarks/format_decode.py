"""CPU decode speed of a format-2 checkpoint (real vectors) against format 1 (±1 signs), side by side.

Fine-tuning turns the ±1 sign vectors into real float16 vectors (format 2); the codes stay the same.
Every backend multiplies the vectors where it multiplied the signs, so decoding should cost the same.
This loads both checkpoints in one process and, round after round, times each one's single-stream
greedy decode and 8-sequence batched steps in turn (a burst of load from elsewhere hits both alike);
it reports medians after a warm-up round and the ratio format 2 / format 1 (goal: within 5%).
Writes benchmarks/results/format_decode.json.

    .venv/bin/python benchmarks/format_decode.py FORMAT1_CHECKPOINT FORMAT2_CHECKPOINT
        [--new-tokens 64] [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from runtime_decode import BATCH, PROMPT_TOKENS, batched_steps, timed, trellis_greedy

from trellis_runtime.checkpoint import load_checkpoint
from trellis_runtime.linear import TrellisLinear
from trellis_runtime.model import TrellisModel

RESULTS = Path(__file__).parent / "results" / "format_decode.json"


def load(path: str) -> tuple[int, TrellisModel]:
    checkpoint = load_checkpoint(path)
    return checkpoint.trellis["format_version"], TrellisModel.from_checkpoint(checkpoint, "cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("format1", help="a checkpoint with ±1 sign vectors (format 1)")
    parser.add_argument("format2", help="a checkpoint with real vectors (format 2)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    models = dict((load(args.format1), load(args.format2)))
    if sorted(models) != [1, 2]:
        parser.error(f"need one format-1 and one format-2 checkpoint, got formats {sorted(models)}")
    torch.manual_seed(0)
    vocab = models[1].lm_head.shape[0]
    prompt = torch.randint(0, vocab, (PROMPT_TOKENS,)).tolist()
    prompts = [torch.randint(0, vocab, (PROMPT_TOKENS,)).tolist() for _ in range(BATCH)]
    n = args.new_tokens
    caches = {version: model.new_cache(max_slots=BATCH, max_seq_len=PROMPT_TOKENS + n)
              for version, model in models.items()}
    samples: dict[str, list[float]] = {}
    with torch.inference_mode():
        for round_ in range(args.runs + 1):  # round 0 warms up
            for version, model in models.items():
                cache = caches[version]
                for name, seconds in (
                        ("single", timed(lambda: trellis_greedy(model, cache, prompt, n))),
                        ("batched", batched_steps(model, cache, prompts, n))):
                    if round_:
                        samples.setdefault(f"format{version}_{name}", []).append(seconds)
    median = {name: statistics.median(values) for name, values in samples.items()}
    rates = {f"format{v}_single": n / median[f"format{v}_single"] for v in models} | {
        f"format{v}_batched_{BATCH}": BATCH * n / median[f"format{v}_batched"] for v in models}
    result = {
        "date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "checkpoints": {"format1": Path(args.format1).name, "format2": Path(args.format2).name},
        "linear_backends": sorted({type(m.backend).__name__ for model in models.values()
                                   for m in model.modules() if isinstance(m, TrellisLinear)}),
        "new_tokens": n, "runs": args.runs, "tokens_per_second": rates,
        "format2_over_format1": {
            "single": rates["format2_single"] / rates["format1_single"],
            f"batched_{BATCH}": rates[f"format2_batched_{BATCH}"] / rates[f"format1_batched_{BATCH}"]},
        "samples_seconds": samples,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    for name, rate in rates.items():
        print(f"{name:<22}{rate:>8.1f} tokens/s")
    for name, ratio in result["format2_over_format1"].items():
        print(f"format 2 / format 1, {name}: {ratio:.3f}")


if __name__ == "__main__":
    main()
