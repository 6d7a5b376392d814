"""Load test of `trellis serve`: many concurrent streaming clients against one real server process.

Run 1 (capacity for everyone): --clients streaming clients each send --requests completions, in
rounds (every client sends its i-th request at once, then all wait for each other). Reports failed
or truncated streams (must be 0: every stream needs a 200, its --max-tokens tokens, a finish reason
and `data: [DONE]`), the server's resident memory after each round (should stay flat), time to
first token p50/p99 and aggregate generated tokens per second.

Run 2 (admission control): the same clients against a server with a small --max-waiting, for
--overload-rounds rounds, counting the 429s (each must carry Retry-After and OpenAI's error shape)
and checking that every admitted stream still completes.

Both servers are stopped with SIGTERM and must drain and exit 0. Greedy decoding with ignore_eos,
so every stream has exactly --max-tokens tokens. Writes benchmarks/results/serve_load.json.

    flock -x /tmp/trellis-cpu.lock .venv/bin/python benchmarks/serve_load.py [MODEL]

MODEL defaults to the built-in SmolLM2-135M, whose 2-bit checkpoint `trellis serve` keeps in the
cache (quantized there on first use).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import httpx

from trellis_cli.serve_process import ServeProcess

RESULTS = Path(__file__).parent / "results" / "serve_load.json"
SERVER_START_S = 1800  # a first start may quantize the model
PROMPTS = ["The history of the river valley begins with", "Once upon a time, in a small town,",
           "The most important property of a good bridge is", "Here is a short list of colours:"]


@dataclass
class Stream:
    status: int
    complete: bool = False  # 200, max_tokens tokens, a finish reason, [DONE], no in-band error
    ttft: Optional[float] = None
    tokens: int = 0
    retry_after: Optional[str] = None


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def stream(client: httpx.AsyncClient, prompt: str, max_tokens: int) -> Stream:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    async with client.stream("POST", "/v1/completions", json=body) as response:
        result = Stream(response.status_code, retry_after=response.headers.get("retry-after"))
        if response.status_code != 200:
            error = json.loads(await response.aread())["error"]
            assert {"message", "type", "param", "code"} <= set(error), error
            return result
        finished = done = failed = False
        async for line in response.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                chunk = json.loads(line[6:])
                failed |= "error" in chunk
                if chunk.get("choices"):
                    if chunk["choices"][0]["text"] and result.ttft is None:
                        result.ttft = time.perf_counter() - started
                    finished |= chunk["choices"][0]["finish_reason"] is not None
                if chunk.get("usage"):
                    result.tokens = chunk["usage"]["completion_tokens"]
        result.complete = done and finished and not failed and result.tokens == max_tokens
    return result


async def rounds(url: str, clients: int, count: int, max_tokens: int, pid: int
                 ) -> tuple[list[Stream], list[float], list[float]]:
    """Every stream, the server's RSS after each round, and each round's wall time."""
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        await stream(client, PROMPTS[0], 4)  # warm-up
        streams, rss, seconds = [], [], []
        for _ in range(count):
            started = time.perf_counter()
            streams += await asyncio.gather(*(stream(client, PROMPTS[c % len(PROMPTS)], max_tokens)
                                              for c in range(clients)))
            seconds.append(time.perf_counter() - started)
            rss.append(rss_mib(pid))
    return streams, rss, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=None)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests", type=int, default=10, help="requests per client (rounds)")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--overload-max-waiting", type=int, default=8)
    parser.add_argument("--overload-rounds", type=int, default=2)
    args = parser.parse_args()
    model = [args.model] if args.model else []
    base = ["--max-batch", str(args.max_batch), "--max-seq-len", str(args.max_seq_len)]

    server = ServeProcess([*model, *base, "--max-waiting", str(args.clients)], SERVER_START_S)
    started = time.perf_counter()
    streams, rss, seconds = asyncio.run(rounds(server.url, args.clients, args.requests,
                                               args.max_tokens, server.process.pid))
    wall = time.perf_counter() - started
    exit_status = server.stop()
    ttfts = [s.ttft for s in streams if s.ttft is not None]
    tokens = sum(s.tokens for s in streams)

    overloaded = ServeProcess([*model, *base, "--max-waiting", str(args.overload_max_waiting)],
                              SERVER_START_S)
    burst, _, _ = asyncio.run(rounds(overloaded.url, args.clients, args.overload_rounds,
                                     args.max_tokens, overloaded.process.pid))
    overload_exit = overloaded.stop()
    refused = [s for s in burst if s.status == 429]
    admitted = [s for s in burst if s.status == 200]

    result = {
        "date": time.strftime("%Y-%m-%d"), "model": args.model or "smollm2-135m (built-in, 2-bit)",
        "clients": args.clients, "requests_per_client": args.requests,
        "max_tokens": args.max_tokens, "max_batch": args.max_batch,
        "max_seq_len": args.max_seq_len,
        "run": {
            "streams": len(streams),
            "failed_or_truncated": sum(not s.complete for s in streams),
            "ttft_p50_s": statistics.median(ttfts), "ttft_p99_s": percentile(ttfts, 0.99),
            "generated_tokens": tokens, "wall_s": wall,
            "aggregate_tokens_per_s": tokens / sum(seconds),
            "rss_mib_per_round": [round(r, 1) for r in rss],
            "rss_growth_first_to_last_mib": round(rss[-1] - rss[0], 1),
            "round_seconds": [round(s, 2) for s in seconds],
            "server_exit_status_after_sigterm": exit_status},
        "overload": {
            "max_waiting": args.overload_max_waiting, "rounds": args.overload_rounds,
            "requests": len(burst), "status_429": len(refused),
            "status_429_with_retry_after": sum(s.retry_after is not None for s in refused),
            "admitted": len(admitted),
            "admitted_failed_or_truncated": sum(not s.complete for s in admitted),
            "other_statuses": sorted({s.status for s in burst} - {200, 429}),
            "server_exit_status_after_sigterm": overload_exit},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    run, over = result["run"], result["overload"]
    print(f"{run['streams']} streams, {run['failed_or_truncated']} failed or truncated; "
          f"TTFT p50 {run['ttft_p50_s'] * 1000:.0f} ms, p99 {run['ttft_p99_s'] * 1000:.0f} ms; "
          f"{run['aggregate_tokens_per_s']:.1f} tokens/s aggregate")
    print(f"server RSS per round (MiB): {run['rss_mib_per_round']} "
          f"(growth {run['rss_growth_first_to_last_mib']} MiB)")
    print(f"--max-waiting {over['max_waiting']}: {over['status_429']} of {over['requests']} got "
          f"429 ({over['status_429_with_retry_after']} with Retry-After); "
          f"{over['admitted_failed_or_truncated']} of {over['admitted']} admitted streams "
          f"failed; exit statuses {run['server_exit_status_after_sigterm']}, "
          f"{over['server_exit_status_after_sigterm']}")


if __name__ == "__main__":
    main()
