"""What logprobs cost the engine, on one packed checkpoint, measured in one process.

  decode    8 concurrent greedy requests of --new-tokens each, aggregate new tokens per second:
            without logprobs, and with logprobs=20 (a log_softmax and a topk over the vocabulary for
            each sampled row, one device-to-host copy per step)
  scoring   one --prompt-tokens prompt: prefilled for one generated token (logits of the last
            position only), and scored with max_tokens=0 and prompt_logprobs=1 (logits, log_softmax
            and topk for every position: what an evaluation harness's loglikelihood request costs)
Every figure is the median of --runs rounds after a warm-up round; a round measures each case once,
in turn, so a burst of load from elsewhere hits every case alike.
Writes benchmarks/results/logprobs_cost.json.

    .venv/bin/python benchmarks/logprobs_cost.py CHECKPOINT [--new-tokens 32] [--prompt-tokens 256]
        [--runs 5] [--device cpu]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from trellis_runtime.engine import Engine
from trellis_runtime.model import load_model
from trellis_runtime.sampling import SamplingParams

RESULTS = Path(__file__).parent / "results" / "logprobs_cost.json"
BATCH = 8


def timed(work: Callable[[], object]) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    model, tokenizer = load_model(args.checkpoint, args.device)
    vocab = model.shape.vocab
    prompts = [[(17 * i + 5 * j) % (vocab - 100) + 100 for j in range(16)] for i in range(BATCH)]
    long_prompt = [(31 * j) % (vocab - 100) + 100 for j in range(args.prompt_tokens)]

    with Engine(model, tokenizer, max_batch=BATCH) as engine:
        def decode(logprobs: int | None) -> Callable[[], object]:
            params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True,
                                    logprobs=logprobs)

            async def batch() -> None:
                async def one(prompt: list[int]) -> None:
                    async for _ in engine.generate(prompt, params):
                        pass
                await asyncio.gather(*(one(p) for p in prompts))
            return lambda: asyncio.run(batch())

        cases = {
            "decode_plain": decode(None),
            "decode_logprobs_20": decode(20),
            "prefill_then_one_token": lambda: engine.generate_text(
                long_prompt, SamplingParams(temperature=0, max_tokens=1)),
            "prompt_scored": lambda: engine.generate_text(
                long_prompt, SamplingParams(max_tokens=0, prompt_logprobs=1)),
        }
        samples: dict[str, list[float]] = {name: [] for name in cases}
        for round_ in range(args.runs + 1):
            for name, work in cases.items():
                seconds = timed(work)
                if round_:  # round 0 warms up
                    samples[name].append(seconds)

    median = {name: statistics.median(values) for name, values in samples.items()}
    new_tokens = BATCH * args.new_tokens
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": args.device,
        "checkpoint": Path(args.checkpoint).name,
        "vocab": vocab,
        "batch": BATCH,
        "new_tokens": args.new_tokens,
        "prompt_tokens": args.prompt_tokens,
        "runs": args.runs,
        "decode_tokens_per_second": {
            "plain": new_tokens / median["decode_plain"],
            "logprobs_20": new_tokens / median["decode_logprobs_20"],
        },
        "decode_slowdown_with_logprobs": median["decode_logprobs_20"] / median["decode_plain"],
        "prompt_seconds": {
            "prefill_then_one_token": median["prefill_then_one_token"],
            "scored": median["prompt_scored"],
        },
        "scoring_slowdown": median["prompt_scored"] / median["prefill_then_one_token"],
        "samples_seconds": samples,
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "samples_seconds"}, indent=2))


if __name__ == "__main__":
    main()
