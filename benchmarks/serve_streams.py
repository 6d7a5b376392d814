"""Serving throughput over HTTP: one stream against 8 concurrent streams, and time to first token.

Starts `trellis serve CHECKPOINT` as a real process on a free local port, then with httpx:
  single       one streaming completion of --new-tokens tokens (greedy, ignore_eos)
  concurrent   8 such streams at once: aggregate completion tokens per second
  ttft         time to the first streamed token for a 256-token prompt (max_tokens 1 would hide
               the stream; we take the first content chunk of a streamed request)
Medians over --runs rounds after a warm-up. Target: 8 streams >= 3x one stream in aggregate.
Writes benchmarks/results/serve_streams.json.

    .venv/bin/python benchmarks/serve_streams.py CHECKPOINT [--new-tokens 64] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

import httpx

from trellis_cli.serve_process import ServeProcess

RESULTS = Path(__file__).parent / "results" / "serve_streams.json"
PROMPT = "The history of the river valley begins with"


async def stream(client: httpx.AsyncClient, prompt: str, max_tokens: int) -> tuple[int, float]:
    """(completion tokens, seconds to the first content chunk) of one streamed completion."""
    started, first, tokens = time.perf_counter(), None, 0
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    async with client.stream("POST", "/v1/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["text"] and first is None:
                first = time.perf_counter() - started
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return tokens, first if first is not None else float("nan")


async def measure(base: str, new_tokens: int, runs: int) -> dict:
    long_prompt = " ".join(["word"] * 256)
    async with httpx.AsyncClient(base_url=base) as client:
        await stream(client, PROMPT, 8)  # warm-up
        single, concurrent, ttft = [], [], []
        for _ in range(runs):
            started = time.perf_counter()
            tokens, _ = await stream(client, PROMPT, new_tokens)
            single.append(tokens / (time.perf_counter() - started))
            started = time.perf_counter()
            results = await asyncio.gather(*[stream(client, PROMPT, new_tokens) for _ in range(8)])
            concurrent.append(sum(t for t, _ in results) / (time.perf_counter() - started))
            ttft.append((await stream(client, long_prompt, 2))[1])
    median = statistics.median
    return {"single_tokens_per_second": median(single),
            "concurrent_8_tokens_per_second": median(concurrent),
            "concurrent_over_single": median(concurrent) / median(single),
            "ttft_256_prompt_seconds": median(ttft),
            "samples": {"single": single, "concurrent_8": concurrent, "ttft": ttft}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("checkpoint")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    server = ServeProcess([args.checkpoint], timeout_s=600, probe="/health")
    try:
        result = asyncio.run(measure(server.url, args.new_tokens, args.runs))
    finally:
        server.stop()
    result.update({"date": time.strftime("%Y-%m-%d"), "checkpoint": Path(args.checkpoint).name,
                   "new_tokens": args.new_tokens, "runs": args.runs})
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"single stream      {result['single_tokens_per_second']:8.1f} tokens/s")
    print(f"8 concurrent       {result['concurrent_8_tokens_per_second']:8.1f} tokens/s "
          f"({result['concurrent_over_single']:.2f}x)")
    print(f"TTFT, 256 tokens   {result['ttft_256_prompt_seconds'] * 1000:8.0f} ms")


if __name__ == "__main__":
    main()
