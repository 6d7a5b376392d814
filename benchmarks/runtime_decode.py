"""CPU decode speed of TrellisModel against transformers `generate` on the same dequantized weights.

Measured in one process, on one packed checkpoint:
  single stream   greedy decode with the KV cache, new tokens per second (prompt included in the time,
                  as it is for `generate`, which runs the same float32 weights)
  engine          the same through the generation engine in this process (its thread, sampling,
                  detokenizing, stop checks; no HTTP): what the engine adds per token
  batched         8 sequences advanced by one forward per step: aggregate new tokens per second
  prefill         one 256-token prompt, last token's logits only, next to transformers' forward
Every figure is the median of --runs rounds after a warm-up round; a round measures each item once,
in turn, so a burst of load from elsewhere on a shared machine hits both sides alike. Achieved
bandwidth counts the weight bytes a decode step reads: the packed codes and state tables where the CPU
kernel runs (else the decoded float32 matrices) and the output head as held.
Targets: single stream >= 2x `generate`, batched aggregate >= 3x single stream.
Writes benchmarks/results/runtime_decode.json.

    .venv/bin/python benchmarks/runtime_decode.py CHECKPOINT [--new-tokens 64] [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from qat.sources import dense_model_from_checkpoint
from trellis_runtime.backend_cpu import CpuBackend
from trellis_runtime.checkpoint import load_checkpoint
from trellis_runtime.engine import Engine
from trellis_runtime.kv_cache import KVCache
from trellis_runtime.linear import TrellisLinear
from trellis_runtime.model import TrellisModel
from trellis_runtime.sampling import SamplingParams

RESULTS = Path(__file__).parent / "results" / "runtime_decode.json"
PROMPT_TOKENS, BATCH, PREFILL_TOKENS = 16, 8, 256


def timed(work: Callable[[], object]) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def as_tensor(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


def trellis_greedy(model: TrellisModel, cache: KVCache, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy continuation of one sequence: prefill, then one forward per token (EOS ignored)."""
    slot = cache.allocate()
    try:
        logits = model(as_tensor(prompt), torch.arange(len(prompt)), as_tensor([slot] * len(prompt)),
                       cache, logits_for=as_tensor([len(prompt) - 1]))
        out = []
        slots = as_tensor([slot])
        for position in range(len(prompt), len(prompt) + new_tokens):
            token = logits.argmax(dim=-1)
            out.append(int(token))
            if len(out) == new_tokens:
                break
            logits = model(token, as_tensor([position]), slots, cache)
        return out
    finally:
        cache.free(slot)


def batched_steps(model: TrellisModel, cache: KVCache, prompts: list[list[int]], steps: int) -> float:
    """Prefill each prompt in its own slot (untimed), then time `steps` forwards that advance all."""
    slots = [cache.allocate() for _ in prompts]
    try:
        for slot, prompt in zip(slots, prompts):
            model(as_tensor(prompt), torch.arange(len(prompt)), as_tensor([slot] * len(prompt)), cache,
                  logits_for=as_tensor([len(prompt) - 1]))
        tokens = as_tensor([prompt[-1] for prompt in prompts])
        positions = as_tensor([len(prompt) for prompt in prompts])
        slot_tensor = as_tensor(slots)
        started = time.perf_counter()
        for _ in range(steps):
            tokens = model(tokens, positions, slot_tensor, cache).argmax(dim=-1)
            positions = positions + 1
        return time.perf_counter() - started
    finally:
        for slot in slots:
            cache.free(slot)


def step_weight_bytes(model: TrellisModel) -> int:
    """Weight bytes one decode step reads: what each linear's backend multiplies from, and the head."""
    total = model.lm_head.numel() * model.lm_head.element_size()
    for module in model.modules():
        if isinstance(module, TrellisLinear):
            backend = module.backend
            held = ((backend.codes, backend.lut) if isinstance(backend, CpuBackend)
                    else (backend.dense,))
            total += sum(t.numel() * t.element_size() for t in held)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("checkpoint")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)

    from transformers import AutoTokenizer

    checkpoint = load_checkpoint(args.checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    started = time.perf_counter()
    model = TrellisModel.from_checkpoint(checkpoint, "cpu")
    load_seconds = time.perf_counter() - started
    reference = dense_model_from_checkpoint(checkpoint)
    vocab = checkpoint.shape.vocab
    prompt = torch.randint(0, vocab, (PROMPT_TOKENS,)).tolist()
    prompts = [torch.randint(0, vocab, (PROMPT_TOKENS,)).tolist() for _ in range(BATCH)]
    long_prompt = torch.randint(0, vocab, (PREFILL_TOKENS,)).tolist()
    n = args.new_tokens
    cache = model.new_cache(max_slots=BATCH, max_seq_len=PREFILL_TOKENS + n)
    generate_kwargs = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=0, eos_token_id=None)

    def prefill() -> None:
        slot = cache.allocate()
        model(as_tensor(long_prompt), torch.arange(PREFILL_TOKENS), as_tensor([slot] * PREFILL_TOKENS),
              cache, logits_for=as_tensor([PREFILL_TOKENS - 1]))
        cache.free(slot)

    engine = Engine(model, tokenizer, max_batch=1, max_seq_len=PREFILL_TOKENS + n).start()
    engine_params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)

    measurements: dict[str, Callable[[], float]] = {
        "trellis_single": lambda: timed(lambda: trellis_greedy(model, cache, prompt, n)),
        "trellis_engine": lambda: timed(lambda: engine.generate_text(prompt, engine_params)),
        "transformers_generate": lambda: timed(
            lambda: reference.generate(as_tensor(prompt)[None], **generate_kwargs)),
        "trellis_batched": lambda: batched_steps(model, cache, prompts, n),
        "trellis_prefill": lambda: timed(prefill),
        "transformers_prefill": lambda: timed(lambda: reference(as_tensor(long_prompt)[None])),
    }
    samples: dict[str, list[float]] = {name: [] for name in measurements}
    with torch.inference_mode():
        ours = trellis_greedy(model, cache, prompt, n)
        theirs = reference.generate(as_tensor(prompt)[None], **generate_kwargs)[0, PROMPT_TOKENS:]
        for round_ in range(args.runs + 1):  # round 0 warms up: page faults, oneDNN primitives
            for name, measure in measurements.items():
                seconds = measure()
                if round_:
                    samples[name].append(seconds)
        engine_tokens = engine.generate_text(prompt, engine_params).token_ids
    engine.shutdown()
    median = {name: statistics.median(values) for name, values in samples.items()}
    single, generate, batched = (median[k] for k in ("trellis_single", "transformers_generate",
                                                     "trellis_batched"))
    prefill_seconds, reference_prefill = median["trellis_prefill"], median["transformers_prefill"]

    step_bytes = step_weight_bytes(model)
    backends = sorted({type(m.backend).__name__ for m in model.modules()
                       if isinstance(m, TrellisLinear)})
    rows = {
        "trellis_single": n / single,
        "trellis_engine": n / median["trellis_engine"],
        "transformers_generate": n / generate,
        f"trellis_batched_{BATCH}": BATCH * n / batched,
    }
    result = {
        "date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "checkpoint": Path(args.checkpoint).name, "spec": checkpoint.trellis["spec"],
        "new_tokens": n, "prompt_tokens": PROMPT_TOKENS, "runs": args.runs,
        "load_seconds": load_seconds, "linear_backends": backends,
        "lm_head_dtype": str(model.lm_head.dtype).removeprefix("torch."),
        "tokens_per_second": rows,
        "greedy_tokens_match_transformers": ours == theirs.tolist(),
        "engine_tokens_match": engine_tokens == ours,
        "engine_overhead_ms_per_token": (median["trellis_engine"] - single) / n * 1000,
        "prefill_256_seconds": {"trellis": prefill_seconds, "transformers": reference_prefill},
        "samples_seconds": samples,
        "decode_step_weight_bytes": step_bytes,
        "single_stream_gb_per_s": step_bytes * n / single / 1e9,
        "targets": {"single_vs_generate": rows["trellis_single"] / rows["transformers_generate"],
                    "batched_vs_single": rows[f"trellis_batched_{BATCH}"] / rows["trellis_single"]},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print_result(result)


def print_result(result: dict) -> None:
    """The human-readable lines of a result: rates, the targets' ratios, bandwidth, prefill."""
    print(f"{'decode':<26}{'tokens/s':>10}")
    for name, rate in result["tokens_per_second"].items():
        print(f"{name:<26}{rate:>10.1f}")
    targets = result["targets"]
    print(f"single stream vs generate: {targets['single_vs_generate']:.2f}x (target 2x); "
          f"batched vs single: {targets['batched_vs_single']:.2f}x (target 3x)")
    step_bytes, backends = result["decode_step_weight_bytes"], result["linear_backends"]
    print(f"single stream reads {result['single_stream_gb_per_s']:.1f} GB/s of weights "
          f"({step_bytes / 2**20:.0f} MiB per step, {', '.join(backends)}); greedy tokens match "
          f"transformers: {result['greedy_tokens_match_transformers']}; engine adds "
          f"{result['engine_overhead_ms_per_token']:.1f} ms per token")
    prefill = result["prefill_256_seconds"]
    print(f"prefill {PREFILL_TOKENS} tokens: trellis {prefill['trellis'] * 1000:.0f} ms, "
          f"transformers {prefill['transformers'] * 1000:.0f} ms; "
          f"model load {result['load_seconds']:.1f} s")


if __name__ == "__main__":
    main()
