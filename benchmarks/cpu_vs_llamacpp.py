"""CPU decode against llama.cpp: the same model, each engine on its own format, side by side.

llama.cpp (through llama-cpp-python's OpenAI server) runs the built-in SmolLM2-135M GGUF as shipped
(Q4_1); the trellis runtime serves 2-bit checkpoints (default: the built-in one `make serve` uses).
Both run as real server processes with 2 threads, one at a time, and are measured by the same
client over HTTP, greedy, --new-tokens tokens after a short prompt, end of text suppressed:
  single        one streamed completion: decode tokens/s, from the first streamed token to the last
                (prefill and connection set-up excluded for both)
  concurrent    8 streams at once: aggregate completion tokens/s over the wall time
  memory        the server process's resident memory after the runs, and its peak
and, without HTTP, each engine through its Python API (llama-cpp-python's `Llama` in its own process,
the trellis `Engine` in this one, each loaded afresh per round): one stream's decode tokens/s,
measured the same way, in rounds of every engine in turn. Medians over --runs rounds after a
warm-up. Goals: trellis single stream >= llama.cpp's, and trellis 8-stream aggregate >= 3x its own
single stream. With several checkpoints (and --heads), each is served in turn.

llama-cpp-python is a comparison, not a dependency: it is built from source (pinned, about 10
minutes on 2 cores, for this CPU) into its own environment under the cache directory, outside the
project's .venv, the first time, and found there afterwards.
Writes benchmarks/results/cpu_vs_llamacpp.json.

    .venv/bin/python benchmarks/cpu_vs_llamacpp.py [CHECKPOINT ...] [--heads bf16 int8] [--new-tokens 128]
        [--runs 3]
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
import torch

from qat.sources import builtin_gguf
from trellis_cli.serve_commands import checkpoint_for
from trellis_cli.serve_process import ServeProcess
from trellis_runtime.devices import DEFAULT_HEAD, HEADS
from trellis_runtime.model import load_tokenizer
from trellis_runtime.paths import cache_dir

RESULTS = Path(__file__).parent / "results" / "cpu_vs_llamacpp.json"
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
PROMPT = "The history of the river valley begins with"
THREADS, STREAMS = 2, 8
# One stream through llama-cpp-python's own API, run by its environment's Python: argv = GGUF, prompt,
# new tokens, end-of-text ids; prints the decode tokens/s of one run after a warm-up.
LLAMA_IN_PROCESS = """
import sys, time
from llama_cpp import Llama
gguf, prompt, new_tokens, eos = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
llm = Llama(model_path=gguf, n_threads=%d, n_ctx=2048, verbose=False)
bias = {int(t): -100.0 for t in eos.split(",")}
def decode_rate(n):
    chunks = llm.create_completion(prompt, max_tokens=n, temperature=0, logit_bias=bias, stream=True)
    stamps = [time.perf_counter() for chunk in chunks if chunk["choices"][0]["text"]]
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])
decode_rate(8)
print(decode_rate(new_tokens))
""" % THREADS


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


def decode_rate(stamps: list[float]) -> float:
    """Tokens per second between the first streamed token and the last (prefill excluded)."""
    if len(stamps) < 2:
        raise RuntimeError("fewer than two tokens streamed")
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


async def stream(client: httpx.AsyncClient, body: dict) -> tuple[float, list[float]]:
    """(when the request was sent, when each token with text arrived), of one streamed completion."""
    started, stamps = time.perf_counter(), []
    async with client.stream("POST", "/v1/completions", json={**body, "stream": True},
                             timeout=600) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    stamps.append(time.perf_counter())
    return started, stamps


async def measure(base: str, body: dict, runs: int) -> dict:
    async with httpx.AsyncClient(base_url=base) as client:
        await stream(client, {**body, "max_tokens": 8})  # warm-up
        single, concurrent, ttft = [], [], []
        for _ in range(runs):
            started, stamps = await stream(client, body)
            single.append(decode_rate(stamps))
            ttft.append(stamps[0] - started)
            started = time.perf_counter()
            results = await asyncio.gather(*[stream(client, body) for _ in range(STREAMS)])
            concurrent.append(sum(len(r[1]) for r in results) / (time.perf_counter() - started))
    median = statistics.median
    return {"single_decode_tokens_per_second": median(single),
            "concurrent_8_tokens_per_second": median(concurrent),
            "ttft_seconds": median(ttft),
            "samples": {"single": single, "concurrent_8": concurrent, "ttft": ttft}}


def llama_in_process(python: Path, gguf: Path, eos: list[int], new_tokens: int) -> float:
    """Decode tokens/s of one stream through llama-cpp-python's API, in its own process."""
    out = subprocess.run([str(python), "-c", LLAMA_IN_PROCESS, str(gguf), PROMPT, str(new_tokens),
                          ",".join(map(str, eos))],
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


async def engine_decode_rate(engine, prompt_ids: list[int], new_tokens: int) -> float:
    from trellis_runtime.sampling import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    return decode_rate([time.perf_counter() async for out in engine.generate(prompt_ids, params)
                        if out.text])


def trellis_in_process(checkpoint: str, head: str, new_tokens: int) -> float:
    """Decode tokens/s of one stream through the trellis Engine in this process, after a warm-up."""
    from trellis_runtime.engine import Engine
    from trellis_runtime.model import load_model

    torch.set_num_threads(THREADS)
    model, tokenizer = load_model(checkpoint, head=head)
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    with Engine(model, tokenizer) as engine:
        asyncio.run(engine_decode_rate(engine, prompt_ids, 8))
        return asyncio.run(engine_decode_rate(engine, prompt_ids, new_tokens))


def run_server(server: ServeProcess, body: dict, runs: int) -> dict:
    try:
        result = asyncio.run(measure(server.url, body, runs))
        result.update(memory_mib(server.process.pid))
    finally:
        server.stop()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("checkpoints", nargs="*",
                        help="trellis checkpoints, each served in turn (default: the built-in one, "
                             "quantized on first use as `make serve` does)")
    parser.add_argument("--heads", nargs="+", choices=HEADS, default=[DEFAULT_HEAD],
                        help="output heads to serve each checkpoint with, in turn")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    args.checkpoints = args.checkpoints or [str(checkpoint_for(None, "cpu"))]
    gguf = builtin_gguf("smollm2-135m")
    tokenizer = load_tokenizer(args.checkpoints[0])
    eos = sorted({tokenizer.eos_token_id, *([tokenizer.pad_token_id] if tokenizer.pad_token_id
                                            is not None else [])})
    body = {"prompt": PROMPT, "max_tokens": args.new_tokens, "temperature": 0}
    python = llama_cpp_python()

    trellis = {f"trellis {Path(checkpoint).name}" + ("" if head == DEFAULT_HEAD else f" {head} head"):
               (checkpoint, head) for checkpoint in args.checkpoints for head in args.heads}
    # Rounds of every engine in turn, so that the machine's drift between minutes (up to 2x here)
    # falls on all of them alike; medians over the rounds.
    rounds: dict[str, list[float]] = {"llama.cpp": [], **{name: [] for name in trellis}}
    for _ in range(args.runs):
        rounds["llama.cpp"].append(llama_in_process(python, gguf, eos, args.new_tokens))
        for name, (checkpoint, head) in trellis.items():
            rounds[name].append(trellis_in_process(checkpoint, head, args.new_tokens))
    in_process = {name: statistics.median(rates) for name, rates in rounds.items()}
    results = {}
    results["llama.cpp"] = run_server(
        ServeProcess(["--model", str(gguf), "--n_threads", str(THREADS), "--n_ctx", "2048",
                      "--host", "127.0.0.1"], timeout_s=300, probe="/v1/models",
                     program=[str(python), "-m", "llama_cpp.server"]),
        {**body, "logit_bias": {str(t): -100 for t in eos}}, args.runs)
    for name, (checkpoint, head) in trellis.items():
        results[name] = run_server(
            ServeProcess([checkpoint, "--head", head], timeout_s=600, probe="/health",
                         env={"OMP_NUM_THREADS": str(THREADS)}),
            {**body, "ignore_eos": True}, args.runs)

    llama = results["llama.cpp"]["single_decode_tokens_per_second"]
    summary = {name: {"single_over_llama_cpp": row["single_decode_tokens_per_second"] / llama,
                      "concurrent_over_single": row["concurrent_8_tokens_per_second"]
                      / row["single_decode_tokens_per_second"]}
               for name, row in results.items() if name != "llama.cpp"}
    record = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "threads": THREADS, "gguf": gguf.name,
              "llama_cpp_python": LLAMA_CPP_PYTHON, "new_tokens": args.new_tokens, "runs": args.runs,
              "results": results, "ratios": summary,
              "in_process_single_decode_tokens_per_second": in_process,
              "in_process_rounds": rounds}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(record, indent=2) + "\n")
    print(f"{'engine':<46}{'1 stream tok/s':>15}{'8 streams tok/s':>17}{'TTFT ms':>9}{'RSS MiB':>9}")
    for name, row in results.items():
        print(f"{name:<46}{row['single_decode_tokens_per_second']:>15.1f}"
              f"{row['concurrent_8_tokens_per_second']:>17.1f}{row['ttft_seconds'] * 1000:>9.0f}"
              f"{row['rss_mib']:>9.0f}")
    print("without HTTP, one stream: " + ", ".join(f"{n} {v:.1f} tok/s" for n, v in in_process.items()))
    for name, ratios in summary.items():
        print(f"{name}: one stream {ratios['single_over_llama_cpp']:.2f}x llama.cpp's; "
              f"8 streams {ratios['concurrent_over_single']:.2f}x its one stream")


if __name__ == "__main__":
    main()
