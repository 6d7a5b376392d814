"""The C++ Viterbi search (trellis_kernels/viterbi_cpu) against the torch reference and brute force,
and `encode`'s choice of it on CPU.

The C++ sums its costs in another order than torch's addmm, so a near-tie may fall the other way:
paths must be optimal (brute force on small trellises, the reference's cost elsewhere, within float
tolerance) and equal to the reference's wherever no near-tie exists. With random Gaussian data
near-ties are rare enough that the paths themselves are compared, allowing none or one differing
sequence whose cost equals the reference's.
"""

from __future__ import annotations

import logging

import pytest
import torch

from test_viterbi import (RTOL, SMALL_CASES, assert_valid_path, errors_of, free_paths,
                         squared_errors, tail_biting_paths, values_for)
from trellis_kernels import viterbi_cpu
from trellis_runtime import backend_cpu
from trellis_runtime import viterbi as viterbi_module
from trellis_runtime.bitstream import check_path
from trellis_runtime.codes import state_values
from trellis_runtime.trellis import TrellisSpec
from trellis_runtime.viterbi import (cpu_search_unavailable_reason, default_kernel, encode,
                                     tail_biting_viterbi, viterbi)

pytestmark = pytest.mark.skipif(cpu_search_unavailable_reason() is not None,
                                reason=f"C++ Viterbi unavailable: {cpu_search_unavailable_reason()}")

# L from 8 to 16, K from 1 to 4, V 1 and 2; K*V < L. (9, 4, 1) and (10, 3, 2) have L - KV < KV,
# (16, 1, 1) a fan of 2 and (16, 4, 2) the largest fan, 256.
PARITY_SPECS = [TrellisSpec(8, 1, 1, "1mad"), TrellisSpec(8, 3, 2, "lut"),
                TrellisSpec(9, 4, 1, "lut"), TrellisSpec(10, 3, 2, "lut"),
                TrellisSpec(11, 2, 1, "3inst"), TrellisSpec(12, 2, 2, "hyb"),
                TrellisSpec(12, 1, 2, "hyb"), TrellisSpec(13, 4, 1, "1mad"),
                TrellisSpec(14, 2, 2, "hyb"), TrellisSpec(16, 1, 1, "1mad"),
                TrellisSpec(16, 4, 2, "hyb")]


def cpu_paths(x: torch.Tensor, values: torch.Tensor, spec: TrellisSpec,
              overlap: torch.Tensor | None = None) -> torch.Tensor:
    return viterbi_cpu.viterbi_paths(x, values, spec.state_bits, spec.bits, spec.vec, overlap)


def assert_same_up_to_near_ties(path: torch.Tensor, reference: torch.Tensor, x: torch.Tensor,
                                values: torch.Tensor, max_differing: int = 1) -> None:
    """Paths equal the reference's except at most `max_differing` sequences, whose error then
    equals the reference's within float tolerance (a near-tie that rounded the other way)."""
    differ = (path != reference).any(dim=1)
    assert differ.sum().item() <= max_differing
    ours, theirs = errors_of(x[differ], path[differ], values), errors_of(
        x[differ], reference[differ], values)
    assert torch.allclose(ours, theirs, rtol=RTOL, atol=0.0)


@pytest.mark.parametrize("spec", PARITY_SPECS, ids=str)
def test_paths_equal_the_reference_on_random_data(spec: TrellisSpec) -> None:
    """Free, overlap-constrained and two-pass tail-biting paths equal the torch reference's."""
    gen = torch.Generator().manual_seed(spec.state_bits * 10 + spec.bits)
    values = values_for(spec, seed=spec.state_bits)
    x = torch.randn(6, 24 * spec.vec, generator=gen)
    overlap = torch.randint(0, spec.num_groups, (6,), generator=gen)
    for o in (None, overlap):
        path = cpu_paths(x, values, spec, o)
        assert_valid_path(path, spec, 24, tail_biting=o is not None)
        assert_same_up_to_near_ties(path, viterbi(x, values, spec, overlap=o), x, values)
    path = viterbi_cpu.tail_biting_paths(x, values, spec.state_bits, spec.bits, spec.vec)
    assert_valid_path(path, spec, 24, tail_biting=True)
    assert_same_up_to_near_ties(path, tail_biting_viterbi(x, values, spec), x, values)


@pytest.mark.parametrize("spec,length", [(spec, T) for spec, lengths in SMALL_CASES
                                         for T in lengths], ids=str)
@pytest.mark.parametrize("seed", [0, 1])
def test_paths_reach_the_brute_force_optimum(spec: TrellisSpec, length: int, seed: int) -> None:
    """On trellises small enough to enumerate: the free path is the best of all paths, the path
    through each overlap the best tail-biting path through it, and the two-pass path a valid
    tail-biting path no better than the best of all."""
    gen = torch.Generator().manual_seed(seed)
    values = values_for(spec, seed)
    steps = length // spec.vec
    x = torch.randn(2, length, generator=gen)

    free_min = squared_errors(x, free_paths(spec, steps).unsqueeze(0), values).amin(1)
    path = cpu_paths(x, values, spec)
    assert_valid_path(path, spec, steps, tail_biting=False)
    assert (errors_of(x, path, values) <= free_min * (1 + RTOL)).all()

    circular = tail_biting_paths(spec, steps)
    circular_errors = squared_errors(x, circular.unsqueeze(0), values)
    overlap_of_path = (circular[:, 0] >> spec.step_bits).expand(2, -1)
    per_overlap_min = torch.full((2, spec.num_groups), float("inf"), dtype=torch.float64)
    per_overlap_min.scatter_reduce_(1, overlap_of_path, circular_errors, "amin")
    overlap = torch.arange(spec.num_groups).repeat(2)
    repeated = x.repeat_interleave(spec.num_groups, dim=0)
    path = cpu_paths(repeated, values, spec, overlap)
    assert_valid_path(path, spec, steps, tail_biting=True)
    assert torch.equal(path[:, 0] >> spec.step_bits, overlap)
    assert (errors_of(repeated, path, values) <= per_overlap_min.flatten() * (1 + RTOL)).all()

    path = viterbi_cpu.tail_biting_paths(x, values, spec.state_bits, spec.bits, spec.vec)
    assert_valid_path(path, spec, steps, tail_biting=True)
    assert (errors_of(x, path, values) >= circular_errors.amin(1)).all()


@pytest.mark.parametrize("spec", [TrellisSpec(8, 2, 1, "lut"), TrellisSpec(9, 2, 2, "lut"),
                                  TrellisSpec(10, 3, 1, "lut")], ids=str)
def test_exact_ties_break_as_the_reference(spec: TrellisSpec) -> None:
    """Small integers make every sum exact, so many paths tie exactly: the C++ search then takes the
    reference's path (the lowest last state, then the lowest predecessor)."""
    gen = torch.Generator().manual_seed(3)
    values = torch.randint(-2, 3, (spec.num_states, spec.vec), generator=gen).float()
    x = torch.randint(-2, 3, (16, 6 * spec.vec), generator=gen).float()
    overlap = torch.randint(0, spec.num_groups, (16,), generator=gen)
    for o in (None, overlap):
        assert torch.equal(cpu_paths(x, values, spec, o), viterbi(x, values, spec, overlap=o))


@pytest.mark.parametrize("spec", [TrellisSpec(12, 2, 2, "hyb"), TrellisSpec(12, 2, 1, "1mad")],
                         ids=str)
def test_encode_runs_the_cpu_search_with_the_reference_paths(spec: TrellisSpec) -> None:
    """On CPU tensors `encode` picks the C++ search by default, and on Gaussian tiles of 256
    weights its tail-biting paths are the torch path's (up to a near-tie) and packable."""
    assert default_kernel(spec, torch.device("cpu")) == "cpu"
    gen = torch.Generator().manual_seed(21)
    values = state_values(spec, torch.randn(512, 2, generator=gen).half()
                          if spec.code == "hyb" else None)
    x = torch.randn(40, 256, generator=gen) * 0.9
    path = encode(x, values, spec)
    check_path(path, spec)
    assert_same_up_to_near_ties(path, encode(x, values, spec, kernel=False), x, values)


def test_disabling_variable_keeps_encode_on_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """TRELLIS_CPU_KERNELS=0, the CPU kernels' switch, turns the C++ search off too."""
    monkeypatch.setenv(backend_cpu.DISABLE_VARIABLE, "0")
    viterbi_module.cpu_search_unavailable_reason.cache_clear()
    try:
        assert viterbi_module.cpu_search_unavailable_reason() == "disabled by TRELLIS_CPU_KERNELS=0"
        assert default_kernel(TrellisSpec(12, 2, 2, "hyb"), torch.device("cpu")) is False
    finally:
        viterbi_module.cpu_search_unavailable_reason.cache_clear()


def test_unsupported_spec_keeps_encode_on_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every spec TrellisSpec accepts is within the C++ search's limits today, so a lowered limit
    stands in for a spec beyond them."""
    monkeypatch.setattr(viterbi_cpu, "MAX_STATE_BITS", 11)
    assert default_kernel(TrellisSpec(12, 2, 2, "hyb"), torch.device("cpu")) is False
    assert default_kernel(TrellisSpec(11, 2, 2, "hyb"), torch.device("cpu")) == "cpu"


@pytest.mark.parametrize("kwargs,match", [
    (dict(x=torch.zeros(2, 8, dtype=torch.float64)), "must be float32"),
    (dict(values=torch.zeros(256, 2, dtype=torch.float16)), "must be float32"),
    (dict(x=torch.zeros(2, 7)), "multiple of V"),
    (dict(x=torch.zeros(8)), "must be \\(B, T\\)"),
    (dict(values=torch.zeros(256, 1)), "values must be \\(256, 2\\)"),
    (dict(values=torch.zeros(512, 2)), "values must be \\(256, 2\\)"),
    (dict(state_bits=7, values=torch.zeros(128, 2)), "8 <= L <= 16"),
    (dict(state_bits=17, values=torch.zeros(1 << 17, 2)), "8 <= L <= 16"),
    (dict(bits=4), "K\\*V < L"),
    (dict(bits=0), "1 <= K\\*V"),
    (dict(vec=3, values=torch.zeros(256, 3)), "V must be 1 or 2"),
    (dict(overlap=torch.zeros(3, dtype=torch.int64)), "overlap must be int64 \\(2,\\)"),
    (dict(overlap=torch.zeros(2, dtype=torch.int32)), "overlap must be int64"),
    (dict(overlap=torch.full((2,), 64)), "overlap values must lie in \\[0, 64\\)"),
])
def test_bad_arguments_are_refused(kwargs: dict, match: str) -> None:
    arguments = dict(x=torch.zeros(2, 8), values=torch.zeros(256, 2), state_bits=8, bits=1, vec=2,
                     overlap=None)
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=match):
        viterbi_cpu.viterbi_paths(**arguments)


def test_fallback_is_logged_once(monkeypatch: pytest.MonkeyPatch,
                                 caplog: pytest.LogCaptureFixture) -> None:
    """A library that cannot load (here: a compiler that does not exist) leaves the reason, logged
    once however often `encode` asks."""
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    monkeypatch.setattr(viterbi_cpu, "LIBRARY", viterbi_cpu.LIBRARY.__class__(
        name="trellis_viterbi_missing", sources=viterbi_cpu.LIBRARY.sources))
    viterbi_module.cpu_search_unavailable_reason.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="trellis_runtime"):
            for _ in range(3):
                assert default_kernel(TrellisSpec(12, 2, 2, "hyb"), torch.device("cpu")) is False
        assert "no C++ compiler" in viterbi_module.cpu_search_unavailable_reason()
        assert [r.getMessage() for r in caplog.records].count(
            "C++ Viterbi unavailable, encoding in torch: no C++ compiler: "
            "'/nonexistent/c++' was not found") == 1
    finally:
        viterbi_module.cpu_search_unavailable_reason.cache_clear()
