"""The Viterbi kernel against trellis_runtime.viterbi.viterbi (itself checked against brute force).

Both return optimal paths, so their errors agree up to float rounding; the suite's cases also
reject any path that breaks the trellis or the tail-biting overlap.
"""

from __future__ import annotations

import pytest
import torch

from kernels.viterbi import viterbi_paths
from trellis_runtime.codes import state_values
from trellis_runtime.kernel_suite import CASES
from trellis_runtime.trellis import TrellisSpec
from trellis_runtime.viterbi import viterbi

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
