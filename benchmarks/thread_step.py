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

import torch

from trellis_runtime.model import load_model
from trellis_runtime.openmp import release_workers

RESULTS = Path(__file__).parent / "results" / "thread_step.json"


def median_step_ms(model, steps: int) -> float:
    """Median milliseconds of `steps` decode steps of one new sequence."""
    cache = model.new_cache(1, steps)
    slot, times = cache.allocate(), []
    with torch.inference_mode():
        for position in range(steps):
            token, at, slots = (torch.tensor([v]) for v in (5, position, slot))
            started = time.perf_counter()
            model(token, at, slots, cache)
            times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("checkpoint")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=48)
    args = parser.parse_args()
    model, _ = load_model(args.checkpoint)
    median_step_ms(model, 8)  # warm-up
    rounds: dict[str, list[float]] = {"main thread": [], "other thread": [],
                                       "other thread, workers released": []}
    for _ in range(args.rounds):
        for name, ms in rounds.items():
            if name == "main thread":
                ms.append(median_step_ms(model, args.steps))
                continue
            if name == "other thread, workers released":
                release_workers()
            worker = threading.Thread(target=lambda ms=ms: ms.append(median_step_ms(model, args.steps)))
            worker.start()
            worker.join()
    record = {"date": time.strftime("%Y-%m-%d"), "checkpoint": Path(args.checkpoint).name,
              "threads": torch.get_num_threads(), "steps": args.steps, "step_ms_by_round": rounds,
              "median_ms": {name: statistics.median(ms) for name, ms in rounds.items()}}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(record, indent=2) + "\n")
    for name, ms in rounds.items():
        print(f"{name:<31} " + "  ".join(f"{m:.1f}" for m in ms) + " ms per step")


if __name__ == "__main__":
    main()
