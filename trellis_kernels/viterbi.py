"""Viterbi on the bitshift trellis for many sequences at once: the encoder's inner loop on a GPU.

State s has L bits and step t moves to ((s << KV) | c) mod 2^L, so the predecessors of s' are
j*G + (s' >> KV) for j < F, with F = 2^KV and G = 2^(L-KV): the F successors h*F .. h*F+F-1 of a
"group" h share the same F predecessors. One launch per step does, for every group h and sequence:

    m[h] = min_j cost[j*G + h]          (and remembers the best j, one byte)
    cost'[h*F + c] = |v[h*F + c] - x_t|^2 + m[h]

so the cost array (2^L x sequences, float32, sequences innermost for coalescing) is read once and
written once per step, and the back-pointers cost one byte per group and step. A second kernel walks
the back-pointers from the best final state. Costs are full squared errors, so a path's cost is its
error.

The torch reference is trellis_runtime.viterbi.viterbi (same arguments, with the spec's integers in
place of the spec): both return minimum-error paths, free-ended or tail-biting through a given
overlap of L-KV bits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_STATE_BITS = 16
MAX_FAN_BITS = 8  # back-pointers are stored as uint8


@triton.jit
def _branch_cost(values_ptr, state, x_ptr, step, batch, batch_ok, batch_stride, VEC: tl.constexpr):
    """|values[state] - x_step|^2 for states (H,) x sequences (BLOCK_B,)."""
    cost = tl.zeros((state.shape[0], batch.shape[0]), tl.float32)
    for v in tl.static_range(VEC):
        value = tl.load(values_ptr + state * VEC + v)[:, None]
        x = tl.load(x_ptr + (step * VEC + v) * batch_stride + batch, mask=batch_ok, other=0.0)
        diff = value - x[None, :]
        cost += diff * diff
    return cost


@triton.jit
def _start_kernel(values_ptr, x_ptr, overlap_ptr, cost_ptr, batch_size, batch_stride,
                  STATE_BITS: tl.constexpr, FAN_BITS: tl.constexpr, VEC: tl.constexpr,
                  CONSTRAINED: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_B: tl.constexpr):
    batch_stride = batch_stride.to(tl.int64)
    state = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    batch = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    batch_ok = batch < batch_size
    cost = _branch_cost(values_ptr, state, x_ptr, 0, batch, batch_ok, batch_stride, VEC)
    if CONSTRAINED:  # the first state's top L-KV bits are the overlap
        overlap = tl.load(overlap_ptr + batch, mask=batch_ok, other=0)
        cost = tl.where((state >> FAN_BITS)[:, None] == overlap[None, :], cost, float("inf"))
    tl.store(cost_ptr + state[:, None] * batch_stride + batch[None, :], cost,
             mask=batch_ok[None, :])


@triton.jit
def _step_kernel(values_ptr, x_ptr, cost_ptr, next_ptr, back_ptr, step, batch_size, batch_stride,
                 STATE_BITS: tl.constexpr, FAN_BITS: tl.constexpr, VEC: tl.constexpr,
                 BLOCK_H: tl.constexpr, BLOCK_B: tl.constexpr):
    GROUPS: tl.constexpr = 1 << (STATE_BITS - FAN_BITS)
    FAN: tl.constexpr = 1 << FAN_BITS
    batch_stride = batch_stride.to(tl.int64)  # back-pointer offsets reach steps * 2^L * batch
    group = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    batch = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    batch_ok = batch < batch_size
    mask = batch_ok[None, :]
    offsets = group[:, None] * batch_stride + batch[None, :]
    best = tl.load(cost_ptr + offsets, mask=mask, other=0.0)
    best_j = tl.zeros((BLOCK_H, BLOCK_B), tl.int32)
    for j in range(1, FAN):  # predecessors j*G + h; strict < keeps the first of equal costs
        cost = tl.load(cost_ptr + j * GROUPS * batch_stride + offsets, mask=mask, other=0.0)
        better = cost < best
        best = tl.where(better, cost, best)
        best_j = tl.where(better, j, best_j)
    tl.store(back_ptr + (step - 1) * GROUPS * batch_stride + offsets, best_j.to(tl.uint8),
             mask=mask)
    for c in range(FAN):  # successors h*F + c
        state = group * FAN + c
        cost = _branch_cost(values_ptr, state, x_ptr, step, batch, batch_ok, batch_stride, VEC)
        tl.store(next_ptr + state[:, None] * batch_stride + batch[None, :], cost + best,
                 mask=mask)


@triton.jit
def _trace_kernel(back_ptr, last_ptr, path_ptr, steps, batch_size, batch_stride,
                  STATE_BITS: tl.constexpr, FAN_BITS: tl.constexpr, BLOCK_B: tl.constexpr):
    GROUPS: tl.constexpr = 1 << (STATE_BITS - FAN_BITS)
    batch_stride = batch_stride.to(tl.int64)
    batch = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    ok = batch < batch_size
    state = tl.load(last_ptr + batch, mask=ok, other=0)
    tl.store(path_ptr + batch * steps + steps - 1, state, mask=ok)
    for i in range(steps - 1):  # back-pointers of step t+1 name the state at step t
        t = steps - 2 - i
        group = state >> FAN_BITS
        j = tl.load(back_ptr + (t * GROUPS + group) * batch_stride + batch, mask=ok, other=0)
        state = j.to(tl.int64) * GROUPS + group
        tl.store(path_ptr + batch * steps + t, state, mask=ok)


def supports(state_bits: int, step_bits: int) -> bool:
    """Whether the kernel runs a trellis of L state bits and K*V step bits: callers with a fallback
    ask this instead of catching viterbi_paths' ValueError."""
    return 1 <= step_bits < state_bits <= MAX_STATE_BITS and step_bits <= MAX_FAN_BITS


def viterbi_paths(x: torch.Tensor, values: torch.Tensor, state_bits: int, bits: int, vec: int,
                  overlap: torch.Tensor | None = None, block_b: int = 32) -> torch.Tensor:
    """Minimum-error state paths (B, T/V) int64 for sequences x (B, T) and state values (2^L, V).

    Without `overlap` the path's ends are free; with overlap (B,) it is tail-biting through those
    L-KV bits (first state's top bits and last state's low bits). Memory: two cost arrays of
    2^L x B float32 and (T/V - 1) x 2^(L-KV) x B bytes of back-pointers.
    """
    L, kv = state_bits, bits * vec
    if not supports(L, kv):
        raise ValueError(f"viterbi kernel: need 1 <= K*V < L <= {MAX_STATE_BITS} and K*V <= "
                         f"{MAX_FAN_BITS}, got L={L} K={bits} V={vec}")
    if values.shape != (1 << L, vec):
        raise ValueError(f"viterbi kernel: values must be ({1 << L}, {vec}), got "
                         f"{tuple(values.shape)}")
    if x.dim() != 2 or x.shape[1] % vec or x.shape[1] < vec:
        raise ValueError(f"viterbi kernel: x must be (B, T) with T a positive multiple of V={vec}")
    batch, steps = x.shape[0], x.shape[1] // vec
    device = x.device
    groups, states = 1 << (L - kv), 1 << L
    xs = x.to(torch.float32).t().contiguous()  # (T, B): step t, slot v at row t*V + v
    values = values.to(device=device, dtype=torch.float32).contiguous()
    constrained = overlap is not None
    if constrained:
        overlap = overlap.to(device=device, dtype=torch.int64).contiguous()
        if overlap.shape != (batch,):
            raise ValueError(f"viterbi kernel: overlap must be ({batch},)")
    cost = torch.empty(states, batch, dtype=torch.float32, device=device)
    following = torch.empty_like(cost)
    back = torch.empty(max(steps - 1, 1), groups, batch, dtype=torch.uint8, device=device)
    path = torch.empty(batch, steps, dtype=torch.int64, device=device)
    if batch == 0:
        return path
    block_s = min(states, 128)
    block_h = min(groups, 64)
    _start_kernel[(states // block_s, triton.cdiv(batch, block_b))](
        values, xs, overlap if constrained else xs, cost, batch, batch,
        STATE_BITS=L, FAN_BITS=kv, VEC=vec, CONSTRAINED=constrained, BLOCK_S=block_s,
        BLOCK_B=block_b)
    step_grid = (groups // block_h, triton.cdiv(batch, block_b))
    for t in range(1, steps):
        _step_kernel[step_grid](values, xs, cost, following, back, t, batch, batch,
                                STATE_BITS=L, FAN_BITS=kv, VEC=vec, BLOCK_H=block_h,
                                BLOCK_B=block_b)
        cost, following = following, cost
    if constrained:  # the last state's low L-KV bits are the overlap (in place: no third array)
        low = torch.arange(states, device=device) & (groups - 1)
        cost.masked_fill_(low[:, None] != overlap[None, :], float("inf"))
    last = cost.argmin(dim=0)
    _trace_kernel[(triton.cdiv(batch, block_b),)](back, last, path, steps, batch, batch,
                                                  STATE_BITS=L, FAN_BITS=kv, BLOCK_B=block_b)
    return path
