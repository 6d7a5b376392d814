"""Decode attention read in place from the KV cache, against the model's torch attention over the
gathered rows (masked scaled_dot_product_attention, or the soft-capped one), in float64.

Without a GPU, tests/conftest.py runs the kernel in Triton's interpreter on CPU tensors."""

from __future__ import annotations

import pytest
import torch

from trellis_cli.kernel_suite import (ATTENTION_CACHE, CASES, attention_reference,
                                      random_attention_inputs)
from trellis_kernels.attention import decode_attention

ATTENTION_CASES = [c for c in CASES if c.kernel == "attention"]


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: c.name)
def test_decode_attention_matches_the_gathered_reference(case) -> None:
    assert case.run() <= case.tolerance


def test_bfloat16_cache_is_read_and_accumulated_in_float32() -> None:
    inputs = random_attention_inputs(2, 64, torch.bfloat16, seed=2)
    result = decode_attention(*inputs, 0.125)
    assert result.dtype == torch.bfloat16 and result.shape == inputs[0].shape
    expected = attention_reference(*inputs, 0.125, None, None)
    torch.testing.assert_close(result.double(), expected, rtol=1e-2, atol=1e-2)


def test_positions_past_a_sequence_are_never_read() -> None:
    """What lies beyond a sequence's position (another request's leftovers) changes nothing."""
    queries, keys, values, slots, positions = random_attention_inputs(2, 64, torch.float32, seed=3)
    first = decode_attention(queries, keys, values, slots, positions, 0.125)
    slot_count, _, length = ATTENTION_CACHE
    beyond = ((torch.arange(length) > positions[0])[None, None, :, None]
              & (torch.arange(slot_count) == slots[0])[:, None, None, None])
    noisy = decode_attention(queries, keys.masked_fill(beyond, 1e4),
                             values.masked_fill(beyond, 1e4), slots, positions, 0.125)
    assert torch.equal(noisy, first)


def test_mismatched_shapes_are_refused() -> None:
    queries, keys, values, slots, positions = random_attention_inputs(2, 64, torch.float32, seed=4)
    with pytest.raises(ValueError, match="do not match the cache"):
        decode_attention(queries[..., :32], keys, values, slots, positions, 0.125)
    with pytest.raises(ValueError, match="equal"):
        decode_attention(queries, keys, values[:, :, :100], slots, positions, 0.125)
