"""What a finished QAT run writes: its summary, and the trained checkpoint with its record.

The checkpoint is the PTQ checkpoint with the trained layers' codes replaced by the best hardened
snapshot's, in the same packed format `trellis serve` loads; its `trellis` block gains a `qat` entry
naming the run, and the directory carries the record (JSON lines and a plot) and the summary.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import load_file

from qat.record import plot
from qat.snapshot import RunState
from qat.train_options import QatOptions
from trellis_runtime.checkpoint import CONFIG_FILE, WEIGHTS_FILE, Checkpoint, save_checkpoint
from trellis_runtime.quantized import QuantizedWeight, quantized_from_tensors


def trained_weights(checkpoint: Checkpoint, best: Path) -> dict[str, QuantizedWeight]:
    """The checkpoint's quantized weights, with those the file `best` holds codes for replaced."""
    tensors = load_file(str(best))
    quantized = dict(checkpoint.quantized)
    for name in quantized:
        if f"{name}.codes" in tensors:
            quantized[name] = quantized_from_tensors(tensors, name, checkpoint.spec)
    return quantized


def summarize(run: RunState, options: QatOptions, lines: list[dict], seconds: float) -> dict:
    """The run's summary, with the drift budget's prediction set against the last snapshot."""
    last = [line for line in lines if line.get("event") == "snapshot"][-1]
    observed = {name: stats["escape_frac"] for name, stats in last["matrices"].items()}
    budget = options.steps * run.lr
    predicted = {name: budget > radius for name, radius in run.radii.items()}
    return {
        "layers": run.layers, "steps": options.steps, "lr": run.lr,
        "temperature": [options.t_start, options.t_end], "loss": options.loss,
        "validation_ppl": {"ptq": run.ptq_ppl, "best_hardened": run.best_ppl},
        "best_step": run.best_step, "seconds": round(seconds, 1),
        # Held: every matrix predicted to escape did change codes by the last snapshot, and
        # every matrix predicted to stay kept its PTQ codes.
        "drift_budget": {"budget": budget, "radii": run.radii, "predicted_escape": predicted,
                         "observed_escape_frac": observed,
                         "escape_condition_held": all(predicted[n] == (observed[n] > 0)
                                                      for n in predicted)},
    }


def write_checkpoint(final: Path, checkpoint: Checkpoint, source_dir: Path,
                     quantized: dict[str, QuantizedWeight], summary: dict, lines: list[dict]) -> None:
    """Write the trained checkpoint into the empty directory `final`, beside its record and summary;
    `source_dir` is the PTQ checkpoint, whose other files (the tokenizer's) are copied."""
    trellis = dict(checkpoint.trellis)
    trellis.pop("format_version", None)
    trellis["qat"] = {"method": "bcjr", "from": source_dir.name, **{
        k: summary[k] for k in ("layers", "steps", "lr", "temperature", "loss", "best_step",
                                "validation_ppl")}}
    save_checkpoint(final, checkpoint.config, trellis, quantized, checkpoint.dense)
    for item in source_dir.iterdir():
        if item.is_file() and item.name not in (CONFIG_FILE, WEIGHTS_FILE):
            shutil.copy2(item, final / item.name)
    (final / "qat_record.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    plot(lines, final / "qat_record.png")
    (final / "qat_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
