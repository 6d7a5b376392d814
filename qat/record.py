"""The training record of a QAT run: one JSON line per event, and a PNG plot of it.

Lines are appended and flushed as they happen, so an interrupted run keeps its history; on resume,
lines after the snapshot being resumed are dropped, so the record never holds steps twice.
"""

from __future__ import annotations

import json
from pathlib import Path

PLOTTED = (("kl", "distillation loss (KL)", False), ("hard_ppl", "hardened validation perplexity", False),
           ("temperature", "temperature T", True), ("escape_frac", "escape fraction (tiles)", False))


class Record:
    def __init__(self, path: Path) -> None:
        self.path = path

    def lines(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def append(self, entry: dict) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(entry, sort_keys=True) + "\n")
            handle.flush()

    def truncate_after(self, step: int) -> None:
        """Drop entries of steps after `step` (work done after the snapshot a run resumes from)."""
        kept = [line for line in self.lines() if line["step"] <= step]
        self.path.write_text("".join(json.dumps(line, sort_keys=True) + "\n" for line in kept))


def plot(lines: list[dict], path: Path) -> None:
    """Four panels over the steps: KL, hardened perplexity, temperature, mean escape fraction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(10, 7), constrained_layout=True)
    for axis, (key, title, log_scale) in zip(axes.flat, PLOTTED):
        points = [(line["step"], line[key]) for line in lines if line.get(key) is not None]
        if points:
            steps, values = zip(*points)
            axis.plot(steps, values, marker="o", markersize=3)
        axis.set_title(title)
        axis.set_xlabel("step")
        if log_scale:
            axis.set_yscale("log")
        axis.grid(alpha=0.3)
    figure.savefig(path, dpi=100)
    plt.close(figure)
