"""Decode attention read in place from the KV cache: one new token per sequence, any cache slots.

A decode step's queries (batch, kv_heads, group, head_dim) attend to their own sequence's cached
keys and values, (slots, kv_heads, positions, head_dim) per layer, at the slot and up to the
position each sequence gives. Gathering those rows into a contiguous (batch, ..., context) copy
first, as indexing the cache does, writes and reads the whole context bucket once more per layer
and step: about 0.5 GB a token at a 4,096-token bucket of an 8B model. This kernel reads each
sequence's rows where they lie, and only the positions up to its own: one program per (sequence,
kv head) holds the `group` query heads that share the kv head and runs an online softmax over
blocks of keys (flash-decoding without the split, which a decode step's few programs would need
only at long contexts).

Optional, as the model's layers ask: a sliding window (only the last `window` positions) and
Gemma 2's soft-capping of the scores. The torch reference is trellis_runtime.attention's masked
scaled_dot_product_attention over the gathered rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from trellis_kernels.launch import Launch

MAX_BLOCK_KEYS = 64  # cached positions per iteration
# The scores and the weighted values are formed as (query heads, keys, head_dim) products in
# registers: at most this many float32 elements for the 128 threads of a program, so they fit
# without spilling (a group of 4 heads of 128 takes 16 keys an iteration).
MAX_PRODUCT_ELEMENTS = 8192


@triton.jit
def _decode_attention_kernel(q_ptr, keys_ptr, values_ptr, out_ptr, slots_ptr, positions_ptr,
                             slot_stride, head_stride, position_stride, scale, softcap, window,
                             KV_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                             BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                             SOFTCAP: tl.constexpr, WINDOWED: tl.constexpr):
    sequence = tl.program_id(0)
    head = tl.program_id(1)
    slot = tl.load(slots_ptr + sequence).to(tl.int64)
    position = tl.load(positions_ptr + sequence).to(tl.int32)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    q_rows = (sequence * KV_HEADS + head) * GROUP + g
    q_mask = (g[:, None] < GROUP) & (d[None, :] < HEAD_DIM)
    q = tl.load(q_ptr + q_rows[:, None] * HEAD_DIM + d[None, :], mask=q_mask, other=0.0)
    q = q.to(tl.float32) * scale
    base = slot * slot_stride + head.to(tl.int64) * head_stride
    first = 0
    if WINDOWED:
        first = tl.maximum(position - window + 1, 0)
    best = tl.full((BLOCK_G,), -1e30, tl.float32)  # running max of the scores (finite: no inf - inf)
    total = tl.zeros((BLOCK_G,), tl.float32)  # running sum of exp(score - best)
    acc = tl.zeros((BLOCK_G, BLOCK_D), tl.float32)
    for start in range((first // BLOCK_N) * BLOCK_N, position + 1, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        visible = (n >= first) & (n <= position)
        offsets = base + n[:, None].to(tl.int64) * position_stride + d[None, :]
        kv_mask = visible[:, None] & (d[None, :] < HEAD_DIM)
        keys = tl.load(keys_ptr + offsets, mask=kv_mask, other=0.0).to(tl.float32)
        scores = tl.sum(q[:, None, :] * keys[None, :, :], axis=2)  # (BLOCK_G, BLOCK_N)
        if SOFTCAP:  # softcap * tanh(scores / softcap), tanh written with exp
            scores = softcap * (1.0 - 2.0 / (tl.exp(2.0 * scores / softcap) + 1.0))
        scores = tl.where(visible[None, :], scores, -1e30)
        new_best = tl.maximum(best, tl.max(scores, axis=1))
        weights = tl.exp(scores - new_best[:, None])
        weights = tl.where(visible[None, :], weights, 0.0)
        correction = tl.exp(best - new_best)
        values = tl.load(values_ptr + offsets, mask=kv_mask, other=0.0).to(tl.float32)
        total = total * correction + tl.sum(weights, axis=1)
        acc = acc * correction[:, None] + tl.sum(weights[:, :, None] * values[None, :, :], axis=1)
        best = new_best
    out = acc / total[:, None]
    tl.store(out_ptr + q_rows[:, None] * HEAD_DIM + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=q_mask)


def decode_attention_launch(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                            slots: torch.Tensor, positions: torch.Tensor, out: torch.Tensor,
                            scale: float, window: int | None = None,
                            softcap: float | None = None) -> Launch:
    batch, kv_heads, group, head_dim = queries.shape
    block_g, block_d = max(triton.next_power_of_2(group), 2), triton.next_power_of_2(head_dim)
    block_n = min(MAX_BLOCK_KEYS, max(8, MAX_PRODUCT_ELEMENTS // (block_g * block_d)))
    return Launch(
        _decode_attention_kernel, (batch, kv_heads),
        (queries, keys, values, out, slots, positions, keys.stride(0), keys.stride(1),
         keys.stride(2), scale, softcap or 1.0, window or 1),
        dict(KV_HEADS=kv_heads, GROUP=group, HEAD_DIM=head_dim, BLOCK_G=block_g, BLOCK_D=block_d,
             BLOCK_N=block_n, SOFTCAP=softcap is not None, WINDOWED=window is not None),
        dict(num_warps=4, num_stages=2))


def decode_attention(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     slots: torch.Tensor, positions: torch.Tensor, scale: float,
                     window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """Attention of one new token per sequence over its cached keys and values, read in place.

    queries: (batch, kv_heads, group, head_dim), the query heads grouped by the kv head they share.
    keys, values: one layer's cache, (slots, kv_heads, max_positions, head_dim), equal strides.
    slots, positions: (batch,) integer tensors: sequence i attends to positions 0..positions[i]
    (the last `window` of them where a window is given) of slot slots[i]; they stay on the device.
    Returns (batch, kv_heads, group, head_dim) in the queries' dtype.
    """
    if queries.dim() != 4 or keys.dim() != 4 or keys.shape != values.shape:
        raise ValueError(f"decode attention takes (batch, kv_heads, group, head_dim) queries and "
                         f"equal (slots, kv_heads, positions, head_dim) caches, got "
                         f"{tuple(queries.shape)}, {tuple(keys.shape)} and {tuple(values.shape)}")
    if keys.stride() != values.stride() or keys.stride(3) != 1:
        raise ValueError("decode attention needs keys and values with equal strides, head_dim "
                         "contiguous")
    if queries.shape[1] != keys.shape[1] or queries.shape[3] != keys.shape[3]:
        raise ValueError(f"queries {tuple(queries.shape)} do not match the cache's kv heads and "
                         f"head_dim {tuple(keys.shape)}")
    queries = queries.contiguous()
    out = torch.empty_like(queries)
    decode_attention_launch(queries, keys, values, slots, positions, out, scale, window,
                            softcap).run()
    return out
