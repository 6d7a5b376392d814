"""Tests for `trellis_runtime.codes` and the validation in `TrellisSpec`.

The computed codes are re-derived here from their published definitions (QTIP's 1MAD and 3INST
constants) with plain Python integers and `struct`'s fp16 decoding, so the library's vectorised
torch arithmetic is checked against an implementation that shares no code with it.
"""

from __future__ import annotations

import math
import random
import struct

import numpy as np
import pytest
import torch

from trellis_runtime import codes
from trellis_runtime.codes import (code_values, hyb_index_and_sign, initial_table, state_values,
                                   table_shape)
from trellis_runtime.errors import UnsupportedSpecError
from trellis_runtime.trellis import TrellisSpec, spec_for

MASK32 = (1 << 32) - 1
ALL_STATES_16 = 1 << 16

# QTIP's constants, written out independently of the library's module-level names.
MAD_A, MAD_B = 34038481, 76625530
INST_A, INST_B = 89226354, 64248484
INST_MASK, INST_FLIP = 0x8FFF8FFF, 0x3B603B60
SUPPORTED_V = {"1mad": (1,), "3inst": (1,), "hyb": (2,), "lut": (1, 2)}


def sample_states(count: int, seed: int) -> list[int]:
    """A reproducible sample of 16-bit states, always including both extremes."""
    rng = random.Random(seed)
    return [0, 1, ALL_STATES_16 - 1] + [rng.randrange(ALL_STATES_16) for _ in range(count)]


def half(bits16: int) -> float:
    """The IEEE half-precision number with the given 16-bit pattern."""
    return struct.unpack("<e", bits16.to_bytes(2, "little"))[0]


def mad_reference(state: int, scale: np.float32) -> np.float32:
    """1MAD: byte sum of (a*s + b) mod 2^32, centred on 510, times the float32 scale."""
    x = (MAD_A * state + MAD_B) & MASK32
    byte_sum = sum((x >> shift) & 0xFF for shift in (0, 8, 16, 24))
    return np.float32(byte_sum - 510) * scale


def inst_halves_sum(state: int) -> float:
    """3INST before scaling: the two fp16 halves of ((a*s + b) & mask) ^ flip, added (exactly)."""
    r = ((INST_A * state + INST_B) & MASK32 & INST_MASK) ^ INST_FLIP
    return half(r >> 16) + half(r & 0xFFFF)


def inst_rms() -> float:
    """RMS of the unscaled 3INST sum over all 2^16 states, summed exactly with math.fsum."""
    total = math.fsum(inst_halves_sum(s) ** 2 for s in range(ALL_STATES_16))
    return math.sqrt(total / ALL_STATES_16)


def test_mad_values_match_integer_reference() -> None:
    """1MAD values equal a pure-integer recomputation bit for bit.

    The byte sum of a uniform 32-bit word is Irwin-Hall(4) over bytes: mean 4*127.5 = 510 and
    variance 4*(256^2-1)/12; the scale is the reciprocal of that std, rounded to float32 (as
    stored). The kernels rely on this exact agreement, so equality is required, not closeness.
    """
    std32 = np.float32(math.sqrt(4 * (256 ** 2 - 1) / 12))
    scale = np.float32(1.0 / float(std32))
    states = sample_states(2000, seed=1)
    expected = np.array([mad_reference(s, scale) for s in states], dtype=np.float32)
    spec = TrellisSpec(16, 2, 1, "1mad")
    got = code_values(spec, torch.tensor(states))
    assert got.dtype == torch.float32 and got.shape == (len(states), 1)
    np.testing.assert_array_equal(got[:, 0].numpy(), expected)


def test_inst_values_match_fp16_reference() -> None:
    """3INST values equal a recomputation from the fp16 halves, bit for bit.

    The two halves have magnitudes in [2^-3, 2), so their sum is exact in float32 and the only
    rounding is the final multiply by 1/RMS. The RMS itself is recomputed over all 2^16 states
    to check that the library's normalising constant is the documented one.
    """
    rms = inst_rms()
    assert codes.INST_RMS == pytest.approx(rms, rel=1e-12)
    scale = np.float32(1.0 / rms)
    states = sample_states(2000, seed=2)
    expected = np.array([np.float32(inst_halves_sum(s)) * scale for s in states],
                        dtype=np.float32)
    spec = TrellisSpec(16, 2, 1, "3inst")
    got = code_values(spec, torch.tensor(states))
    assert got.dtype == torch.float32 and got.shape == (len(states), 1)
    np.testing.assert_array_equal(got[:, 0].numpy(), expected)


@pytest.fixture(scope="module")
def hyb_initial_table() -> torch.Tensor:
    """HYB's real initial table (30 k-means iterations, several seconds): computed once."""
    return initial_table(TrellisSpec(16, 2, 2, "hyb"), seed=0)


def assert_unit_statistics(values: torch.Tensor, mean_tol: float, square_tol: float) -> None:
    """Every value finite; per coordinate, mean within mean_tol of 0 and mean square of 1."""
    assert torch.isfinite(values).all()
    v = values.double()
    assert v.mean(0).abs().max().item() < mean_tol
    assert (v.pow(2).mean(0) - 1).abs().max().item() < square_tol


@pytest.mark.parametrize("code", ["1mad", "3inst"])
def test_computed_codes_have_unit_variance_over_all_states(code: str) -> None:
    """Over all 2^16 states the computed codes are centred with unit mean square.

    One scale rule fits every code only if each has unit variance. 1MAD is normalised by the
    theoretical Irwin-Hall moments (so only approximately), 3INST by its measured RMS.
    """
    values = state_values(TrellisSpec(16, 2, 1, code))
    assert values.shape == (ALL_STATES_16, 1)
    assert_unit_statistics(values, mean_tol=0.01, square_tol=0.01)


def test_hyb_initial_table_has_unit_variance_over_all_states(
        hyb_initial_table: torch.Tensor) -> None:
    """HYB with its initial table: all 2^16 states give centred values of unit mean square.

    The table is normalised uniformly over its rows while the hash visits rows only roughly
    uniformly, hence the looser tolerances.
    """
    values = state_values(TrellisSpec(16, 2, 2, "hyb"), hyb_initial_table)
    assert values.shape == (ALL_STATES_16, 2)
    assert_unit_statistics(values, mean_tol=0.05, square_tol=0.05)


@pytest.mark.parametrize("vec", [1, 2])
def test_lut_initial_table_has_unit_variance_over_all_states(vec: int) -> None:
    """LUT at its largest L=12: all 2^12 states give centred values of unit mean square.

    The whole table is normalised to mean square 1 (checked tightly, up to fp16 rounding); each
    coordinate separately only statistically (4096 Gaussian entries: std of the mean ~0.016,
    of the mean square ~0.022, so the tolerances are about 4 sigma).
    """
    spec = TrellisSpec(12, 2, vec, "lut")
    values = state_values(spec, initial_table(spec, seed=0))
    assert values.shape == (1 << 12, vec)
    assert_unit_statistics(values, mean_tol=0.07, square_tol=0.1)
    assert values.double().pow(2).mean().item() == pytest.approx(1.0, abs=1e-3)


def test_hyb_index_and_sign_rule() -> None:
    """HYB hashes h = s*(s+1) mod 2^16, reads row (h >> 6) & 511, negates value 0 iff h's bit 15.

    Checked for all 2^16 states against a pure-Python computation, both the (index, sign) pair
    and the values that code_values returns from a random fp16 table.
    """
    index_ref, flip_ref = [], []
    for s in range(ALL_STATES_16):
        h = (s * (s + 1)) % ALL_STATES_16
        index_ref.append((h >> 6) & 511)
        flip_ref.append(bool(h >> 15))
    states = torch.arange(ALL_STATES_16)
    index, flip = hyb_index_and_sign(states)
    assert index.tolist() == index_ref
    assert flip.tolist() == flip_ref

    spec = TrellisSpec(16, 2, 2, "hyb")
    table = torch.randn(table_shape(spec), generator=torch.Generator().manual_seed(3)).half()
    rows = table.float()[torch.tensor(index_ref)]
    sign = 1.0 - 2.0 * torch.tensor(flip_ref, dtype=torch.float32)
    expected = torch.stack((rows[:, 0] * sign, rows[:, 1]), dim=1)
    assert torch.equal(code_values(spec, states, table), expected)


def test_lut_values_are_table_rows() -> None:
    """LUT reads row s of its 2^L x V table; table codes refuse to run without a table."""
    spec = TrellisSpec(10, 2, 2, "lut")
    table = torch.randn(table_shape(spec), generator=torch.Generator().manual_seed(4)).half()
    states = torch.tensor(sample_states(500, seed=5)) % spec.num_states
    assert torch.equal(code_values(spec, states, table), table.float()[states])
    with pytest.raises(ValueError):
        code_values(spec, states)


@pytest.mark.parametrize("spec,shape", [
    (TrellisSpec(16, 2, 2, "hyb"), (512, 2)),
    (TrellisSpec(9, 1, 2, "hyb"), (512, 2)),
    (TrellisSpec(12, 2, 1, "lut"), (4096, 1)),
    (TrellisSpec(8, 3, 2, "lut"), (256, 2)),
    (TrellisSpec(16, 2, 1, "1mad"), None),
    (TrellisSpec(16, 2, 1, "3inst"), None),
])
def test_table_shape(spec: TrellisSpec, shape: tuple[int, int] | None) -> None:
    """HYB always has a 512x2 table, LUT a 2^L x V one, computed codes none (nor initial table)."""
    assert table_shape(spec) == shape
    if shape is None:
        assert initial_table(spec) is None


@pytest.mark.parametrize("spec", [TrellisSpec(12, 2, 1, "lut"), TrellisSpec(11, 2, 2, "lut")])
def test_lut_initial_table_is_seeded_fp16(spec: TrellisSpec) -> None:
    """LUT's initial table: fp16, table_shape, identical for a seed, different across seeds."""
    first = initial_table(spec, seed=7)
    assert first.dtype == torch.float16 and tuple(first.shape) == table_shape(spec)
    assert torch.equal(first, initial_table(spec, seed=7))
    assert not torch.equal(first, initial_table(spec, seed=8))


def test_hyb_initial_table_is_seeded_fp16(hyb_initial_table: torch.Tensor,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """HYB's initial table: fp16, 512x2, identical for a seed, different across seeds.

    The full table (30 k-means iterations) is checked for dtype and shape. Repeating it for the
    seed checks would cost seconds per call on 2 cores, so those calls run k-means for 2
    iterations: the seed only enters through the Gaussian samples and the initial centroid
    draw, which the shortened run goes through unchanged.
    """
    spec = TrellisSpec(16, 2, 2, "hyb")
    assert hyb_initial_table.dtype == torch.float16
    assert tuple(hyb_initial_table.shape) == table_shape(spec)
    full_kmeans = codes._kmeans
    monkeypatch.setattr(codes, "_kmeans",
                        lambda points, k, iters, gen: full_kmeans(points, k, 2, gen))
    first = initial_table(spec, seed=0)
    assert first.dtype == torch.float16 and tuple(first.shape) == table_shape(spec)
    assert torch.equal(first, initial_table(spec, seed=0))
    assert not torch.equal(first, initial_table(spec, seed=1))


def is_supported(L: int, K: int, V: int, code: str) -> bool:
    """The supported set, from the spec: L 8..16, K 1..4, V per code, K*V < L, LUT only L <= 12."""
    return (code in SUPPORTED_V and 8 <= L <= 16 and 1 <= K <= 4 and V in SUPPORTED_V[code]
            and K * V < L and (code != "lut" or L <= 12))


def test_spec_accepts_exactly_the_supported_set() -> None:
    """Every (L, K, V, code) in a grid around the limits is accepted iff it is supported.

    Rejections must be UnsupportedSpecError (a ValueError) with a one-line message, because the
    CLI prints the message on a single line.
    """
    for L in range(6, 19):
        for K in range(0, 6):
            for V in range(0, 4):
                for code in ("1mad", "3inst", "hyb", "lut", "bogus"):
                    if is_supported(L, K, V, code):
                        TrellisSpec(L, K, V, code)
                        continue
                    with pytest.raises(UnsupportedSpecError) as err:
                        TrellisSpec(L, K, V, code)
                    message = str(err.value)
                    assert message and "\n" not in message


@pytest.mark.parametrize("args,fragment", [
    ((7, 1, 1, "1mad"), "L=7"),
    ((17, 2, 1, "1mad"), "L=17"),
    ((16, 0, 1, "1mad"), "K=0"),
    ((16, 5, 1, "3inst"), "K=5"),
    ((16, 2, 2, "1mad"), "V=2"),
    ((16, 2, 2, "3inst"), "V=2"),
    ((16, 2, 1, "hyb"), "V=1"),
    ((12, 2, 3, "lut"), "V=3"),
    ((8, 4, 2, "hyb"), "K*V < L"),
    ((8, 4, 2, "lut"), "K*V < L"),
    ((13, 2, 2, "lut"), "13"),
    ((16, 2, 2, "qtip"), "qtip"),
])
def test_spec_rejection_messages(args: tuple[int, int, int, str], fragment: str) -> None:
    """Each kind of unsupported spec raises UnsupportedSpecError naming the offending value."""
    with pytest.raises(UnsupportedSpecError) as err:
        TrellisSpec(*args)
    message = str(err.value)
    assert "\n" not in message
    assert fragment in message


def test_spec_for_rejects_unknown_code() -> None:
    """spec_for fills V from the code's default, so it must reject an unknown code itself."""
    with pytest.raises(UnsupportedSpecError) as err:
        spec_for("qtip")
    assert "\n" not in str(err.value)
