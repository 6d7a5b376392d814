"""The training checks that need a GPU, in one run sized for a short loan of one (under 8 minutes).

In order, each with its own time limit, each step's outcome recorded whether it passed or not:
1. the BCJR kernel tests (tests/test_kernels_bcjr.py) on CUDA;
2. benchmarks/bcjr_speed.py --device cuda (Triton against eager torch on a SmolLM2 layer, L=16);
3. the built-in SmolLM2-135M quantized on CUDA at its CUDA defaults (L=16, hyb, K=2);
4. one layer of it trained by BCJR-QAT on CUDA (`trellis qat --stages bcjr --layers 0`), then
   fine-tuned (`--stages finetune`, a short run); PTQ and the result scored on the evaluation text.
The limits add up to about 8.5 minutes; a step that fails stops the steps that need its output.
Results go to benchmarks/results/training_gpu.json (date, commit, GPU, each step's seconds and
outcome, the perplexities). Run from a checkout with the machine's own torch:

    PYTHONPATH=. python benchmarks/training_gpu.py [--work DIR] [--finetune-steps 256]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "training_gpu.json"
TRELLIS = [sys.executable, "-m", "trellis_cli"]


def run(results: dict, name: str, command: list[str], limit_s: int) -> bool:
    """Run one step, record its seconds, exit status and last output lines; whether it passed."""
    started = time.time()
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=limit_s)
        status, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as expired:
        status, output = "timeout", str(expired.stdout or "") + str(expired.stderr or "")
    results["steps"][name] = {"seconds": round(time.time() - started, 1), "status": status,
                              "tail": output.strip().splitlines()[-5:]}
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"{name}: {status} in {results['steps'][name]['seconds']} s", flush=True)
    return status == 0


def perplexity(results: dict, name: str, checkpoint: Path) -> None:
    if run(results, f"ppl_{name}", [*TRELLIS, "eval", "ppl", str(checkpoint), "--device", "cuda",
                                    "--max-tokens", "16384", "--json"], 40):
        line = results["steps"][f"ppl_{name}"]["tail"][-1]
        results.setdefault("ppl", {})[name] = json.loads(line)["ppl"]
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--finetune-steps", type=int, default=256)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    work = args.work or Path(tempfile.mkdtemp(prefix="training-gpu-"))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    results = {"date": time.strftime("%Y-%m-%d %H:%M"), "commit": commit,
               "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "steps": {}}
    run(results, "bcjr_kernel_tests", [sys.executable, "-m", "pytest", "-q", "-x",
                                       "tests/test_kernels_bcjr.py"], 100)
    run(results, "bcjr_speed_cuda", [sys.executable, "benchmarks/bcjr_speed.py", "--device", "cuda"],
        60)
    ptq, bcjr, tuned = work / "ptq-L16", work / "bcjr-layer0", work / "finetune"
    if not run(results, "quantize_cuda", [*TRELLIS, "quantize", "smollm2-135m", "--out", str(ptq),
                                          "--device", "cuda"], 150):
        return
    perplexity(results, "ptq", ptq)
    if run(results, "bcjr_layer0_cuda", [*TRELLIS, "qat", str(ptq), "--out", str(bcjr), "--stages",
                                         "bcjr", "--layers", "0", "--device", "cuda"], 60):
        if run(results, "finetune_cuda", [*TRELLIS, "qat", str(bcjr), "--out", str(tuned),
                                          "--stages", "finetune", "--finetune-steps",
                                          str(args.finetune_steps), "--device", "cuda"], 60):
            perplexity(results, "finetune", tuned)


if __name__ == "__main__":
    main()
