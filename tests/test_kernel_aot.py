"""Every Triton launch of the correctness suite compiles for sm_90 (trellis_cli/kernel_aot.py).

The tests themselves run the kernels in Triton's interpreter (conftest.py), which never invokes
Triton's compiler; these tests run the compiler in a separate process, as a GPU launch would.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from trellis_cli.kernel_aot import describe_launch
from trellis_cli.kernel_suite import random_weight
from trellis_kernels.matmul import gemv_launch
from trellis_runtime.backend_triton import kernel_code
from trellis_runtime.trellis import TrellisSpec

ROOT = Path(__file__).resolve().parent.parent
KERNELS = ("_matmul_kernel", "_hadamard_kernel", "_start_kernel",
           "_step_kernel", "_trace_kernel", "_alpha_kernel", "_beta_forward_kernel",
           "_beta_backward_kernel", "_decode_attention_kernel")


def run_aot(*args: str, interpret: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, "-m", "trellis_cli.kernel_aot", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)


def test_every_suite_launch_compiles_for_sm90() -> None:
    result = run_aot()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    compiled, total = map(int, re.search(r"(\d+) of (\d+) launches compiled", result.stdout)
                          .groups())
    assert compiled == total >= 50
    for kernel in KERNELS:
        assert f"ok   {kernel} [" in result.stdout, kernel
    for mode in (0, 1, 2):  # the shared kernel's FMA, DOT and DECODE modes
        assert f"MODE={mode}," in result.stdout, mode


def test_a_launch_that_cannot_compile_is_named_and_fails(tmp_path) -> None:
    weight = random_weight(TrellisSpec(16, 2, 2, "hyb"), 32, 64, seed=0, scale=1.0)
    launch, _ = gemv_launch(torch.zeros(1, 64), weight.codes, kernel_code(weight))
    good = describe_launch(launch.kernel, launch.arguments(), launch.options)
    bad = json.loads(json.dumps(good))
    bad["arguments"]["BLOCK_G"] = {"constexpr": 3}  # tl.arange needs a power of two
    path = tmp_path / "launches.json"
    path.write_text(json.dumps([good, bad]))
    result = run_aot("--compile", str(path))
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert lines[0].startswith("ok   _matmul_kernel [")
    assert lines[1].startswith("FAIL _matmul_kernel [") and "BLOCK_G=3" in lines[1]
    assert lines[2] == "1 of 2 launches compiled for sm_90"


def test_each_step_refuses_the_wrong_mode(tmp_path) -> None:
    result = run_aot("--record", str(tmp_path / "x.json"))
    assert result.returncode == 2 and "TRITON_INTERPRET=1" in result.stderr
    assert not (tmp_path / "x.json").exists()
    result = run_aot("--compile", str(tmp_path / "x.json"), interpret=True)
    assert result.returncode == 2 and "unset TRITON_INTERPRET" in result.stderr
