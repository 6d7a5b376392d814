"""Attention over the KV cache for one forward's flat tokens ("varlen", as in nano-vllm).

The N tokens of a forward are a flat list, each naming its KV cache slot and its absolute position, so an
engine can put prefills of new requests and decode steps of running ones in a single call. The
`AttentionLayout` maps them onto the padded (sequences, tokens) grid attention runs on, with one mask
per attention window the model uses (full, or the last W positions of a sliding-window layer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trellis_runtime.kv_cache import KVCache
from trellis_runtime.rope import apply_rotary


def additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where visible, -inf elsewhere: in the cache's dtype, so attention does not convert a
    boolean mask in every layer."""
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(
        ~visible, float("-inf"))


def window_visibility(positions: torch.Tensor, key_length: int, window: int | None) -> torch.Tensor:
    """(N, key_length): a token sees every cached position of its own sequence up to and including
    its own, and within a sliding window only the last `window` of them."""
    keys = torch.arange(key_length, device=positions.device)
    visible = keys <= positions[:, None]
    if window is not None:
        visible &= keys > positions[:, None] - window
    return visible


@dataclass
class AttentionLayout:
    """How one forward's flat tokens map onto the padded (sequences, tokens) grid attention runs on.

    Built once per forward and shared by every layer. Sequences are numbered in order of first appearance,
    so in the two common cases the grid is a plain view of the flat tokens: a decode step (one token per
    sequence) and a prefill (one sequence). Mixed batches scatter tokens into the grid instead.

    The bookkeeping runs on the host over python lists, which an engine has anyway (it assembles its
    batch as lists): planning from them never reads a device tensor back, which on CUDA would wait for
    the device at every step.
    """

    sequences: int
    tokens_per_sequence: int  # the grid's width, the longest sequence in this forward
    key_length: int  # cache positions read: the largest position + 1
    cache_rows: slice | torch.Tensor  # the sequences' slots: a slice (a view) when consecutive
    # by attention window (None: full): additive (sequences, 1, tokens_per_sequence * group, key_length)
    masks: dict[int | None, torch.Tensor]
    sequence_of_token: torch.Tensor | None  # (N,) grid coordinates for mixed batches, else None
    row_of_token: torch.Tensor | None
    # Padded decode batches (CUDA-graph buckets) repeat a slot in their padding rows and rely on
    # the mask, so the fused CPU decode kernel, which takes one token per sequence, cannot run them.
    padded: bool = False
    # Decode steps whose attention reads each sequence's cache rows in place (the Triton kernel,
    # trellis_kernels/attention.py) instead of gathering the context bucket; masks then go unused.
    in_place: bool = False

    @classmethod
    def plan(cls, position_list: list[int], slot_list: list[int], positions: torch.Tensor,
             cache: KVCache, group: int, windows: frozenset[int | None] = frozenset({None})
             ) -> "AttentionLayout":
        """The layout of a forward whose token i is at position_list[i] of the sequence in slot_list[i].

        positions: the same positions as the forward's (N,) tensor; masks are computed from it on its
        device, and index tensors are made there. group: query heads per kv head. windows: the
        attention windows of the model's layers.
        """
        cache.check(slot_list, position_list)
        sequence_of_slot: dict[int, int] = {}
        sequence_of_token, row_of_token, lengths = [], [], []
        for slot in slot_list:
            sequence = sequence_of_slot.setdefault(slot, len(sequence_of_slot))
            if sequence == len(lengths):
                lengths.append(0)
            sequence_of_token.append(sequence)
            row_of_token.append(lengths[sequence])
            lengths[sequence] += 1
        sequences, width = len(lengths), max(lengths)
        key_length = max(position_list) + 1

        first = slot_list[0]
        consecutive = list(sequence_of_slot) == list(range(first, first + sequences))
        rows = (slice(first, first + sequences) if consecutive
                else torch.tensor(list(sequence_of_slot), device=positions.device))
        scatter = None
        if sequences > 1 and width > 1:  # else the flat tokens, viewed, already are the grid
            scatter = (torch.tensor(sequence_of_token, device=positions.device),
                       torch.tensor(row_of_token, device=positions.device))

        def grid_mask(window: int | None) -> torch.Tensor:
            visible = window_visibility(positions, key_length, window)
            if scatter is None:
                grid = visible.view(sequences, width, key_length)
            else:  # padding rows see everything so their softmax stays finite; their output is dropped
                grid = visible.new_ones(sequences, width, key_length)
                grid[scatter] = visible
            grid = grid[:, None, :, None, :].expand(sequences, 1, width, group, key_length)
            return additive_mask(grid.reshape(sequences, 1, width * group, key_length),
                                 cache.keys[0].dtype)

        return cls(sequences=sequences, tokens_per_sequence=width, key_length=key_length,
                   cache_rows=rows, masks={window: grid_mask(window) for window in windows},
                   sequence_of_token=None if scatter is None else scatter[0],
                   row_of_token=None if scatter is None else scatter[1])

    @classmethod
    def padded_decode(cls, positions: torch.Tensor, slots: torch.Tensor, context: int, group: int,
                      windows: frozenset[int | None], dtype: torch.dtype,
                      in_place: bool = False) -> "AttentionLayout":
        """A decode step (one token per sequence, any slots, padding rows allowed) attending to the
        first `context` cache positions, built on the device from tensors alone (CUDA graphs).
        in_place: attention reads the cache where it lies, up to each sequence's own position."""
        batch = positions.shape[0]
        masks = {} if in_place else {
            window: additive_mask(window_visibility(positions, context, window)[:, None, None, :]
                                  .expand(batch, 1, group, context), dtype)
            for window in windows}
        return cls(sequences=batch, tokens_per_sequence=1, key_length=context, cache_rows=slots,
                   masks=masks, sequence_of_token=None, row_of_token=None, padded=True,
                   in_place=in_place)

    def to_grid(self, x: torch.Tensor) -> torch.Tensor:
        """(N, ...) -> (sequences, tokens_per_sequence, ...)."""
        if self.sequence_of_token is None:
            return x.view(self.sequences, self.tokens_per_sequence, *x.shape[1:])
        grid = x.new_zeros(self.sequences, self.tokens_per_sequence, *x.shape[1:])
        grid[self.sequence_of_token, self.row_of_token] = x
        return grid

    def from_grid(self, grid: torch.Tensor) -> torch.Tensor:
        """(sequences, tokens_per_sequence, ...) -> (N, ...)."""
        if self.sequence_of_token is None:
            return grid.reshape(-1, *grid.shape[2:])
        return grid[self.sequence_of_token, self.row_of_token]


@dataclass(frozen=True)
class AttentionSpec:
    """What one layer's attention computes besides Llama's (ModelShape.llama_layer says when all of
    it is at Llama's values, which the fused CPU decode kernel also computes)."""

    heads: int
    kv_heads: int
    head_dim: int
    scale: float  # multiplies q.k before the softmax
    softcap: float | None = None  # scores become softcap * tanh(scores / softcap)
    window: int | None = None  # attend to the last `window` positions only


class Attention(nn.Module):
    def __init__(self, spec: AttentionSpec, o_proj: nn.Module, q_proj: nn.Module | None = None,
                 k_proj: nn.Module | None = None, v_proj: nn.Module | None = None,
                 qkv_proj: nn.Module | None = None, q_norm: nn.Module | None = None,
                 k_norm: nn.Module | None = None, fused_decode: bool = False) -> None:
        """Either q/k/v_proj or one fused qkv_proj (rows: queries, then keys, then values): each a
        TrellisLinear, or a float nn.Linear where the quantizer runs the float model.
        q_norm, k_norm: per-head norms applied before the rotation (Qwen3, Gemma 3).
        fused_decode: decode steps (one token per sequence) run rotary, the cache write and
        attention as one CPU kernel call instead of ~20 small ops (CPU float32, plain Llama only)."""
        super().__init__()
        self.spec = spec
        self.q_proj, self.k_proj, self.v_proj, self.qkv_proj = q_proj, k_proj, v_proj, qkv_proj
        self.o_proj, self.q_norm, self.k_norm = o_proj, q_norm, k_norm
        self.group = spec.heads // spec.kv_heads
        self.fused_decode = fused_decode
        self.split = (spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim,
                      spec.kv_heads * spec.head_dim)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.qkv_proj is not None:
            return self.qkv_proj(x).split(self.split, dim=-1)
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], layout: AttentionLayout,
                slots: torch.Tensor, positions: torch.Tensor, cached_keys: torch.Tensor,
                cached_values: torch.Tensor) -> torch.Tensor:
        n, spec = x.shape[0], self.spec
        if self.fused_decode and layout.tokens_per_sequence == 1 and not layout.padded:
            out = torch.ops.trellis_cpu.decode_attention(
                *self.project(x), *rope, cached_keys, cached_values, slots, positions)
            return self.o_proj(out)
        q, k, v = self.project(x)
        q, k = q.view(n, spec.heads, spec.head_dim), k.view(n, spec.kv_heads, spec.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        # Write first, then read: a prefill's tokens see each other through the cache.
        cached_keys[slots, :, positions] = k
        cached_values[slots, :, positions] = v.view(n, spec.kv_heads, spec.head_dim)
        if layout.in_place:
            from trellis_kernels.attention import decode_attention

            grouped = q.reshape(n, spec.kv_heads, self.group, spec.head_dim)
            out = decode_attention(grouped, cached_keys, cached_values, slots, positions,
                                   spec.scale, spec.window, spec.softcap)
            return self.o_proj(out.reshape(n, spec.heads * spec.head_dim))
        keys = cached_keys[layout.cache_rows, :, :layout.key_length]
        values = cached_values[layout.cache_rows, :, :layout.key_length]

        # Grouped-query attention without copying keys: the `group` query heads sharing a kv head are
        # laid out as extra query rows of that kv head, (sequences, kv_heads, tokens * group, head_dim).
        grid = layout.to_grid(q.reshape(n, spec.kv_heads, self.group, spec.head_dim))
        s, t = grid.shape[:2]
        queries = grid.permute(0, 2, 1, 3, 4).reshape(s, spec.kv_heads, t * self.group, spec.head_dim)
        mask = layout.masks[spec.window]
        if spec.softcap is None:
            out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=spec.scale)
        else:
            out = softcapped_attention(queries, keys, values, mask, spec.scale, spec.softcap)
        out = out.view(s, spec.kv_heads, t, self.group, spec.head_dim).permute(0, 2, 1, 3, 4)
        return self.o_proj(layout.from_grid(out).reshape(n, spec.heads * spec.head_dim))


def softcapped_attention(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                         mask: torch.Tensor, scale: float, softcap: float) -> torch.Tensor:
    """Attention whose scores pass through softcap * tanh(scores / softcap) before the mask (Gemma 2),
    which the fused SDPA kernels cannot express; the softmax runs in float32, as transformers does."""
    scores = torch.matmul(queries, keys.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap + mask
    return torch.matmul(scores.softmax(dim=-1, dtype=torch.float32).to(values.dtype), values)
