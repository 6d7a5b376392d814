"""The Viterbi kernel against trellis_runtime.viterbi.viterbi (itself checked against brute force),
and `encode`'s choice between them.

Both return optimal paths, so their errors agree up to float rounding; the suite's cases also
reject any path that breaks the trellis or the tail-biting overlap.
"""

from __future__ import annotations

import pytest
import torch

import trellis_kernels.viterbi as kernel_module
from trellis_cli.kernel_suite import CASES
from trellis_kernels.viterbi import viterbi_paths
from trellis_runtime import viterbi as viterbi_module
from trellis_runtime.codes import state_values
from trellis_runtime.trellis import TrellisSpec
from trellis_runtime.viterbi import encode, kernel_encodes, viterbi

VITERBI_CASES = [c for c in CASES if c.kernel == "viterbi"]


@pytest.mark.parametrize("case", VITERBI_CASES, ids=lambda c: c.name)
def test_kernel_matches_reference(case) -> None:
    assert case.run() <= case.tolerance


def test_paths_equal_the_reference_on_random_data() -> None:
    """Ties are improbable with random inputs, so the paths themselves coincide. 37 sequences
    leave the last of two 32-wide program blocks partial."""
    spec = TrellisSpec(8, 1, 2, "lut")
    gen = torch.Generator().manual_seed(9)
    values = state_values(spec, torch.randn(256, 2, generator=gen).half())
    x = torch.randn(37, 20, generator=gen)
    assert torch.equal(viterbi_paths(x, values, 8, 1, 2), viterbi(x, values, spec))


@pytest.mark.parametrize("spec", [TrellisSpec(8, 2, 1, "lut"), TrellisSpec(8, 1, 2, "lut"),
                                  TrellisSpec(9, 3, 1, "lut"), TrellisSpec(9, 2, 2, "lut")], ids=str)
def test_ties_break_alike(spec: TrellisSpec) -> None:
    """Small integers make both implementations' sums exact, so many paths tie exactly: both then
    take the lowest last state and, step by step back, the lowest predecessor."""
    gen = torch.Generator().manual_seed(3)
    values = torch.randint(-2, 3, (spec.num_states, spec.vec), generator=gen).float()
    x = torch.randint(-2, 3, (16, 6 * spec.vec), generator=gen).float()
    overlap = torch.randint(0, spec.num_groups, (16,), generator=gen)
    for o in (None, overlap):
        expected = viterbi(x, values, spec, overlap=o)
        assert torch.equal(viterbi_paths(x, values, spec.state_bits, spec.bits, spec.vec, o),
                           expected)


@pytest.mark.parametrize("spec", [TrellisSpec(8, 2, 1, "1mad"), TrellisSpec(8, 1, 2, "lut")],
                         ids=str)
def test_encode_through_the_kernel_equals_torch(spec: TrellisSpec,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """`encode(kernel=True)` (here in the interpreter) gives exactly the paths of `encode` on CPU
    tensors, which leaves the kernel alone, running both tail-biting passes of every
    memory-bounded chunk in the kernel."""
    gen = torch.Generator().manual_seed(11)
    values = state_values(spec, torch.randn(spec.num_states, spec.vec, generator=gen).half()
                          if spec.code == "lut" else None)
    x = torch.randn(3, 24, generator=gen)
    monkeypatch.setattr(viterbi_module, "STEP_BUDGET_ELEMENTS", 2 * spec.num_states)
    assert viterbi_module.chunk_size(spec, 24 // spec.vec) == 2
    batches: list[int] = []

    def recording(x_chunk: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        batches.append(x_chunk.shape[0])
        return viterbi_paths(x_chunk, *args, **kwargs)

    monkeypatch.setattr(kernel_module, "viterbi_paths", recording)
    expected = encode(x, values, spec)
    assert batches == []
    path = encode(x, values, spec, kernel=True)
    assert batches == [2, 2, 1, 1]
    assert torch.equal(path, expected)


def test_encode_picks_the_kernel_on_cuda_only() -> None:
    """On CPU `encode` keeps the torch path even with Triton installed (it would only interpret)."""
    spec = TrellisSpec(8, 2, 1, "1mad")
    assert kernel_encodes(spec, torch.device("cuda"), triton_available=True)
    assert not kernel_encodes(spec, torch.device("cuda"), triton_available=False)
    assert not kernel_encodes(spec, torch.device("cpu"), triton_available=True)


def test_unsupported_spec_keeps_the_torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every spec TrellisSpec accepts is within the kernel's limits today, so a lowered limit stands
    in for a spec beyond them."""
    spec = TrellisSpec(9, 2, 1, "1mad")
    monkeypatch.setattr(kernel_module, "MAX_STATE_BITS", 8)
    assert not kernel_encodes(spec, torch.device("cuda"), triton_available=True)
    assert kernel_encodes(TrellisSpec(8, 2, 1, "1mad"), torch.device("cuda"), triton_available=True)


@pytest.mark.parametrize("kwargs,match", [
    (dict(state_bits=8, bits=4, vec=2), "K\\*V < L"),
    (dict(state_bits=17, bits=2, vec=1), "K\\*V < L <= 16"),
    (dict(state_bits=8, bits=2, vec=2, values=torch.zeros(256, 1)), "values must be"),
    (dict(state_bits=8, bits=2, vec=2, x=torch.zeros(2, 7)), "multiple of V"),
    (dict(state_bits=8, bits=2, vec=1, overlap=torch.zeros(3, dtype=torch.int64)),
     "overlap must be"),
])
def test_bad_arguments_are_refused(kwargs: dict, match: str) -> None:
    vec = kwargs["vec"]
    x = kwargs.pop("x", torch.zeros(2, 8))
    values = kwargs.pop("values", torch.zeros(1 << min(kwargs["state_bits"], 16), vec))
    with pytest.raises(ValueError, match=match):
        viterbi_paths(x, values, **kwargs)
