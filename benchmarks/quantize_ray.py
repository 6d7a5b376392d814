"""`trellis quantize` alone against `trellis quantize --ray`, side by side in one run, on the same
source: wall time of each, and whether the two checkpoints are the same bytes.

    .venv/bin/python benchmarks/quantize_ray.py [SRC] [--ray-task-cpus 1] [--keep DIR]

SRC defaults to the built-in model; --keep leaves both checkpoints in DIR (alone/, ray/) to evaluate.
Writes benchmarks/results/quantize_ray.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "quantize_ray.json"


def digest(directory: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(directory.iterdir())}


def quantize(src: str, out: Path, flags: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "trellis_cli", "quantize", src, "--out", str(out),
                    *flags], check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, "TQDM_DISABLE": "1"})
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("src", nargs="?", default="smollm2-135m")
    parser.add_argument("--ray-task-cpus", default="1")
    parser.add_argument("--keep", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        place = args.keep or Path(scratch)
        alone, on_ray = place / "alone", place / "ray"
        seconds = {"alone": quantize(args.src, alone, []),
                   "ray": quantize(args.src, on_ray, ["--ray", "--ray-task-cpus",
                                                      args.ray_task_cpus])}
        identical = digest(alone) == digest(on_ray)
    result = {"date": time.strftime("%Y-%m-%d"), "source": args.src, "cpus": os.cpu_count(),
              "ray_task_cpus": int(args.ray_task_cpus), "seconds": seconds,
              "ray_over_alone": seconds["ray"] / seconds["alone"], "byte_identical": identical}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"alone {seconds['alone']:.0f} s, --ray {seconds['ray']:.0f} s "
          f"({result['ray_over_alone']:.2f}x); byte-identical: {identical}")


if __name__ == "__main__":
    main()
