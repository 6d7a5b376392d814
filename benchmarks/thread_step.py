"""One decode step on the main thread against the same step on another thread.

The engine runs the model on its own thread (trellis_runtime/engine.py), so whatever a non-main
thread costs a forward, every served token pays. This loads a checkpoint, then alternates rounds of
single-sequence decode steps (one new token each, growing context) on the main thread, on a fresh
`threading.Thread`, and on a fresh thread after the main thread gave back its OpenMP workers
(trellis_runtime/openmp.py, what Engine.start does), and reports the median step time of each round.
Writes benchmarks/results/thread_step.json.

    .venv/bin/python benchmarks/thread_step.py CHECKPOINT [--rounds 4] [--steps 48]
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path
from typing import Callable

import torch

from trellis_runtime.model import load_model, median_decode_step_seconds
from trellis_runtime.openmp import release_workers

RESULTS = Path(__file__).parent / "results" / "thread_step.json"


def on_other_thread(work: Callable[[], float]) -> float:
    """work() run on a new thread, waited for."""
    result: list[float] = []
    worker = threading.Thread(target=lambda: result.append(work()))
    worker.start()
    worker.join()
    return result[0]


def released_then_other_thread(work: Callable[[], float]) -> float:
    release_workers()
    return on_other_thread(work)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("checkpoint")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=48)
    args = parser.parse_args()
    model, _ = load_model(args.checkpoint)
    step_ms = lambda: median_decode_step_seconds(model, args.steps) * 1e3  # noqa: E731
    step_ms()  # warm-up
    ways = {"main thread": lambda work: work(), "other thread": on_other_thread,
            "other thread, workers released": released_then_other_thread}
    rounds: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.rounds):
        for name, run in ways.items():
            rounds[name].append(run(step_ms))
    record = {"date": time.strftime("%Y-%m-%d"), "checkpoint": Path(args.checkpoint).name,
              "threads": torch.get_num_threads(), "steps": args.steps, "step_ms_by_round": rounds,
              "median_ms": {name: statistics.median(ms) for name, ms in rounds.items()}}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(record, indent=2) + "\n")
    for name, ms in rounds.items():
        print(f"{name:<31} " + "  ".join(f"{m:.1f}" for m in ms) + " ms per step")


if __name__ == "__main__":
    main()
