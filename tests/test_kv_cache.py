"""The KV cache hands out slots lowest first, takes them back, reports usage, refuses what it cannot hold."""

from __future__ import annotations

import pytest
import torch

from trellis_runtime.kv_cache import CacheFullError, KVCache


def small_cache(max_slots: int = 3) -> KVCache:
    return KVCache(layers=2, max_slots=max_slots, kv_heads=2, max_seq_len=8, head_dim=4)


def test_shapes_and_usage() -> None:
    cache = small_cache()
    assert len(cache.keys) == len(cache.values) == 2
    assert cache.keys[0].shape == (3, 2, 8, 4) and cache.keys[0].dtype == torch.float32
    usage = cache.usage()
    assert (usage.slots_used, usage.slots_total) == (0, 3)
    assert usage.bytes_total == 2 * 2 * 3 * 2 * 8 * 4 * 4  # keys+values, layers, slots, kvh, seq, dim, fp32


def test_allocate_free_lowest_first() -> None:
    cache = small_cache()
    assert [cache.allocate() for _ in range(3)] == [0, 1, 2]
    assert cache.usage().slots_used == 3
    cache.free(1)
    cache.free(0)
    assert cache.usage().slots_used == 1
    assert cache.allocate() == 0  # the lowest free slot, keeping busy slots packed
    assert cache.allocate() == 1


def test_running_out_of_slots() -> None:
    cache = small_cache(max_slots=2)
    cache.allocate()
    cache.allocate()
    with pytest.raises(CacheFullError, match="all 2 KV cache slots are in use"):
        cache.allocate()


def test_double_free_and_unknown_slot() -> None:
    cache = small_cache()
    slot = cache.allocate()
    cache.free(slot)
    with pytest.raises(ValueError, match="not allocated"):
        cache.free(slot)
    with pytest.raises(ValueError, match="not allocated"):
        cache.free(7)


def test_check_refuses_unallocated_slots_and_positions_out_of_range() -> None:
    cache = small_cache()
    slot = cache.allocate()
    cache.check([slot, slot], [0, 7])
    with pytest.raises(ValueError, match=r"slots \[2\] are not allocated"):
        cache.check([slot, 2], [0, 1])
    with pytest.raises(ValueError, match="max_seq_len|positions must lie"):
        cache.check([slot], [8])
    with pytest.raises(ValueError, match="positions must lie"):
        cache.check([slot], [-1])
