"""Tests for the soft trellis (qat/soft_trellis.py, the torch BCJR in trellis_kernels/bcjr.py and,
where parametrized by backend, the C++ one in trellis_kernels/bcjr_cpu.cpp; "auto" picks the latter
on CPU when it loads).

The oracles are independent of the implementation: enumeration of every path (free ends, or every
circular bitstream for tail-biting) on trellises small enough to list, a dense transfer-matrix
computation of the exact cyclic measure for full-length tiles on a small L, the hard Viterbi
encoders as T -> 0, finite differences in float64, and the closed form (2/T) Cov of the Jacobian.
"""

from __future__ import annotations

import pytest
import torch

from qat.soft_trellis import (cpp_unavailable_reason, posterior_entropy, posterior_mean,
                              soft_reconstruct)
from trellis_runtime.codes import state_values
from trellis_runtime.trellis import TrellisSpec
from trellis_runtime.viterbi import tail_biting_viterbi, viterbi

F64 = torch.float64
CPU_BACKENDS = ["torch", pytest.param("cpp", marks=pytest.mark.skipif(
    cpp_unavailable_reason() is not None,
    reason=f"C++ BCJR unavailable: {cpp_unavailable_reason()}"))]


def free_paths(L: int, kv: int, steps: int) -> torch.Tensor:
    """Every free-ended path (P, steps): all bit strings of L + kv*(steps-1) bits, windowed."""
    length = L + kv * (steps - 1)
    n = torch.arange(1 << length).unsqueeze(1)
    return (n >> (length - L - kv * torch.arange(steps))) & ((1 << L) - 1)


def cyclic_paths(L: int, kv: int, steps: int) -> torch.Tensor:
    """Every tail-biting path (P, steps): all circular streams of kv*steps bits, windowed."""
    bits = kv * steps
    n = torch.arange(1 << bits).view(-1, 1, 1)
    positions = (kv * torch.arange(steps).unsqueeze(1) + torch.arange(L)) % bits  # (steps, L)
    stream_bits = (n >> (bits - 1 - positions)) & 1
    return (stream_bits << (L - 1 - torch.arange(L))).sum(-1)


def path_weights(seq: torch.Tensor, values: torch.Tensor, paths: torch.Tensor,
                 temperature: float) -> torch.Tensor:
    """Boltzmann weights (B, P) of the listed paths for observations seq (B, steps, V)."""
    energy = (values.double()[paths][None] - seq.double()[:, None]).pow(2).sum((-1, -2))
    return torch.softmax(-energy / temperature, dim=1)


def enumerated_mean(seq: torch.Tensor, values: torch.Tensor, paths: torch.Tensor,
                    temperature: float) -> torch.Tensor:
    weights = path_weights(seq, values, paths, temperature)
    return torch.einsum("bp,ptv->btv", weights, values.double()[paths])


def dense_cyclic_mean(seq: torch.Tensor, values: torch.Tensor, L: int, kv: int,
                      temperature: float) -> torch.Tensor:
    """The exact cyclic posterior mean: P_t(s) ∝ (M_{t+1} ... M_{N-1} M_0 ... M_t)[s, s]."""
    S = 1 << L
    states = torch.arange(S)
    adjacency = torch.zeros(S, S, dtype=F64)
    for c in range(1 << kv):
        adjacency[states, ((states << kv) | c) & (S - 1)] = 1.0
    values = values.double()
    out = torch.empty(seq.shape, dtype=F64)
    for b in range(seq.shape[0]):
        log_w = -(values[None] - seq[b].double()[:, None]).pow(2).sum(-1) / temperature
        mats = [adjacency * (lw - lw.max()).exp()[None] for lw in log_w]
        steps = len(mats)
        prefix, acc = [], torch.eye(S, dtype=F64)
        for m in mats:
            acc = acc @ m
            acc = acc / acc.abs().max()
            prefix.append(acc)
        acc = torch.eye(S, dtype=F64)
        for t in range(steps - 1, -1, -1):
            diag = (acc * prefix[t].t()).sum(1)
            out[b, t] = (diag / diag.sum()) @ values
            acc = mats[t] @ acc
            acc = acc / acc.abs().max()
    return out


def relative_error(got: torch.Tensor, reference: torch.Tensor) -> float:
    """max |got - reference| / max |reference|: the parity measure used for kernels too."""
    return float((got.double() - reference.double()).abs().max() / reference.double().abs().max())


def lut_values(L: int, V: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1 << L, V, generator=gen, dtype=F64)


def hyb_table(seed: int = 0) -> torch.Tensor:
    """A random unit-variance fp16 HYB table (the k-means initial table takes seconds to build)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(512, 2, generator=gen).half()


def hyb_values(state_bits: int) -> tuple[TrellisSpec, torch.Tensor]:
    spec = TrellisSpec(state_bits=state_bits, bits=2, vec=2, code="hyb")
    return spec, state_values(spec, hyb_table())


def observations(tiles: int, steps: int, V: int, seed: int, dtype=F64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(tiles, steps, V, generator=gen, dtype=dtype)


@pytest.mark.parametrize("L,kv,V,steps", [(4, 1, 1, 10), (4, 2, 2, 5), (5, 2, 1, 6), (6, 3, 2, 4)])
@pytest.mark.parametrize("temperature", [2.0, 0.3])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_free_boundary_matches_enumeration(L: int, kv: int, V: int, steps: int,
                                           temperature: float, backend: str) -> None:
    values = lut_values(L, V, seed=L * 10 + kv)
    seq = observations(3, steps, V, seed=steps)
    expected = enumerated_mean(seq, values, free_paths(L, kv, steps), temperature)
    got = posterior_mean(seq, values, L, kv, temperature, "free", backend=backend)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    got32 = posterior_mean(seq.float(), values.float(), L, kv, temperature, "free",
                           backend=backend)
    torch.testing.assert_close(got32.double(), expected, rtol=0, atol=1e-5)


def test_soft_reconstruct_with_a_real_spec_matches_enumeration() -> None:
    """L=8, K=2, V=2 (the hyb geometry with a random full table): 3 steps, 65536 paths."""
    spec = TrellisSpec(state_bits=8, bits=2, vec=2, code="lut")
    values = lut_values(8, 2, seed=3)
    x = observations(2, 3, 2, seed=4).reshape(2, 6)
    expected = enumerated_mean(x.view(2, 3, 2), values, free_paths(8, 4, 3), 0.5)
    got = soft_reconstruct(x, values, spec, 0.5, boundary="free")
    torch.testing.assert_close(got, expected.reshape(2, 6), rtol=0, atol=1e-12)


def test_entropy_matches_enumerated_marginals() -> None:
    spec = TrellisSpec(state_bits=8, bits=1, vec=1, code="lut")
    values = lut_values(8, 1, seed=5)
    steps, temperature = 8, 0.4
    x = observations(2, steps, 1, seed=6).reshape(2, steps)
    paths = free_paths(8, 1, steps)
    weights = path_weights(x.view(2, steps, 1), values, paths, temperature)
    marginals = torch.zeros(2, steps, 256, dtype=F64)
    for t in range(steps):
        marginals[:, t].index_add_(1, paths[:, t], weights)
    expected = -torch.xlogy(marginals, marginals).sum(-1).mean()
    got = posterior_entropy(x, values, spec, temperature, boundary="free")
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=0)


@pytest.mark.parametrize("L,kv,V,steps", [(4, 1, 1, 16), (4, 2, 2, 8), (3, 1, 2, 12)])
def test_cyclic_oracle_matches_enumeration(L: int, kv: int, V: int, steps: int) -> None:
    """The dense transfer-matrix oracle used below is itself exact on enumerable trellises."""
    values = lut_values(L, V, seed=7)
    seq = observations(2, steps, V, seed=8)
    expected = enumerated_mean(seq, values, cyclic_paths(L, kv, steps), 0.3)
    torch.testing.assert_close(dense_cyclic_mean(seq, values, L, kv, 0.3), expected,
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("L,kv,V,steps", [(4, 1, 1, 16), (4, 2, 2, 8)])
@pytest.mark.parametrize("temperature", [1.0, 0.3])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_tail_biting_on_tiny_circles_is_close_to_enumeration(L: int, kv: int, V: int, steps: int,
                                                              temperature: float,
                                                              backend: str) -> None:
    """A full wrap-around warm-up pass gets the circle's marginals far closer than free ends.

    (Not exact: a circle only a few state lengths long constrains paths more than any warm-up
    can see; on full tiles the difference vanishes, next test.)
    """
    values = lut_values(L, V, seed=9)
    seq = observations(4, steps, V, seed=10)
    exact = enumerated_mean(seq, values, cyclic_paths(L, kv, steps), temperature)
    circular = posterior_mean(seq, values, L, kv, temperature, "tail_biting", backend=backend,
                              warmup=steps)
    free = posterior_mean(seq, values, L, kv, temperature, "free", backend=backend)
    assert (circular - exact).abs().max() < (free - exact).abs().max() / 5


@pytest.mark.parametrize("temperature", [1.0, 0.3, 0.1])
def test_tail_biting_matches_exact_cyclic_measure_on_full_tiles(temperature: float) -> None:
    """256-weight tiles (128 steps) with L=6, KV=2 (state memory 3 steps, as at L=12, KV=4)."""
    L, kv, V, steps = 6, 2, 2, 128
    values = lut_values(L, V, seed=11)
    values = values / values.pow(2).mean().sqrt()
    seq = observations(2, steps, V, seed=12)
    exact = dense_cyclic_mean(seq, values, L, kv, temperature)
    error = {w: (posterior_mean(seq, values, L, kv, temperature, warmup=w) - exact).abs().max()
             for w in (8, 64)}
    default = (posterior_mean(seq, values, L, kv, temperature) - exact).abs().max()
    free = (posterior_mean(seq, values, L, kv, temperature, "free") - exact).abs().max()
    assert default < 2e-3 and default < free / 50
    assert error[64] < error[8] and error[64] < 1e-5


@pytest.mark.parametrize("boundary", ["free", "tail_biting"])
def test_zero_temperature_limit_is_the_viterbi_reconstruction(boundary: str) -> None:
    """In float64, where near-ties between paths are not blurred by rounding of the costs."""
    spec, values = hyb_values(8)
    values = values.double()
    x = observations(6, 128, 2, seed=13).reshape(6, 256)
    encoder = viterbi if boundary == "free" else tail_biting_viterbi
    hard = values[encoder(x, values, spec)].reshape(x.shape)
    soft = soft_reconstruct(x, values, spec, 1e-6, boundary)
    torch.testing.assert_close(soft, hard, rtol=0, atol=1e-9)
    # At a working temperature the soft output is genuinely soft.
    assert (soft_reconstruct(x, values, spec, 0.3, boundary) - hard).abs().max() > 0.1


@pytest.mark.parametrize("boundary,warmup", [("free", None), ("tail_biting", 3)])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradients_match_finite_differences(boundary: str, warmup: int | None,
                                            backend: str) -> None:
    L, kv, V, steps = 4, 2, 2, 6
    seq = observations(2, steps, V, seed=14).requires_grad_()
    values = lut_values(L, V, seed=15).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda s, v: posterior_mean(s, v, L, kv, 0.7, boundary, backend=backend, warmup=warmup),
        (seq, values))


def test_gradients_through_soft_reconstruct_match_finite_differences() -> None:
    spec = TrellisSpec(state_bits=8, bits=1, vec=1, code="lut")
    x = observations(2, 12, 1, seed=16).reshape(2, 12).requires_grad_()
    values = lut_values(8, 1, seed=17).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, v: soft_reconstruct(a, v, spec, 0.5, warmup=4), (x, values))


def test_jacobian_is_scaled_posterior_covariance() -> None:
    """d out_t / d x_u = (2/T) Cov(c_t, c_u) under the enumerated measure (free ends)."""
    L, kv, V, steps, temperature = 4, 1, 2, 5, 0.6
    values = lut_values(L, V, seed=18)
    seq = observations(1, steps, V, seed=19)
    paths = free_paths(L, kv, steps)
    weights = path_weights(seq, values, paths, temperature)[0]  # (P,)
    emitted = values[paths].reshape(len(paths), steps * V)  # (P, steps*V)
    mean = weights @ emitted
    centred = emitted - mean
    covariance = (centred * weights[:, None]).t() @ centred
    jacobian = torch.autograd.functional.jacobian(
        lambda s: posterior_mean(s, values, L, kv, temperature, "free").reshape(-1),
        seq).reshape(steps * V, steps * V)
    torch.testing.assert_close(jacobian, covariance * (2 / temperature), rtol=0, atol=1e-11)


def test_chunking_does_not_change_results() -> None:
    spec = TrellisSpec(state_bits=10, bits=2, vec=2, code="hyb")
    table = hyb_table().float()
    x = observations(7, 128, 2, seed=20, dtype=torch.float32).reshape(7, 256)
    grad = observations(7, 128, 2, seed=21, dtype=torch.float32).reshape(7, 256)
    results = []
    for chunk in (1, 3, None):
        xi, ti = x.clone().requires_grad_(), table.detach().clone().requires_grad_()
        out = soft_reconstruct(xi, state_values(spec, ti), spec, 0.2, chunk_tiles=chunk)
        out.backward(grad)
        results.append((out.detach(), xi.grad, ti.grad))
    for other in results[1:]:
        for a, b in zip(results[0], other):  # the same up to float32 summation order
            assert relative_error(b, a) < 2e-5


@pytest.mark.parametrize("boundary", ["free", "tail_biting"])
def test_float32_agrees_with_float64_at_low_temperature(boundary: str) -> None:
    """The fp32 path (exp floor, per-step re-centring, gradient rescale) against float64."""
    spec, values = hyb_values(10)
    x64 = observations(3, 128, 2, seed=22).reshape(3, 256)
    grad = observations(3, 128, 2, seed=23).reshape(3, 256) * 1e-9  # a tiny loss gradient
    outs = []
    for dtype in (torch.float32, F64):
        x = x64.to(dtype).clone().requires_grad_()
        v = values.to(dtype).clone().requires_grad_()
        out = soft_reconstruct(x, v, spec, 0.05, boundary)
        out.backward(grad.to(dtype))
        outs.append((out.detach().double(), x.grad.double(), v.grad.double()))
    for a, b in zip(*outs):
        assert relative_error(a, b) < 1e-4


def test_gradient_is_exactly_linear_in_the_incoming_gradient() -> None:
    spec, values = hyb_values(8)
    x = observations(2, 128, 2, seed=24, dtype=torch.float32).reshape(2, 256)
    grad = observations(2, 128, 2, seed=25, dtype=torch.float32).reshape(2, 256)
    grads = []
    for scale in (1.0, 2.0 ** -100):
        xi = x.clone().requires_grad_()
        soft_reconstruct(xi, values, spec, 0.1).backward(grad * scale)
        grads.append(xi.grad / scale)
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("change", [
    "x_3d", "x_not_multiple_of_v", "values_shape", "zero_temperature", "negative_temperature",
    "boundary", "chunk", "dtype", "backend", "warmup",
])
def test_rejects_bad_input(change: str) -> None:
    spec, values = hyb_values(8)
    x = torch.zeros(2, 256)
    kwargs: dict = {"temperature": 0.1}
    if change == "x_3d":
        x = x.view(2, 128, 2)
    elif change == "x_not_multiple_of_v":
        x = torch.zeros(2, 255)
    elif change == "values_shape":
        values = values[:128]
    elif change == "zero_temperature":
        kwargs["temperature"] = 0.0
    elif change == "negative_temperature":
        kwargs["temperature"] = -1.0
    elif change == "boundary":
        kwargs["boundary"] = "cyclic"
    elif change == "chunk":
        kwargs["chunk_tiles"] = 0
    elif change == "dtype":
        x = x.half()
    elif change == "backend":
        kwargs["backend"] = "cuda"
    else:
        kwargs["warmup"] = 0
    with pytest.raises(ValueError):
        soft_reconstruct(x, values, spec, **kwargs)
