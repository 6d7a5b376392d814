"""Tests for the Viterbi encoder in `trellis_runtime.viterbi`.

On trellises small enough to enumerate every path, each encoder is compared with the brute-force
optimum of its problem: free start and end, tail-biting through a given overlap, or tail-biting
overall. Errors are measured here in float64, with one function for both the enumerated paths and
the encoder's, so a returned path's error is exactly one of the enumerated values.
"""

from __future__ import annotations

import pytest
import torch

from trellis_runtime import viterbi as viterbi_module
from trellis_runtime.bitstream import check_path
from trellis_runtime.codes import state_values, table_shape
from trellis_runtime.trellis import TrellisSpec
from trellis_runtime.viterbi import (encode, exact_tail_biting_viterbi, tail_biting_viterbi,
                                     viterbi)

RTOL = 1e-5  # the encoder accumulates costs in float32; brute force is float64
SEQUENCES = 2  # sequences per call, so the batch dimension is exercised too


def values_for(spec: TrellisSpec, seed: int) -> torch.Tensor:
    """The (2^L, V) state values of a spec, with a random fp16 table for table codes."""
    shape = table_shape(spec)
    gen = torch.Generator().manual_seed(1000 + seed)
    table = None if shape is None else torch.randn(shape, generator=gen).half()
    return state_values(spec, table)


def squared_errors(x: torch.Tensor, paths: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Squared error (B, P) of sequences x (B, T) against paths (B or 1, P, steps), in float64.

    Accumulated step by step in a fixed order, so equal paths always give equal errors.
    """
    x, values = x.double(), values.double()
    V = values.shape[1]
    error = torch.zeros(x.shape[0], paths.shape[1], dtype=torch.float64)
    for t in range(paths.shape[-1]):
        diff = values[paths[..., t]] - x[:, None, t * V:(t + 1) * V]
        error += diff.pow(2).sum(-1)
    return error


def errors_of(x: torch.Tensor, path: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Squared error (B,) of each sequence against its own path (B, steps)."""
    return squared_errors(x, path.unsqueeze(1), values)[:, 0]


def free_paths(spec: TrellisSpec, steps: int) -> torch.Tensor:
    """All paths with free ends: every bit string of L + KV*(steps-1) bits, windows at t*KV."""
    L, kv = spec.state_bits, spec.step_bits
    length = L + kv * (steps - 1)
    n = torch.arange(1 << length).unsqueeze(1)
    shifts = length - L - kv * torch.arange(steps)
    return (n >> shifts) & (spec.num_states - 1)


def tail_biting_paths(spec: TrellisSpec, steps: int) -> torch.Tensor:
    """All tail-biting paths: every circular bit string of steps*KV bits, windows at t*KV.

    The string is written twice in a row so each window, wrapping or not, is a plain shift.
    """
    L, kv = spec.state_bits, spec.step_bits
    length = steps * kv
    assert length >= L, "each window must fit in the doubled string"
    n = torch.arange(1 << length).unsqueeze(1)
    doubled = (n << length) | n
    shifts = 2 * length - L - kv * torch.arange(steps)
    return (doubled >> shifts) & (spec.num_states - 1)


def assert_valid_path(path: torch.Tensor, spec: TrellisSpec, steps: int,
                      tail_biting: bool) -> None:
    """States are L-bit and consecutive ones overlap in L-KV bits (cyclically if tail-biting)."""
    assert path.dtype == torch.int64 and path.shape[-1] == steps
    assert ((path >= 0) & (path < spec.num_states)).all()
    low = path & (spec.num_groups - 1)
    assert torch.equal(low[:, :-1], path[:, 1:] >> spec.step_bits)
    if tail_biting:
        assert torch.equal(low[:, -1], path[:, 0] >> spec.step_bits)


# (spec, sequence lengths T), each with 2^14..2^20 free paths and 2^8..2^16 tail-biting paths.
# When L is a multiple of KV the KV bits a step drops form one field of the cost index; otherwise
# some steps' field wraps past the least significant end, a separate code path in both the forward
# pass and the trace-back. (8, 3, 1) wraps at step 2 with unequal halves, and T=5 makes the
# trace-back read that step's minima; (11, 2, 2) wraps at step 2 with V=2.
SMALL_CASES = [
    (TrellisSpec(8, 1, 1, "1mad"), (9, 11)),
    (TrellisSpec(8, 3, 1, "1mad"), (4, 5)),
    (TrellisSpec(8, 2, 1, "3inst"), (5, 6)),
    (TrellisSpec(9, 2, 1, "3inst"), (5, 6)),
    (TrellisSpec(8, 1, 2, "lut"), (8, 10)),
    (TrellisSpec(9, 1, 2, "lut"), (10, 12)),
    (TrellisSpec(8, 2, 2, "hyb"), (6, 8)),
    (TrellisSpec(11, 2, 2, "hyb"), (6,)),
]


@pytest.mark.parametrize("spec,length", [(spec, T) for spec, lengths in SMALL_CASES
                                         for T in lengths], ids=str)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_encoders_match_brute_force(spec: TrellisSpec, length: int, seed: int) -> None:
    """Every encoder reaches the optimum of its problem, found by enumerating all paths.

    - viterbi without overlap: the best path with free start and end;
    - viterbi with overlap o, for every o: the best tail-biting path whose first state starts
      (and last state ends) with o;
    - exact_tail_biting_viterbi: the best tail-biting path overall;
    - tail_biting_viterbi (a two-pass guess of the overlap): a valid tail-biting path, no better
      than the optimum.
    Sequences are short so that enumeration is feasible; the DP is the same at any length.
    """
    gen = torch.Generator().manual_seed(seed)
    values = values_for(spec, seed)
    steps = length // spec.vec
    x = torch.randn(SEQUENCES, length, generator=gen)

    free_min = squared_errors(x, free_paths(spec, steps).unsqueeze(0), values).amin(1)
    path = viterbi(x, values, spec)
    assert_valid_path(path, spec, steps, tail_biting=False)
    assert (errors_of(x, path, values) <= free_min * (1 + RTOL)).all()

    circular = tail_biting_paths(spec, steps)
    circular_errors = squared_errors(x, circular.unsqueeze(0), values)
    groups = spec.num_groups
    overlap_of_path = (circular[:, 0] >> spec.step_bits).expand(SEQUENCES, -1)
    per_overlap_min = torch.full((SEQUENCES, groups), float("inf"), dtype=torch.float64)
    per_overlap_min.scatter_reduce_(1, overlap_of_path, circular_errors, "amin")
    overlap = torch.arange(groups).repeat(SEQUENCES)
    repeated = x.repeat_interleave(groups, dim=0)
    path = viterbi(repeated, values, spec, overlap=overlap)
    assert_valid_path(path, spec, steps, tail_biting=True)
    assert torch.equal(path[:, 0] >> spec.step_bits, overlap)
    assert (errors_of(repeated, path, values) <= per_overlap_min.flatten() * (1 + RTOL)).all()

    tail_biting_min = circular_errors.amin(1)
    path = exact_tail_biting_viterbi(x, values, spec)
    assert_valid_path(path, spec, steps, tail_biting=True)
    assert (errors_of(x, path, values) <= tail_biting_min * (1 + RTOL)).all()

    path = tail_biting_viterbi(x, values, spec)
    assert_valid_path(path, spec, steps, tail_biting=True)
    assert (errors_of(x, path, values) >= tail_biting_min).all()


@pytest.mark.parametrize("spec", [TrellisSpec(11, 2, 1, "1mad"), TrellisSpec(10, 2, 2, "hyb")],
                         ids=str)
def test_encode_in_chunks_equals_whole_batch(spec: TrellisSpec,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """encode splits tiles into memory-bounded chunks without changing any tile's path.

    The budgets are shrunk so that 8 tiles go in chunks of 3, 3 and 2 (a partial last chunk, and
    a history buffer reused across chunks); the result must equal one tail-biting run over the
    whole batch, and be packable tile paths.
    """
    gen = torch.Generator().manual_seed(5)
    values = values_for(spec, seed=5)
    x = torch.randn(8, 256, generator=gen)
    whole = tail_biting_viterbi(x, values, spec)

    chunk = 3
    monkeypatch.setattr(viterbi_module, "HISTORY_BUDGET_BYTES",
                        chunk * spec.steps * spec.num_groups * 4)
    monkeypatch.setattr(viterbi_module, "STEP_BUDGET_ELEMENTS", chunk * spec.num_states)
    assert viterbi_module.chunk_size(spec, spec.steps) == chunk
    chunk_sizes: list[int] = []

    def recording(x_chunk: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        chunk_sizes.append(x_chunk.shape[0])
        return tail_biting_viterbi(x_chunk, *args, **kwargs)

    monkeypatch.setattr(viterbi_module, "tail_biting_viterbi", recording)
    chunked = encode(x, values, spec)
    assert chunk_sizes == [3, 3, 2]
    assert torch.equal(chunked, whole)
    check_path(chunked, spec)


def test_two_pass_tail_biting_is_near_exact_on_tiles() -> None:
    """On full 256-weight tiles QTIP's two-pass guess loses almost nothing to the exact optimum.

    A wrong guess of the wrap-around bits costs several percent of a tile's error (reading the
    seam state one step off costs 6-9% here), so the mean excess over the exact tail-biting
    optimum must stay below 1%; it can never be negative.
    """
    spec = TrellisSpec(8, 2, 1, "1mad")
    values = state_values(spec)
    x = torch.randn(8, 256, generator=torch.Generator().manual_seed(7))
    exact = errors_of(x, exact_tail_biting_viterbi(x, values, spec), values)
    two_pass = errors_of(x, tail_biting_viterbi(x, values, spec), values)
    excess = (two_pass - exact) / exact
    assert (excess >= -RTOL).all()
    assert excess.mean().item() < 0.01


LLOYD_MAX_2BIT_MSE = 0.1175  # best 4-level scalar quantiser of N(0, 1)
RATE_DISTORTION_2BIT_MSE = 2.0 ** -4  # D(R) = 2^(-2R) for a unit Gaussian at R = 2 bits


def test_one_mad_distortion_on_gaussian_tiles() -> None:
    """1MAD at L=12, K=2 on i.i.d. N(0,1) tiles lands between the known bounds for 2 bits.

    The tiles are multiplied by 0.9 before encoding and the reconstruction divided by 0.9, so the
    MSE is in the original units. It must be well below (by 15%) Lloyd-Max scalar quantisation,
    which a trellis code exists to beat, and above the Gaussian rate-distortion bound, which no
    code can beat.
    """
    spec = TrellisSpec(12, 2, 1, "1mad")
    scale = 0.9
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(6))
    values = state_values(spec)
    path = encode(x * scale, values, spec)
    check_path(path, spec)
    reconstruction = values[path].reshape(x.shape) / scale
    mse = (reconstruction - x).pow(2).mean().item()
    assert RATE_DISTORTION_2BIT_MSE < mse < 0.85 * LLOYD_MAX_2BIT_MSE
