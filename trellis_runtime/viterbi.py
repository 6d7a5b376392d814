"""Viterbi encoder: the minimum-squared-error path through the bitshift trellis, for many tiles at once.

The predecessors of state s are (j << (L-KV)) | (s >> KV) for j in 0..2^KV-1: all states sharing
their low L-KV bits ("a group") feed the same 2^KV successors. So each step takes one minimum per
group and broadcasts it to the group's successors: O(2^L) work per step instead of O(2^(L+KV)).

Memory layout. A state is an L-bit window sliding along the stream by KV bits per step. We index the
cost array by *where each stream bit lives*: stream bit k sits at position k mod L of the index
(position 0 = most significant). The bits shared by consecutive states then never move; each step
only drops and refills one KV-bit field of the index. So the minimum over predecessors is a
reduction over a middle dimension of a view, and the broadcast of group minima is an addition over
the same dimension: both are contiguous-friendly tensor ops. The state at step t is the index
rotated left by (t*KV mod L) bits.

Back-pointers are not stored. We keep each step's group minima and, when tracing back, recompute the
2^KV candidate costs of the one predecessor group on the path with the same float operations, so the
argmin is the one the forward pass implied. Branch costs drop the constant |x_t|^2, leaving
|c_s|^2 - 2<c_s, x_t>.

On CUDA `encode` runs the path searches in the Triton kernel (trellis_kernels/viterbi.py, several times
faster there), and on CPU in C++ (trellis_kernels/viterbi_cpu.py, many times faster: the figures are in
benchmarks/results/viterbi_speed.json) where that library builds; both return the same paths up to
near-ties. `viterbi` itself stays the torch reference that the kernels are tested and benchmarked
against. The `kernel` argument picks the search: False torch, True Triton, "cpu" C++.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch

from trellis_kernels import viterbi_cpu
from trellis_runtime.backend_cpu import library_unavailable_reason
from trellis_runtime.backend_triton import kernels_available
from trellis_runtime.trellis import TrellisSpec

# Stored group minima dominate memory: steps x tiles x groups floats. Chunks of tiles keep them under
# this budget, and the per-step working arrays (states x tiles) near a size that stays in cache.
HISTORY_BUDGET_BYTES = 256 << 20
STEP_BUDGET_ELEMENTS = 1 << 18
# A GPU wants as many tiles per step as memory allows: each step is a few kernel launches.
CUDA_HISTORY_BUDGET_BYTES = 4 << 30

Kernel = bool | Literal["cpu"]  # False: torch; True: the Triton kernel; "cpu": the C++ search


def chunk_size(spec: TrellisSpec, steps: int, device: torch.device | str = "cpu") -> int:
    per_tile = steps * spec.num_groups * 4
    if torch.device(device).type == "cuda":
        return max(1, CUDA_HISTORY_BUDGET_BYTES // per_tile)
    by_step = STEP_BUDGET_ELEMENTS // spec.num_states
    return max(1, min(HISTORY_BUDGET_BYTES // per_tile, by_step))


def rotate_left(index: torch.Tensor, amount: int, width: int) -> torch.Tensor:
    if amount == 0:
        return index
    return ((index << amount) | (index >> (width - amount))) & ((1 << width) - 1)


class _Layout:
    """Per-call constants: branch-cost tables permuted into each step's index layout.

    Cost arrays are (S, B): the batch of sequences is the innermost dimension, so every view
    below keeps a contiguous run of at least B elements, wherever the field sits in the index.
    """

    def __init__(self, values: torch.Tensor, spec: TrellisSpec, device: torch.device) -> None:
        self.spec = spec
        L, kv = spec.state_bits, spec.step_bits
        values = values.to(device=device, dtype=torch.float32)
        self.neg2v = (values * -2.0).t().contiguous()  # (V, S) in state order
        self.norms = values.pow(2).sum(-1)  # (S,) in state order
        index = torch.arange(spec.num_states, device=device)
        self.state_of_index: dict[int, torch.Tensor] = {}
        self.tables: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for phase in sorted({(t * kv) % L for t in range(L)}):
            states = rotate_left(index, phase, L)
            self.state_of_index[phase] = states
            self.tables[phase] = (self.norms[states].unsqueeze(1),
                                  self.neg2v[:, states].t().contiguous())

    def phase(self, t: int) -> int:
        return (t * self.spec.step_bits) % self.spec.state_bits

    def branch_costs(self, x_t: torch.Tensor, t: int, out: torch.Tensor) -> torch.Tensor:
        """|c|^2 - 2<c, x_t> for every index, (S, B) in step t's layout; x_t is (V, B)."""
        norms, neg2v = self.tables[self.phase(t)]
        return torch.addmm(norms, neg2v, x_t, out=out)

    def branch_costs_of(self, x_t: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """The same costs for given states (n, B) of each sequence (equal up to float rounding)."""
        cost = self.norms[states]
        for v in range(x_t.shape[0]):
            cost = cost + self.neg2v[v][states] * x_t[v:v + 1]
        return cost

    def field_view(self, t: int, batch: int
                   ) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """How to view an (S, B) cost of step t so the KV bits dropped at t+1 form reduced dims.

        Returns (cost view, reduced dims, view of the group minima as reduced, view of the minima
        for broadcasting back). The field starts at bit position phase(t) (0 = most significant);
        it wraps past the least significant end when L is not a multiple of KV.
        """
        L, kv = self.spec.state_bits, self.spec.step_bits
        r = self.phase(t)
        if r + kv <= L:
            high, low = 1 << r, 1 << (L - r - kv)
            return ((high, 1 << kv, low, batch), (1,), (high, low, batch), (high, 1, low, batch))
        wrapped, middle, low = 1 << (r + kv - L), 1 << (L - kv), 1 << (L - r)
        return ((wrapped, middle, low, batch), (0, 2), (middle, batch), (1, middle, 1, batch))

    def minima_index(self, states: torch.Tensor, t: int) -> torch.Tensor:
        """Where the group minima that fed states of step t+1 live, from step t's field."""
        L, kv = self.spec.state_bits, self.spec.step_bits
        r = self.phase(t)
        index = rotate_left(states, L - self.phase(t + 1), L)  # state -> index at step t+1
        if r + kv <= L:
            low = L - r - kv
            return ((index >> (L - r)) << low) | (index & ((1 << low) - 1))
        return (index >> (L - r)) & ((1 << (L - kv)) - 1)


def viterbi(x: torch.Tensor, values: torch.Tensor, spec: TrellisSpec,
            overlap: torch.Tensor | None = None, history: torch.Tensor | None = None,
            kernel: Kernel = False) -> torch.Tensor:
    """Best state path (B, T/V) int64 for sequences x (B, T) against state values (2^L, V).

    Without `overlap` the path's start and end are free. With `overlap` (B,) the path is forced to
    be tail-biting through those L-KV bits: the first state's top bits and the last state's low bits
    both equal it. Processes all B sequences at once; see `encode` for chunking. `history`, a
    reusable buffer of at least (T/V - 1) * 2^(L-KV) * B floats, saves re-allocating it per call.
    With `kernel` True the Triton kernel finds the paths instead, with "cpu" the C++ search (neither
    needs `history`). All break ties alike (the lowest last state, then the lowest predecessor), but
    a near-tie may fall either way by float rounding, as they sum their costs differently.
    """
    if kernel == "cpu":
        return viterbi_cpu.viterbi_paths(x.to(torch.float32), values.to(torch.float32),
                                         spec.state_bits, spec.bits, spec.vec, overlap=overlap)
    if kernel:
        from trellis_kernels.viterbi import viterbi_paths  # imports triton

        return viterbi_paths(x, values, spec.state_bits, spec.bits, spec.vec, overlap=overlap)
    B, T = x.shape
    kv, L = spec.step_bits, spec.state_bits
    steps, groups, fan = T // spec.vec, spec.num_groups, 1 << kv
    xs = x.reshape(B, steps, spec.vec).to(torch.float32).permute(1, 2, 0).contiguous()  # (T/V, V, B)
    layout = _Layout(values, spec, x.device)
    inf = float("inf")
    columns = torch.arange(B, device=x.device)

    start_penalty = None
    cost = layout.branch_costs(xs[0], 0, torch.empty(spec.num_states, B, device=x.device))
    if overlap is not None:
        allowed = (torch.arange(spec.num_states, device=x.device) >> kv).unsqueeze(1) == overlap
        start_penalty = torch.zeros(spec.num_states, B, device=x.device).masked_fill_(~allowed, inf)
        cost += start_penalty
    size = max(steps - 1, 0) * groups * B
    if history is None or history.numel() < size:
        history = torch.empty(size, device=x.device)
    minima = history[:size].view(max(steps - 1, 0), groups, B)
    for t in range(steps - 1):
        view, dims, reduced, broadcast = layout.field_view(t, B)
        torch.amin(cost.view(view), dim=dims, out=minima[t].view(reduced))
        layout.branch_costs(xs[t + 1], t + 1, out=cost)
        cost.view(view).add_(minima[t].view(broadcast))

    last_states = layout.state_of_index[layout.phase(steps - 1)]
    if overlap is not None:
        cost.masked_fill_((last_states & (groups - 1)).unsqueeze(1) != overlap, inf)
    path = torch.empty(steps, B, dtype=torch.int64, device=x.device)
    # Rows in state order: of equal final costs the lowest state wins (the kernel's rule), not the
    # first one in this step's rotated layout.
    state = cost[last_states.argsort()].argmin(dim=0)
    path[-1] = state
    top = (torch.arange(fan, device=x.device) << (L - kv)).unsqueeze(1)
    for t in range(steps - 1, 0, -1):
        candidates = top | (state >> kv)  # (fan, B): the predecessors at step t-1
        cost = layout.branch_costs_of(xs[t - 1], candidates)
        if t >= 2:
            cost += minima[t - 2][layout.minima_index(candidates, t - 2), columns]
        elif start_penalty is not None:
            cost += start_penalty[candidates, columns]
        state = candidates[torch.min(cost, dim=0).indices, columns]
        path[t - 1] = state
    return path.t().contiguous()


def tail_biting_viterbi(x: torch.Tensor, values: torch.Tensor, spec: TrellisSpec,
                        history: torch.Tensor | None = None, kernel: Kernel = False
                        ) -> torch.Tensor:
    """QTIP's two-pass tail-biting: guess the wrap-around bits, then encode under that constraint.

    Pass 1 encodes the sequence rotated by half its length with free ends; the middle of a path is
    insensitive to its boundaries, so the state it picks at the seam (original step 0) gives a good
    guess of the L-KV bits shared by the last and first states. Pass 2 is exact given that guess.
    Both passes run in the Triton kernel when `kernel` is True, in one C++ call when it is "cpu"
    (see `viterbi`).
    """
    if kernel == "cpu":
        return viterbi_cpu.tail_biting_paths(x.to(torch.float32), values.to(torch.float32),
                                             spec.state_bits, spec.bits, spec.vec)
    B, T = x.shape
    steps = T // spec.vec
    half = steps // 2
    rotated = torch.roll(x.reshape(B, steps, spec.vec), shifts=-half, dims=1).reshape(B, T)
    seam_state = viterbi(rotated, values, spec, history=history, kernel=kernel)[:, steps - half]
    return viterbi(x, values, spec, overlap=seam_state >> spec.step_bits, history=history,
                   kernel=kernel)


def exact_tail_biting_viterbi(x: torch.Tensor, values: torch.Tensor, spec: TrellisSpec
                              ) -> torch.Tensor:
    """The optimal tail-biting path: the best of one constrained run per overlap value.

    2^(L-KV) times the work of `tail_biting_viterbi`; used to measure that approximation.
    """
    B = x.shape[0]
    best_cost = torch.full((B,), float("inf"), device=x.device)
    best_path = torch.zeros(B, x.shape[1] // spec.vec, dtype=torch.int64, device=x.device)
    for bits in range(spec.num_groups):
        overlap = torch.full((B,), bits, dtype=torch.int64, device=x.device)
        path = viterbi(x, values, spec, overlap=overlap)
        cost = path_error(x, path, values)
        better = cost < best_cost
        best_cost = torch.where(better, cost, best_cost)
        best_path = torch.where(better.unsqueeze(1), path, best_path)
    return best_path


def path_error(x: torch.Tensor, path: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Sum of squared errors (B,) of reconstructing x (B, T) by the states in path (B, T/V)."""
    recon = values.to(device=x.device, dtype=torch.float32)[path].reshape(x.shape)
    return (recon - x).pow(2).sum(dim=1)


def kernel_encodes(spec: TrellisSpec, device: torch.device, triton_available: bool) -> bool:
    """Whether `encode` runs the Triton kernel: only on CUDA, where it pays (on CPU Triton has only
    its interpreter), with Triton installed, and for a spec within the kernel's limits."""
    if device.type != "cuda" or not triton_available:
        return False
    from trellis_kernels.viterbi import supports  # imports triton

    return supports(spec.state_bits, spec.step_bits)


@functools.lru_cache(maxsize=None)
def cpu_search_unavailable_reason() -> str | None:
    """None when the C++ search is loaded in this process, else why not (logged once)."""
    return library_unavailable_reason(viterbi_cpu.load, "C++ Viterbi unavailable, encoding in torch")


def default_kernel(spec: TrellisSpec, device: torch.device) -> Kernel:
    """The search `encode` runs unless told: Triton where `kernel_encodes`, C++ for CPU tensors where
    its library loads and takes the spec, else torch."""
    if kernel_encodes(spec, device, kernels_available()):
        return True
    if device.type == "cpu" and viterbi_cpu.supports(spec.state_bits, spec.step_bits, spec.vec) \
            and cpu_search_unavailable_reason() is None:
        return "cpu"
    return False


def encode(x: torch.Tensor, values: torch.Tensor, spec: TrellisSpec,
           kernel: Kernel | None = None) -> torch.Tensor:
    """Tail-biting paths (B, T/V) for sequences x (B, T), in memory-bounded chunks.

    `kernel` picks the search as in `viterbi`; None leaves it to `default_kernel`.
    """
    if kernel is None:
        kernel = default_kernel(spec, x.device)
    steps = x.shape[1] // spec.vec
    # The torch path's chunks bound the kernels too: per tile the Triton kernel stores one byte per
    # group and step where the history holds a float, and its two 2^L cost arrays replace the torch
    # path's cost and start penalty; the C++ search holds one tile per thread.
    size = chunk_size(spec, steps, x.device)
    values = values.to(x.device)
    history = None if kernel is not False else torch.empty(
        (steps - 1) * spec.num_groups * min(size, x.shape[0]), device=x.device)
    parts = [tail_biting_viterbi(x[i:i + size], values, spec, history, kernel)
             for i in range(0, x.shape[0], size)]
    if not parts:
        return torch.empty(0, steps, dtype=torch.int64, device=x.device)
    return torch.cat(parts)
