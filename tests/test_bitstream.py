"""Tests for the packed tile layout in `trellis_runtime.bitstream`.

Paths and words are built here straight from the layout the module documents (a circular stream of
256*K bits; state t is the L-bit window at bit t*K*V, MSB first; 32 bits per word, MSB first), with
numpy's packbits for the words, so the packer and unpacker are checked against an independent
construction rather than against each other only.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trellis_runtime.bitstream import pack_states, unpack_states
from trellis_runtime.codes import code_values, table_shape
from trellis_runtime.trellis import TrellisSpec

SUPPORTED_V = {"1mad": (1,), "3inst": (1,), "hyb": (2,), "lut": (1, 2)}
BATCH = (2, 3)  # two leading dimensions, to check that packing works on (..., steps)


def supported_specs() -> list[TrellisSpec]:
    """Every supported (L, K, V, code): L 8..16, K 1..4, V per code, K*V < L, LUT only L <= 12."""
    return [TrellisSpec(L, K, V, code)
            for code, vecs in SUPPORTED_V.items() for V in vecs
            for L in range(8, 17) for K in range(1, 5)
            if K * V < L and (code != "lut" or L <= 12)]


def random_stream(spec: TrellisSpec, seed: int) -> torch.Tensor:
    """Random tile bitstreams (*BATCH, 256*K) of 0/1 int64."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, BATCH + (256 * spec.bits,), generator=gen)


def states_from_stream(bits: torch.Tensor, spec: TrellisSpec) -> torch.Tensor:
    """State t = the L-bit window starting at bit t*K*V, MSB first, indices modulo the length."""
    L = spec.state_bits
    positions = (torch.arange(spec.steps).unsqueeze(1) * spec.step_bits
                 + torch.arange(L)) % bits.shape[-1]  # (steps, L)
    weights = 1 << torch.arange(L - 1, -1, -1)
    return (bits[..., positions] * weights).sum(-1)


def words_from_stream(bits: torch.Tensor) -> torch.Tensor:
    """Pack bits MSB first into 32-bit words, returned as int32 with the same bit pattern."""
    packed = np.packbits(bits.numpy().astype(np.uint8), axis=-1)  # bytes, MSB first
    words = packed.view(">u4").astype(np.uint32).view(np.int32)
    return torch.from_numpy(words.copy())


@pytest.mark.parametrize("spec", supported_specs(), ids=str)
def test_pack_unpack_round_trip_for_every_supported_spec(spec: TrellisSpec) -> None:
    """pack_states and unpack_states agree with the documented layout for every supported spec.

    Packing a valid tail-biting path must give exactly the MSB-first packing of its stream (8K
    int32 words, i.e. exactly 256*K bits per tile), and unpacking those words must give the path
    back. Every supported spec is enumerated because L, K and V together decide where windows
    straddle word boundaries and where the last windows wrap to the start of the tile.
    """
    bits = random_stream(spec, seed=spec.state_bits * 100 + spec.bits * 10 + spec.vec)
    states = states_from_stream(bits, spec)
    words = words_from_stream(bits)
    assert spec.words_per_tile * 32 == 256 * spec.bits

    packed = pack_states(states, spec)
    assert packed.dtype == torch.int32
    assert packed.shape == BATCH + (8 * spec.bits,)
    assert torch.equal(packed, words)

    unpacked = unpack_states(words, spec)
    assert unpacked.shape == BATCH + (spec.steps,)
    assert torch.equal(unpacked, states)


def decode_specs() -> list[TrellisSpec]:
    """One spec per code (and both V for LUT), at the usual 2 bits."""
    return [TrellisSpec(16, 2, 1, "1mad"), TrellisSpec(16, 2, 1, "3inst"),
            TrellisSpec(16, 2, 2, "hyb"), TrellisSpec(12, 2, 1, "lut"),
            TrellisSpec(12, 2, 2, "lut")]


@pytest.mark.parametrize("spec", decode_specs(), ids=str)
def test_decoded_reconstruction_survives_packing(spec: TrellisSpec) -> None:
    """The tile reconstructed from packed words equals the one from the encoder's states.

    This is what a checkpoint relies on: the weights a kernel decodes from the stored words are
    bit-identical to those the quantiser measured its error on.
    """
    gen = torch.Generator().manual_seed(11)
    shape = table_shape(spec)
    table = None if shape is None else torch.randn(shape, generator=gen).half()
    states = states_from_stream(random_stream(spec, seed=12), spec)
    direct = code_values(spec, states, table).flatten(-2)
    decoded = code_values(spec, unpack_states(pack_states(states, spec), spec), table).flatten(-2)
    assert direct.shape == BATCH + (256,)
    assert torch.equal(decoded, direct)


@pytest.mark.parametrize("spec", [TrellisSpec(16, 2, 2, "hyb"), TrellisSpec(9, 4, 2, "hyb"),
                                  TrellisSpec(8, 1, 1, "1mad")], ids=str)
@pytest.mark.parametrize("where", [0, 37, -1])
@pytest.mark.parametrize("bit", ["top", "bottom"])
def test_pack_rejects_paths_that_are_not_tail_biting(spec: TrellisSpec, where: int,
                                                     bit: str) -> None:
    """Flipping one bit of one state breaks its overlap with a neighbour: packing must refuse.

    The top bit of a state is shared with its predecessor and the bottom bit with its successor
    (both wrap around the tile), so either flip, at the first, a middle, or the last step, makes
    the path invalid; silently packing it would store a different path.
    """
    states = states_from_stream(random_stream(spec, seed=13), spec)
    states[1, 2, where] ^= 1 << (spec.state_bits - 1) if bit == "top" else 1
    with pytest.raises(ValueError):
        pack_states(states, spec)


def test_pack_rejects_wrong_number_of_steps() -> None:
    """A path must have exactly one state per step of a 256-weight tile."""
    spec = TrellisSpec(16, 2, 1, "1mad")
    states = states_from_stream(random_stream(spec, seed=14), spec)
    with pytest.raises(ValueError):
        pack_states(states[..., :-1], spec)
