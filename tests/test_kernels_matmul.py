"""The fused decode+GEMV/GEMM kernel against x @ C^T in float64 (C: the decoded code values).

The cases live in trellis_cli/kernel_suite.py, shared with `trellis bench kernels`; without a GPU
they run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
"""

from __future__ import annotations

import pytest
import torch

from trellis_cli.kernel_suite import CASES, GPU_CASES, random_weight
from trellis_kernels.matmul import gemm, gemv_launch, gemv_partials
from trellis_kernels.trellis_code import TrellisCode
from trellis_runtime.backend_triton import kernel_code
from trellis_runtime.codes import kernel_constants
from trellis_runtime.trellis import TrellisSpec

MATMUL_CASES = [c for c in CASES if c.kernel in ("gemv", "gemm")]


@pytest.mark.parametrize("case", MATMUL_CASES, ids=lambda c: f"{c.kernel} {c.name}")
def test_kernel_matches_reference(case) -> None:
    assert case.run() <= case.tolerance


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bfloat16 tl.dot needs a GPU")
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"{c.kernel} {c.name}")
def test_bfloat16_dot_matches_reference_on_gpu(case) -> None:
    assert case.run("cuda") <= case.tolerance


@pytest.mark.parametrize("rows", [1, 3])
def test_tables_read_from_global_memory_give_the_same_products(rows) -> None:
    """With shared tables off, HYB's lookups go to global memory (the path large LUTs take); the
    products must not change."""
    weight = random_weight(TrellisSpec(16, 2, 2, "hyb"), 48, 80, seed=6, scale=1.0)
    x = torch.randn(rows, 80).to(torch.float32 if rows == 1 else torch.float16)
    blocks = dict(splits=2, block_rows=32, block_tiles=2)
    shared = gemv_partials(x, weight.codes, kernel_code(weight), **blocks)
    launch, _ = gemv_launch(x, weight.codes, kernel_code(weight), shared_tables=False, **blocks)
    assert launch.constexprs["TABLE_ROWS"] == 0
    torch.testing.assert_close(gemv_partials(x, weight.codes, kernel_code(weight),
                                             shared_tables=False, **blocks),
                               shared, rtol=0, atol=0)


def test_gemv_splits_cover_the_input_and_write_every_partial() -> None:
    """5 tile columns in blocks of 2 over 3 splits: splits of 2, 2 and 1 tiles (the last ragged).
    A poisoned preallocated buffer fixes the split count and must come back fully written."""
    weight = random_weight(TrellisSpec(12, 2, 2, "hyb"), 32, 80, seed=3, scale=1.0)
    x = torch.randn(1, 80)
    out = torch.full((3, 1, 32), float("nan"))
    got = gemv_partials(x, weight.codes, kernel_code(weight), block_rows=32, block_tiles=2,
                        out=out)
    assert got is out and not torch.isnan(out).any()
    reference = x.double() @ weight.decode_rotated().double().T
    torch.testing.assert_close(out.sum(0).double(), reference, rtol=1e-5, atol=1e-5)
    # Each split alone is the product over its own columns.
    first = x[:, :32].double() @ weight.decode_rotated()[:, :32].double().T
    torch.testing.assert_close(out[0].double(), first, rtol=1e-5, atol=1e-5)


def test_gemv_defaults_to_one_split_off_the_gpu() -> None:
    weight = random_weight(TrellisSpec(16, 2, 1, "1mad"), 16, 32, seed=4, scale=1.0)
    got = gemv_partials(torch.randn(1, 32), weight.codes, kernel_code(weight))
    assert got.shape == (1, 1, 16)


def test_gemm_of_no_rows_is_empty() -> None:
    weight = random_weight(TrellisSpec(16, 2, 1, "1mad"), 16, 32, seed=5)
    assert gemm(torch.empty(0, 32, dtype=torch.float16), weight.codes,
                kernel_code(weight)).shape == (0, 16)


HYB = TrellisSpec(16, 2, 2, "hyb")


@pytest.mark.parametrize("call,match", [
    (lambda w, c: gemv_partials(torch.randn(17, 32).half(), w.codes, c), "1..16 rows"),
    (lambda w, c: gemv_partials(torch.randn(2, 32), w.codes, c), "x must be one of"),
    (lambda w, c: gemv_partials(torch.randn(1, 48), w.codes, c), "x must be"),
    (lambda w, c: gemv_partials(torch.randn(1, 32), w.codes, c, block_tiles=3), "power of two"),
    (lambda w, c: gemv_partials(torch.randn(1, 32), w.codes, c, splits=0), "splits"),
    (lambda w, c: gemv_partials(torch.randn(1, 33)[:, 1:], w.codes, c), "even element"),
    (lambda w, c: gemm(torch.randn(20, 32).half(), w.codes, c, block_m=8), "at least 16"),
    (lambda w, c: gemm(torch.randn(20, 32), w.codes, c), "x must be one of"),
    (lambda w, c: gemv_partials(torch.randn(1, 32), w.codes,
                                TrellisCode(16, 2, 2, "hyb", w.table.float(), kernel_constants())),
     "hyb table must be a contiguous float16"),
])
def test_bad_arguments_are_refused(call, match: str) -> None:
    weight = random_weight(HYB, 16, 32, seed=6)
    with pytest.raises(ValueError, match=match):
        call(weight, kernel_code(weight))
