"""Two revisions of the project side by side on the CPU decode and serving benchmarks.

A refactor should not cost speed, and the machine's speed drifts between runs, so both revisions are
measured in one run: each round runs `runtime_decode.py` and `serve_streams.py` of the base revision,
then of the new one, each from its own clean checkout (a temporary git worktree), on the same
checkpoint. The figures are medians over rounds; the ratio is new / base (above 1 is faster, except
for the times, where below 1 is faster). Writes benchmarks/results/compare_revisions.json.

    .venv/bin/python benchmarks/compare_revisions.py BASE_REV CHECKPOINT [--new HEAD] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "compare_revisions.json"

# (benchmark script, its results file, the figures compared: dotted paths into that file)
BENCHMARKS = (
    ("runtime_decode.py", "runtime_decode.json",
     ("tokens_per_second.trellis_single", "tokens_per_second.trellis_engine",
      "tokens_per_second.trellis_batched_8", "engine_overhead_ms_per_token",
      "prefill_256_seconds.trellis")),
    ("serve_streams.py", "serve_streams.json",
     ("single_tokens_per_second", "concurrent_8_tokens_per_second", "ttft_256_prompt_seconds")),
)


def figure(result: dict, path: str) -> float:
    for key in path.split("."):
        result = result[key]
    return float(result)


def run_benchmark(tree: Path, script: str, results: str, checkpoint: str, runs: int) -> dict:
    """Run one benchmark of the checkout at `tree` and return the results file it wrote.

    Each checkout gets a cache of its own: the C++ kernels are cached by their sources, and a build
    for one revision replaces the other's, so a shared cache would recompile them on every run.
    Hugging Face's cache stays where it is (it lives under the same variable by default)."""
    user_cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    environment = {**os.environ, "PYTHONPATH": str(tree), "XDG_CACHE_HOME": str(tree / ".cache"),
                   "HF_HOME": os.environ.get("HF_HOME") or str(user_cache / "huggingface")}
    subprocess.run([sys.executable, f"benchmarks/{script}", checkpoint, "--runs", str(runs)],
                   cwd=tree, env=environment, check=True, stdout=subprocess.DEVNULL)
    return json.loads((tree / "benchmarks" / "results" / results).read_text())


def compare(trees: dict[str, Path], checkpoint: str, rounds: int, runs: int) -> dict:
    samples: dict[str, dict[str, list[float]]] = {name: {} for name in trees}
    for round_index in range(rounds):
        for script, results, paths in BENCHMARKS:
            for name, tree in trees.items():
                print(f"round {round_index + 1}/{rounds}: {script} at {name}", file=sys.stderr)
                result = run_benchmark(tree, script, results, checkpoint, runs)
                for path in paths:
                    samples[name].setdefault(path, []).append(figure(result, path))
    medians = {name: {path: statistics.median(values) for path, values in figures.items()}
               for name, figures in samples.items()}
    ratios = {path: medians["new"][path] / medians["base"][path] for path in medians["base"]}
    return {"medians": medians, "new_over_base": ratios, "samples": samples}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", help="git revision measured as the base")
    parser.add_argument("checkpoint", help="packed checkpoint both revisions serve")
    parser.add_argument("--new", default="HEAD", help="git revision measured against it")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3, help="each benchmark's own --runs")
    args = parser.parse_args()
    checkpoint = str(Path(args.checkpoint).resolve())
    revisions = {"base": args.base, "new": args.new}
    commits = {name: subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, check=True,
                                    capture_output=True, text=True).stdout.strip()
               for name, rev in revisions.items()}
    with tempfile.TemporaryDirectory(prefix="trellis-compare-") as scratch:
        trees = {name: Path(scratch) / name for name in revisions}
        for name, tree in trees.items():
            subprocess.run(["git", "worktree", "add", "--detach", "--quiet", str(tree),
                            commits[name]], cwd=ROOT, check=True)
        try:
            result = compare(trees, checkpoint, args.rounds, args.runs)
        finally:
            for tree in trees.values():
                subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT,
                               check=False)
    result.update({"date": time.strftime("%Y-%m-%d"), "commits": commits,
                   "checkpoint": Path(checkpoint).name, "rounds": args.rounds, "runs": args.runs})
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    for path, ratio in result["new_over_base"].items():
        base, new = result["medians"]["base"][path], result["medians"]["new"][path]
        print(f"{path:40s} base {base:10.4g}  new {new:10.4g}  new/base {ratio:.3f}")


if __name__ == "__main__":
    main()
