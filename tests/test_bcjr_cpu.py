"""The C++ BCJR (trellis_kernels/bcjr_cpu.cpp) against the torch reference and enumeration.

The reference (trellis_kernels/bcjr.py, plain torch) is itself checked against enumeration and the
exact cyclic measure in tests/test_soft_trellis.py, where the enumeration and finite-difference
tests also run on the C++ backend; here the C++ kernels match the reference in float64 to rounding
and in float32 within float32 accuracy, on small and full-size trellises, free and tail-biting,
with emitted ranges, through autograd, and refuse bad input.
"""

from __future__ import annotations

import pytest
import torch

from test_soft_trellis import hyb_values, lut_values, observations, relative_error

from qat.soft_trellis import cpp_unavailable_reason, posterior_mean, soft_reconstruct
from trellis_kernels import bcjr, bcjr_cpu

F64 = torch.float64
pytestmark = pytest.mark.skipif(cpp_unavailable_reason() is not None,
                                reason=f"C++ BCJR unavailable: {cpp_unavailable_reason()}")

# (L, KV, V, chains, steps, start, stop, temperature): every KV of a 12-bit trellis, groups larger
# and smaller than a tile of the alpha step, odd chain counts (partly filled SIMD blocks).
CASES = [
    (6, 1, 1, 3, 9, 0, 9, 1.0),
    (6, 2, 2, 9, 20, 3, 15, 0.3),
    (8, 3, 1, 5, 30, 0, 30, 0.2),
    (7, 6, 2, 3, 9, 2, 5, 0.5),
    (12, 1, 1, 2, 24, 4, 20, 0.1),
    (12, 2, 2, 3, 24, 0, 24, 0.1),
    (12, 3, 1, 2, 24, 1, 23, 0.1),
    (12, 4, 2, 11, 40, 8, 32, 0.1),
    (5, 2, 3, 4, 10, 2, 8, 0.4),  # V = 3: the run-time V path
]


def both(case: tuple, dtype: torch.dtype, values_grad: bool = True):
    """(C++ results, float64 reference results): out, dx, dvalues of one random case."""
    L, kv, V, chains, steps, start, stop, temperature = case
    x = observations(chains, steps, V, seed=L * 10 + kv)
    values = lut_values(L, V, seed=kv)
    grad = observations(chains, stop - start, V, seed=L + kv + 1)
    ref_out, _ = bcjr.forward_reference(x, values, L, kv, temperature, start, stop)
    ref = (ref_out, *bcjr.backward_reference(x, values, ref_out, grad, L, kv, temperature, start,
                                              values_grad))
    x, values, grad = x.to(dtype), values.to(dtype), grad.to(dtype)
    out, _ = bcjr_cpu.forward(x, values, L, kv, temperature, start, stop)
    got = (out, *bcjr_cpu.backward(x, values, ref_out.to(dtype), grad, L, kv, temperature, start,
                                   values_grad))
    return got, ref


@pytest.mark.parametrize("case", CASES)
def test_float64_matches_the_reference(case: tuple) -> None:
    got, ref = both(case, F64)
    for name, a, b in zip(("out", "dx", "dvalues"), got, ref):
        assert a.dtype == F64
        assert relative_error(a, b) < 1e-12, name


@pytest.mark.parametrize("case", CASES)
def test_float32_matches_the_float64_reference(case: tuple) -> None:
    got, ref = both(case, torch.float32)
    for name, a, b in zip(("out", "dx", "dvalues"), got, ref):
        assert a.dtype == torch.float32
        assert relative_error(a, b) < 2e-5, name


def test_no_codebook_gradient_unless_asked() -> None:
    (out, dx, dvalues), (_, ref_dx, _) = both(CASES[1], F64, values_grad=False)
    assert dvalues is None
    assert relative_error(dx, ref_dx) < 1e-12


@pytest.mark.parametrize("boundary", ["free", "tail_biting"])
@pytest.mark.parametrize("dtype,tolerance", [(F64, 1e-12), (torch.float32, 2e-5)])
def test_soft_reconstruct_matches_the_torch_backend(boundary: str, dtype: torch.dtype,
                                                    tolerance: float) -> None:
    """A full-size L=12 tile set through autograd: outputs, input and codebook gradients."""
    spec, values = hyb_values(12)
    x = observations(5, 128, 2, seed=30).reshape(5, 256)
    grad = observations(5, 128, 2, seed=31).reshape(5, 256)
    results = []
    for backend, run_dtype in (("torch", F64), ("cpp", dtype)):
        xi = x.to(run_dtype).clone().requires_grad_()
        vi = values.to(run_dtype).clone().requires_grad_()
        out = soft_reconstruct(xi, vi, spec, 0.1, boundary, backend=backend)
        out.backward(grad.to(run_dtype))
        results.append((out.detach(), xi.grad, vi.grad))
    for name, a, b in zip(("out", "dx", "dvalues"), results[1], results[0]):
        assert relative_error(a, b) < tolerance, name


def test_auto_picks_the_cpp_kernels_on_cpu() -> None:
    from qat.soft_trellis import _implementation

    assert _implementation("auto", torch.zeros(1, 2, 2)) == "cpp"
    assert _implementation("torch", torch.zeros(1, 2, 2)) == "torch"


def bad_call(change: str):
    x, values = torch.zeros(2, 8, 2), torch.zeros(64, 2)
    args = dict(state_bits=6, step_bits=2, temperature=0.5, start=0, stop=8)
    if change == "dtype":
        x, values = x.half(), values.half()
    elif change == "mixed_dtype":
        values = values.double()
    elif change == "x_2d":
        x = x[0]
    elif change == "values_shape":
        values = values[:32]
    elif change == "kv_not_below_l":
        args["step_bits"] = 6
    elif change == "zero_kv":
        args["step_bits"] = 0
    elif change == "zero_temperature":
        args["temperature"] = 0.0
    elif change == "negative_temperature":
        args["temperature"] = -1.0
    elif change == "empty_range":
        args["start"] = args["stop"] = 4
    elif change == "stop_past_end":
        args["stop"] = 9
    return x, values, args


@pytest.mark.parametrize("change", ["dtype", "mixed_dtype", "x_2d", "values_shape",
                                    "kv_not_below_l", "zero_kv", "zero_temperature",
                                    "negative_temperature", "empty_range", "stop_past_end"])
def test_rejects_bad_input(change: str) -> None:
    x, values, args = bad_call(change)
    with pytest.raises(ValueError, match="bcjr"):
        bcjr_cpu.forward(x, values, **args)


def test_backward_rejects_mismatched_gradient() -> None:
    x, values = torch.zeros(2, 8, 2), torch.zeros(64, 2)
    out = bcjr_cpu.forward(x, values, 6, 2, 0.5, 0, 8)[0]
    with pytest.raises(ValueError, match="grad_out"):
        bcjr_cpu.backward(x, values, out, torch.zeros(2, 7, 2), 6, 2, 0.5)
    with pytest.raises(ValueError, match="does not match"):
        bcjr_cpu.backward(x, values, out.double(), torch.zeros(2, 8, 2).double(), 6, 2, 0.5)


def test_cpp_backend_refuses_non_cpu_and_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    from qat import soft_trellis

    monkeypatch.setenv("TRELLIS_CPU_KERNELS", "0")
    soft_trellis.cpp_unavailable_reason.cache_clear()
    try:
        assert soft_trellis._implementation("auto", torch.zeros(1, 2, 2)) == "torch"
        with pytest.raises(ValueError, match="TRELLIS_CPU_KERNELS=0"):
            posterior_mean(torch.zeros(1, 4, 1), torch.zeros(8, 1), 3, 1, 0.5, backend="cpp")
    finally:
        monkeypatch.undo()
        soft_trellis.cpp_unavailable_reason.cache_clear()
