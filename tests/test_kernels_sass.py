"""The GEMV's compiled sm_90 code, counted by benchmarks/kernels_sass.py without a GPU.

Compiling for sm_90 needs only Triton and the ptxas it bundles, so CI checks the properties the
kernel's design promises: one-row HYB products do one FMA per weight, look their table up in
shared memory (one load per state, no table gathers from global memory) and read their inputs two
at a time.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def kernels_sass():
    spec = importlib.util.spec_from_file_location("kernels_sass", BENCHMARKS / "kernels_sass.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def measure(spec: tuple, rows: int) -> dict:
    """kernels_sass.measure in a fresh process: compiling needs Triton's real JIT, which the
    interpreter the tests run under (conftest.py) replaces."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (f"import json, kernels_sass; "
            f"print(json.dumps(kernels_sass.measure({spec!r}, {rows})))")
    result = subprocess.run([sys.executable, "-c", code], cwd=BENCHMARKS, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.splitlines()[-1])


def test_one_row_hyb_loop_is_one_fma_per_weight_with_shared_lookups() -> None:
    row = measure((16, 2, 2, "hyb"), 1)
    weights = row["weights_per_thread"]
    states = weights / 2
    assert row["fma"] == weights
    assert row["shared_loads"] == states  # one 64-bit table row per state
    # K=2 code words: 2 own + 1 of the next group; inputs: one 64-bit load per two weights.
    assert row["global_loads"] == 3 + weights / 4
    assert row["instructions_per_weight"] < 6
    assert row["model"]["unmodelled"] == []  # every instruction of the loop is charged to a pipe


def test_main_loop_is_the_longest_backward_branch(kernels_sass) -> None:
    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   IMAD R2, R1, R1, R1 ;
        /*0020*/                   FFMA R3, R2, R2, R3 ;
        /*0030*/               @!P0 BRA 0x10 ;
        /*0040*/                   LDS R4, [R2] ;
        /*0050*/                   BRA 0x40 ;
        /*0060*/                   EXIT ;
    """
    assert kernels_sass.main_loop(sass) == {"IMAD": 1, "FFMA": 1, "BRA": 1}
    with pytest.raises(RuntimeError, match="no loop"):
        kernels_sass.main_loop("/*0000*/ EXIT ;")


def test_pipe_model_charges_each_instruction_to_its_pipes(kernels_sass) -> None:
    loop = collections.Counter({"LDS.64": 4, "FFMA": 8, "IMAD.WIDE": 2, "HMMA.16816.F32": 1,
                                "LOP3.LUT": 6, "BRA": 1, "FROB": 1})
    model = kernels_sass.pipe_clocks(loop)
    assert model["clocks"] == {"issue": 0.25 * 23, "alu": 0.5 * 6, "fma_heavy": 0.5 * 2,
                               "fma": 0.25 * (8 + 2), "shared": 2 * 4, "global": 0.0,
                               "tensor": 2.0, "convert": 0.0}
    assert model["unmodelled"] == ["FROB"]  # BRA is issue-only, FROB unknown


def test_the_smallest_bound_binds(kernels_sass) -> None:
    loop = collections.Counter({"LDS.64": 16})  # 32 shared clocks per warp pass
    weights = 1024
    pipe = weights / 32 * kernels_sass.MULTIPROCESSORS * kernels_sass.CLOCK_HZ * 0.25 / 1e12
    roomy = kernels_sass.predict(loop, weights, 2, 1e6, 4)
    assert roomy["binding"] == "pipe:shared"
    assert roomy["predicted_tb_s"] == pytest.approx(pipe, abs=1e-3)
    starved = kernels_sass.predict(loop, weights, 2, 512, 1)
    assert starved["binding"] == "in_flight"
    assert starved["predicted_tb_s"] == pytest.approx(
        512 * kernels_sass.MULTIPROCESSORS / kernels_sass.DRAM_LATENCY_S / 1e12, abs=1e-3)
    writing = kernels_sass.predict(collections.Counter({"FFMA": 1}), weights, 2, 1e6, 4,
                                   written_bytes_per_weight=2.0)
    assert writing["binding"] == "dram"
    assert writing["predicted_tb_s"] == pytest.approx(kernels_sass.DRAM_BYTES_PER_S / 9 / 1e12,
                                                      abs=1e-3)
