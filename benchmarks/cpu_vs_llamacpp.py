"""CPU decode against llama.cpp: the same model, each engine on its own format, side by side.

llama.cpp (through llama-cpp-python's OpenAI server) runs the built-in SmolLM2-135M GGUF as shipped
(Q4_1); the trellis runtime serves its 2-bit checkpoint (default: the built-in one `make serve` uses).
Both run as real server processes with 2 threads, one at a time, and are measured by the same
client over HTTP, greedy, --new-tokens tokens after a short prompt, end of text suppressed:
  single        one streamed completion: decode tokens/s, from the first streamed token to the last
                (prefill and connection set-up excluded for both)
  concurrent    8 streams at once: aggregate completion tokens/s over the wall time
  memory        the server process's resident memory after the runs, and its peak
Medians over --runs rounds after a warm-up. Goals: trellis single stream >= llama.cpp's, and trellis
8-stream aggregate >= 3x its own single stream.

llama-cpp-python is a comparison, not a dependency: it is built from source (pinned, about 10
minutes on 2 cores, for this CPU) into its own environment under the cache directory, outside the
project's .venv, the first time, and found there afterwards.
Writes benchmarks/results/cpu_vs_llamacpp.json.

    .venv/bin/python benchmarks/cpu_vs_llamacpp.py [CHECKPOINT] [--new-tokens 128] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import httpx

from qat.sources import builtin_gguf
from trellis_cli.serve_process import ServeProcess
from trellis_runtime.model import load_tokenizer
from trellis_runtime.paths import cache_dir

RESULTS = Path(__file__).parent / "results" / "cpu_vs_llamacpp.json"
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
PROMPT = "The history of the river valley begins with"
THREADS, STREAMS = 2, 8


def llama_cpp_python() -> Path:
    """The Python of an environment holding llama-cpp-python's server, built here if missing."""
    venv = cache_dir() / "bench" / f"llama-cpp-python-{LLAMA_CPP_PYTHON.split('==')[1]}"
    python = venv / "bin" / "python"
    check = [str(python), "-c", "import llama_cpp.server"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    print(f"building {LLAMA_CPP_PYTHON} into {venv} (once; about 10 minutes on 2 cores)")
    subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
    env = {**os.environ, "CMAKE_ARGS": "-DGGML_NATIVE=ON", "CMAKE_BUILD_PARALLEL_LEVEL": "2"}
    package = LLAMA_CPP_PYTHON.replace("==", "[server]==")
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", package], check=True, env=env)
    return python


def memory_mib(pid: int) -> dict[str, float]:
    """Resident memory now (VmRSS) and at its peak (VmHWM) of a process, in MiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {"rss_mib": int(fields["VmRSS"].split()[0]) / 1024,
            "peak_rss_mib": int(fields["VmHWM"].split()[0]) / 1024}


async def stream(client: httpx.AsyncClient, body: dict) -> tuple[int, float, float]:
    """(streamed tokens, seconds from request to first token, seconds from first to last token)."""
    started, stamps = time.perf_counter(), []
    async with client.stream("POST", "/v1/completions", json={**body, "stream": True},
                             timeout=600) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    stamps.append(time.perf_counter())
    if not stamps:
        raise RuntimeError("the server streamed no text")
    return len(stamps), stamps[0] - started, stamps[-1] - stamps[0]


async def measure(base: str, body: dict, runs: int) -> dict:
    async with httpx.AsyncClient(base_url=base) as client:
        await stream(client, {**body, "max_tokens": 8})  # warm-up
        single, concurrent, ttft = [], [], []
        for _ in range(runs):
            tokens, first, decoding = await stream(client, body)
            single.append((tokens - 1) / decoding)
            ttft.append(first)
            started = time.perf_counter()
            results = await asyncio.gather(*[stream(client, body) for _ in range(STREAMS)])
            concurrent.append(sum(r[0] for r in results) / (time.perf_counter() - started))
    median = statistics.median
    return {"single_decode_tokens_per_second": median(single),
            "concurrent_8_tokens_per_second": median(concurrent),
            "ttft_seconds": median(ttft),
            "samples": {"single": single, "concurrent_8": concurrent, "ttft": ttft}}


def run_server(server: ServeProcess, body: dict, runs: int) -> dict:
    try:
        result = asyncio.run(measure(server.url, body, runs))
        result.update(memory_mib(server.process.pid))
    finally:
        server.stop()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("checkpoint", nargs="?",
                        default=str(cache_dir() / "models" / "smollm2-135m-hyb-L12-K2"),
                        help="trellis checkpoint (default: the built-in one `make serve` quantizes)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    gguf = builtin_gguf("smollm2-135m")
    tokenizer = load_tokenizer(args.checkpoint)
    eos = sorted({tokenizer.eos_token_id, *([tokenizer.pad_token_id] if tokenizer.pad_token_id
                                            is not None else [])})
    body = {"prompt": PROMPT, "max_tokens": args.new_tokens, "temperature": 0}
    python = llama_cpp_python()

    results = {}
    results["llama.cpp"] = run_server(
        ServeProcess(["--model", str(gguf), "--n_threads", str(THREADS), "--n_ctx", "2048",
                      "--host", "127.0.0.1"], timeout_s=300, probe="/v1/models",
                     program=[str(python), "-m", "llama_cpp.server"]),
        {**body, "logit_bias": {str(t): -100 for t in eos}}, args.runs)
    results["trellis"] = run_server(
        ServeProcess([args.checkpoint], timeout_s=600, probe="/health",
                     env={"OMP_NUM_THREADS": str(THREADS)}),
        {**body, "ignore_eos": True}, args.runs)

    trellis, llama = results["trellis"], results["llama.cpp"]
    summary = {"single_over_llama_cpp": trellis["single_decode_tokens_per_second"]
               / llama["single_decode_tokens_per_second"],
               "trellis_concurrent_over_single": trellis["concurrent_8_tokens_per_second"]
               / trellis["single_decode_tokens_per_second"]}
    record = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "threads": THREADS, "checkpoint": Path(args.checkpoint).name,
              "gguf": gguf.name, "llama_cpp_python": LLAMA_CPP_PYTHON, "new_tokens": args.new_tokens,
              "runs": args.runs, "results": results, **summary}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(record, indent=2) + "\n")
    print(f"{'engine':<11}{'1 stream tok/s':>15}{'8 streams tok/s':>17}{'TTFT ms':>9}{'RSS MiB':>9}")
    for name, row in results.items():
        print(f"{name:<11}{row['single_decode_tokens_per_second']:>15.1f}"
              f"{row['concurrent_8_tokens_per_second']:>17.1f}{row['ttft_seconds'] * 1000:>9.0f}"
              f"{row['rss_mib']:>9.0f}")
    print(f"trellis single stream / llama.cpp: {summary['single_over_llama_cpp']:.2f}x; "
          f"trellis 8 streams / single: {summary['trellis_concurrent_over_single']:.2f}x")


if __name__ == "__main__":
    main()
