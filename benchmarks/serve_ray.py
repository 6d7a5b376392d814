"""Serving through Ray Serve against plain `trellis serve`, side by side in one run.

Five servers of the same checkpoint, one after another, each a real process on a free port:
  plain-2      `trellis serve` on 2 threads
  ray-1x2      `--ray --replicas 1 --replica-cpus 2`: the same threads behind Ray's proxy and ingress
  plain-1      `trellis serve` on 1 thread (OMP_NUM_THREADS=1)
  ray-1x1      `--ray --replicas 1 --replica-cpus 1`: one replica on one thread
  ray-2x1      `--ray --replicas 2 --replica-cpus 1`: two replicas on one thread each
For each: one stream of --new-tokens tokens (tokens/s, and time to its first token), and 16
concurrent streams (aggregate tokens/s); medians over --runs rounds after a warm-up. Reported: the
Ray path's single-stream overhead against plain `trellis serve` on the same threads (ray-1x2 against
plain-2, ray-1x1 against plain-1; goal at most 10%) and the scaling of ray-2x1 over ray-1x1 under
16 streams. Writes benchmarks/results/serve_ray.json.

    .venv/bin/python benchmarks/serve_ray.py CHECKPOINT [--new-tokens 64] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

import httpx
from serve_streams import PROMPT, stream

from trellis_cli.serve_process import ServeProcess

RESULTS = Path(__file__).parent / "results" / "serve_ray.json"
CONCURRENT = 16
# name: (flags, environment); plain `trellis serve` takes torch's threads from OMP_NUM_THREADS.
SERVERS = {
    "plain-2": ([], {"OMP_NUM_THREADS": "2"}),
    "ray-1x2": (["--ray", "--replicas", "1", "--replica-cpus", "2"], {}),
    "plain-1": ([], {"OMP_NUM_THREADS": "1"}),
    "ray-1x1": (["--ray", "--replicas", "1", "--replica-cpus", "1"], {}),
    "ray-2x1": (["--ray", "--replicas", "2", "--replica-cpus", "1"], {}),
}
# Ray path against plain serving on the same threads.
PAIRS = {"2 threads": ("ray-1x2", "plain-2"), "1 thread": ("ray-1x1", "plain-1")}


async def measure(base: str, new_tokens: int, runs: int) -> dict:
    async with httpx.AsyncClient(base_url=base, timeout=600,
                                 limits=httpx.Limits(max_connections=CONCURRENT)) as client:
        await asyncio.gather(*[stream(client, PROMPT, 8) for _ in range(CONCURRENT)])  # warm-up
        single, ttft, concurrent = [], [], []
        for _ in range(runs):
            started = time.perf_counter()
            tokens, first = await stream(client, PROMPT, new_tokens)
            single.append(tokens / (time.perf_counter() - started))
            ttft.append(first)
            started = time.perf_counter()
            results = await asyncio.gather(*[stream(client, PROMPT, new_tokens)
                                             for _ in range(CONCURRENT)])
            concurrent.append(sum(t for t, _ in results) / (time.perf_counter() - started))
    median = statistics.median
    return {"single_tokens_per_second": median(single), "ttft_seconds": median(ttft),
            f"concurrent_{CONCURRENT}_tokens_per_second": median(concurrent),
            "samples": {"single": single, "ttft": ttft, "concurrent": concurrent}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("checkpoint")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    servers = {}
    for name, (flags, env) in SERVERS.items():
        server = ServeProcess([args.checkpoint, *flags], timeout_s=600, env=env)
        try:
            servers[name] = asyncio.run(measure(server.url, args.new_tokens, args.runs))
        finally:
            server.stop()
        print(f"{name:8s} single {servers[name]['single_tokens_per_second']:6.1f} tokens/s, "
              f"TTFT {servers[name]['ttft_seconds'] * 1000:5.0f} ms, {CONCURRENT} streams "
              f"{servers[name][f'concurrent_{CONCURRENT}_tokens_per_second']:6.1f} tokens/s")
    key = f"concurrent_{CONCURRENT}_tokens_per_second"
    result = {
        "date": time.strftime("%Y-%m-%d"), "checkpoint": Path(args.checkpoint).name,
        "new_tokens": args.new_tokens, "runs": args.runs, "servers": servers,
        "ray_overhead": {
            threads: {"single_stream": 1 - servers[ray]["single_tokens_per_second"]
                      / servers[plain]["single_tokens_per_second"],
                      "ttft": servers[ray]["ttft_seconds"] / servers[plain]["ttft_seconds"] - 1}
            for threads, (ray, plain) in PAIRS.items()},
        "two_replicas_over_one": servers["ray-2x1"][key] / servers["ray-1x1"][key],
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    for threads, overhead in result["ray_overhead"].items():
        print(f"Ray overhead on {threads}: single stream {overhead['single_stream']:+.1%}, "
              f"TTFT {overhead['ttft']:+.1%}")
    print(f"2 replicas over 1 under {CONCURRENT} streams: {result['two_replicas_over_one']:.2f}x")


if __name__ == "__main__":
    main()
