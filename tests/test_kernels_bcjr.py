"""The fused BCJR kernels (trellis_kernels/bcjr.py) against their torch reference in the same module.

Without a GPU, tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported, so the kernels
run in Triton's interpreter on small trellises. Parity is max |kernel - reference| / max |reference|
< 1e-4, for the outputs, the input gradient and the codebook gradient. The last test runs only on
CUDA, where soft_reconstruct picks the kernels by itself, at a full-size L=12 trellis.
"""

from __future__ import annotations

import pytest
import torch

from qat.soft_trellis import soft_reconstruct
from trellis_kernels import bcjr
from trellis_kernels.bcjr import backward_reference, backward_triton, forward_reference, forward_triton
from trellis_runtime.codes import state_values
from trellis_runtime.trellis import TrellisSpec

PARITY = 1e-4


def relative_error(got: torch.Tensor, reference: torch.Tensor) -> float:
    return float((got.double() - reference.double()).abs().max() / reference.double().abs().max())


def chain_inputs(L: int, V: int, chains: int, steps: int, seed: int,
                 device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(chains, steps, V, generator=gen)
    values = torch.randn(1 << L, V, generator=gen)
    return x.to(device), values.to(device)


# (L, KV, V, chains, steps, start, stop, T): odd chain counts, emitted windows inside the chain
# (as tail-biting uses), several blocks of groups per step (L=10, KV=1), wide fans (KV=6).
CASES = [
    (4, 1, 1, 3, 9, 0, 9, 0.5),
    (6, 2, 2, 5, 12, 2, 9, 0.3),
    (8, 4, 2, 3, 10, 3, 8, 0.2),
    (5, 3, 1, 1, 7, 0, 7, 1.0),
    (10, 1, 1, 2, 6, 1, 5, 0.4),
    (8, 6, 2, 3, 5, 1, 4, 0.7),
]


@pytest.mark.parametrize("L,kv,V,chains,steps,start,stop,T", CASES)
def test_forward_kernel_matches_reference(L, kv, V, chains, steps, start, stop, T) -> None:
    x, values = chain_inputs(L, V, chains, steps, seed=L * 7 + kv)
    expected, _ = forward_reference(x, values, L, kv, T, start, stop)
    out = torch.full((chains, stop - start, V), float("nan"))  # poisoned: catches gaps
    got, _ = forward_triton(x, values, L, kv, T, start, stop, out=out)
    assert got is out
    assert not torch.isnan(got).any()
    assert relative_error(got, expected) < PARITY


@pytest.mark.parametrize("L,kv,V,chains,steps,start,stop,T", CASES)
def test_backward_kernel_matches_reference(L, kv, V, chains, steps, start, stop, T) -> None:
    x, values = chain_inputs(L, V, chains, steps, seed=L * 11 + kv)
    out, _ = forward_reference(x, values, L, kv, T, start, stop)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    dx_ref, dv_ref = backward_reference(x, values, out, grad, L, kv, T, start, values_grad=True)
    dx = torch.full_like(x, float("nan"))
    got_dx, got_dv = backward_triton(x, values, out, grad, L, kv, T, start, values_grad=True,
                                     dx=dx)
    assert got_dx is dx
    assert not torch.isnan(got_dx).any() and not torch.isnan(got_dv).any()
    assert relative_error(got_dx, dx_ref) < PARITY
    assert relative_error(got_dv, dv_ref) < PARITY
    dx_only, none = backward_triton(x, values, out, grad, L, kv, T, start)
    assert none is None and relative_error(dx_only, dx_ref) < PARITY


def test_kernels_at_low_temperature() -> None:
    """T = 0.02: peaked marginals, where the streamed normalisers and the exp floor matter."""
    L, kv, V = 8, 4, 2
    x, values = chain_inputs(L, V, 3, 16, seed=3)
    expected, _ = forward_reference(x, values, L, kv, 0.02, 2, 14)
    got, _ = forward_triton(x, values, L, kv, 0.02, 2, 14)
    assert relative_error(got, expected) < PARITY
    grad = torch.randn(expected.shape, generator=torch.Generator().manual_seed(6))
    dx_ref, dv_ref = backward_reference(x, values, expected, grad, L, kv, 0.02, 2, True)
    dx, dv = backward_triton(x, values, expected, grad, L, kv, 0.02, 2, True)
    assert relative_error(dx, dx_ref) < PARITY and relative_error(dv, dv_ref) < PARITY


def test_soft_reconstruct_selects_the_kernels() -> None:
    """backend="triton" routes soft_reconstruct (tail-biting, chunked, autograd) through them."""
    spec = TrellisSpec(state_bits=8, bits=2, vec=2, code="hyb")
    table = torch.randn(512, 2, generator=torch.Generator().manual_seed(7)).half()
    x = torch.randn(3, 48, generator=torch.Generator().manual_seed(8))
    grad = torch.randn(3, 48, generator=torch.Generator().manual_seed(9))
    results = []
    for backend in ("torch", "triton"):
        xi = x.clone().requires_grad_()
        ti = table.float().requires_grad_()
        out = soft_reconstruct(xi, state_values(spec, ti), spec, 0.2, chunk_tiles=2,
                               backend=backend, warmup=4)
        out.backward(grad)
        results.append((out.detach(), xi.grad, ti.grad))
    for got, expected in zip(results[1], results[0]):
        assert relative_error(got, expected) < PARITY


@pytest.mark.parametrize("change", ["float64", "vec3", "out_shape", "emitted_range"])
def test_kernels_reject_what_they_do_not_implement(change: str) -> None:
    x, values = chain_inputs(6, 2, 2, 8, seed=1)
    kwargs: dict = {}
    if change == "float64":
        x, values = x.double(), values.double()
    elif change == "vec3":
        x, values = torch.zeros(2, 8, 3), torch.zeros(64, 3)
    elif change == "out_shape":
        kwargs["out"] = torch.empty(2, 7, 2)
    with pytest.raises(ValueError):
        stop = 9 if change == "emitted_range" else 8
        forward_triton(x, values, 6, 2, 0.5, 0, stop, **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("boundary", ["free", "tail_biting"])
def test_cuda_soft_reconstruct_uses_kernels_and_matches_torch(boundary: str,
                                                             monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    calls = []
    for name in ("forward_triton", "backward_triton"):  # count the real kernels' launches
        real = getattr(bcjr, name)
        monkeypatch.setattr(bcjr, name, lambda *a, _real=real, _name=name, **k: (
            calls.append(_name), _real(*a, **k))[1])
    spec = TrellisSpec(state_bits=12, bits=2, vec=2, code="hyb")
    gen = torch.Generator().manual_seed(10)
    table = torch.randn(512, 2, generator=gen).half().cuda()
    x = torch.randn(33, 256, generator=gen).cuda()
    grad = torch.randn(33, 256, generator=gen).cuda()
    results = []
    for backend in ("torch", "auto"):
        xi = x.clone().requires_grad_()
        ti = table.float().requires_grad_()
        out = soft_reconstruct(xi, state_values(spec, ti, device="cuda"), spec, 0.1, boundary,
                               backend=backend)
        out.backward(grad)
        results.append((out.detach(), xi.grad, ti.grad))
    for got, expected in zip(results[1], results[0]):
        assert relative_error(got, expected) < PARITY
    assert "forward_triton" in calls and "backward_triton" in calls
