"""The preallocated key/value cache shared by every sequence the engine runs at once.

Memory is claimed once, up front: per layer, keys and values of shape
(max_slots, kv_heads, max_seq_len, head_dim). The decode loop then never allocates, and a cache too big
for the machine fails at startup rather than in the middle of a request. A sequence owns one slot from
admission until it finishes; the model writes its keys and values at (slot, position) and reads them back
by the same coordinates, so sequences of any length mix freely in one batch.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch


class CacheFullError(RuntimeError):
    """Every slot is taken; the engine should queue the sequence until another one finishes."""


@dataclass(frozen=True)
class CacheUsage:
    slots_used: int
    slots_total: int
    bytes_total: int  # keys and values of all layers, allocated whether used or not


class KVCache:
    def __init__(self, layers: int, max_slots: int, kv_heads: int, max_seq_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> None:
        if min(layers, max_slots, kv_heads, max_seq_len, head_dim) < 1:
            raise ValueError("every dimension of a KVCache must be at least 1")
        shape = (max_slots, kv_heads, max_seq_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.max_slots = max_slots
        self.max_seq_len = max_seq_len
        # A min-heap hands out the lowest free slot, which keeps busy slots packed at the front: a batch
        # over consecutive slots is read by the model as a view instead of a gathered copy.
        self._free = list(range(max_slots))
        self._used: set[int] = set()

    def allocate(self) -> int:
        """Claim a slot for a new sequence. Its old contents need no clearing: the model writes each
        position before any token reads it."""
        if not self._free:
            raise CacheFullError(f"all {self.max_slots} KV cache slots are in use: free a finished "
                                 f"sequence first, or build the cache with more max_slots")
        slot = heapq.heappop(self._free)
        self._used.add(slot)
        return slot

    def free(self, slot: int) -> None:
        if slot not in self._used:
            raise ValueError(f"KV cache slot {slot} is not allocated")
        self._used.remove(slot)
        heapq.heappush(self._free, slot)

    def check(self, slots: list[int], positions: list[int]) -> None:
        """Refuse writes the cache cannot hold, before any tensor is touched: a bad index would
        otherwise surface as an opaque indexing error, or silently overwrite another sequence."""
        stray = sorted(set(slots) - self._used)
        if stray:
            raise ValueError(f"KV cache slots {stray} are not allocated")
        if min(positions) < 0 or max(positions) >= self.max_seq_len:
            raise ValueError(f"positions must lie in [0, {self.max_seq_len}) for this KV cache, "
                             f"got {min(positions)}..{max(positions)}")

    def usage(self) -> CacheUsage:
        tensors = self.keys + self.values
        return CacheUsage(slots_used=len(self._used), slots_total=self.max_slots,
                          bytes_total=sum(t.numel() * t.element_size() for t in tensors))
