"""The soft trellis: BCJR posterior-mean reconstruction of tiles at temperature T, differentiable.

soft_reconstruct replaces each tile's hard Viterbi codeword by its expectation under the Boltzmann
measure P(path) ∝ exp(-|x - c(path)|^2 / T) over trellis paths. As T -> 0 it becomes the Viterbi
reconstruction; at finite T its gradient is (2/T) Cov_P(c_t, c_u) times the incoming gradient, which
couples every weight of a tile to its neighbours along the chain (the point of BCJR-QAT).

Boundaries.
- "free": uniform start and end states, the measure whose mode `trellis_runtime.viterbi.viterbi`
  finds without `overlap`.
- "tail_biting": the trellis is a circle (the last state's low L-KV bits are the first state's high
  bits), as in our checkpoints. The exact cyclic measure needs one constrained run per value of the
  L-KV shared bits (2^(L-KV) times the work). We use circular BCJR with a wrap-around warm-up
  instead: the tile is unrolled into a free chain [last W steps | tile | first W steps] and the
  marginals of the middle copy are reported. The forward messages thus enter step 0 having already
  run over the end of the tile, and the backward messages leave step N-1 having run over its start,
  which is what the circle imposes. Because this is an honest Boltzmann measure on the unrolled
  chain, the gradient below is its exact gradient (warm-up copies of a weight add their share).
  The error against the exact cyclic measure decays geometrically with W. The default W is a
  quarter of the tile (32 steps at V=2, ten times the state memory L/KV = 3 of L=12). On 256-weight
  tiles with L=6, KV=2 (the same memory) its largest error in any output weight, against the exact
  cyclic measure, is 2e-6 at T=1, 4e-5 at T=0.3 and 7e-4 at T=0.1, where free ends are off by 0.1
  to 1.4; tests/test_soft_trellis.py checks this (a transfer-matrix oracle, itself checked against
  enumeration of every circular bitstream). Cost: the forward runs N+W steps per direction, the
  backward N+2W (1.25x and 1.5x of free ends at V=2).

Memory stays bounded: tiles run in chunks (chunk_tiles, or chosen from a budget), the forward keeps
only the output, and the backward recomputes each chunk's messages (trellis_kernels/bcjr.py stores only
group-sized messages per step, never (tiles, steps, 2^L)). The per-chunk work runs in plain torch
(any device; the reference), in the fused Triton kernels (CUDA) or in the compiled C++ kernels
(trellis_kernels/bcjr_cpu.cpp, CPU), all three with one contract.
"""

from __future__ import annotations

import functools

import torch

from trellis_kernels import bcjr, bcjr_cpu
from trellis_runtime.backend_cpu import library_unavailable_reason
from trellis_runtime.trellis import TrellisSpec

BOUNDARIES = ("free", "tail_biting")
BACKENDS = ("auto", "torch", "triton", "cpp")
# Working set per chunk of the torch backend on CPU: one (tiles, 2^L) step buffer near the size
# that stays in L2 cache.
CPU_STEP_ELEMENTS = 1 << 18
# Tiles per call of the C++ kernels: they keep their own per-thread buffers whatever the chunk, so
# a chunk only bounds the messages torch holds around a call; large ones amortise the call.
CPP_CHUNK_TILES = 4096
# On a GPU the chunk is bounded by the stored group messages (two per step), two (tiles, 2^L) step
# buffers and the kernels' per-tile codebook gradient; bigger chunks keep more of the GPU busy.
CUDA_CHUNK_BYTES = 4 << 30


def warmup_steps(steps: int) -> int:
    """Wrap-around warm-up per side for tail-biting chains of `steps` steps (see module doc)."""
    return max(1, steps // 4)


def chunk_tiles_for(state_bits: int, step_bits: int, chain_steps: int,
                    device: torch.device, backend: str = "torch") -> int:
    """Tiles per chunk: a memory budget on CUDA, cache-sized step buffers for torch on CPU, and
    large calls for the C++ kernels (the choice is measured by benchmarks/bcjr_speed.py)."""
    states, groups = 1 << state_bits, 1 << (state_bits - step_bits)
    if device.type == "cuda":
        per_tile = (2 * chain_steps * groups + 4 * states) * 4
        return max(1, CUDA_CHUNK_BYTES // per_tile)
    if backend == "cpp":
        return CPP_CHUNK_TILES
    return max(1, CPU_STEP_ELEMENTS // states)


@functools.lru_cache(maxsize=None)
def cpp_unavailable_reason() -> str | None:
    """None when the C++ BCJR kernels are loaded in this process, else why not (logged once)."""
    return library_unavailable_reason(bcjr_cpu.load,
                                      "C++ BCJR kernels unavailable, the soft trellis runs in torch")


def _implementation(backend: str, x: torch.Tensor) -> str:
    """Which implementation runs: "auto" picks Triton on CUDA (float32), C++ on CPU when it loads,
    plain torch otherwise; "triton" forces the fused kernels (on CPU they run only under
    TRITON_INTERPRET=1, for tests) and "cpp" the C++ ones (CPU tensors)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if backend == "auto":
        if x.is_cuda:
            return "triton" if x.dtype == torch.float32 else "torch"
        return "cpp" if x.device.type == "cpu" and cpp_unavailable_reason() is None else "torch"
    if backend == "cpp":
        if x.device.type != "cpu":
            raise ValueError(f"backend 'cpp' runs on CPU tensors, not {x.device}")
        if cpp_unavailable_reason() is not None:
            raise ValueError(f"backend 'cpp' is unavailable: {cpp_unavailable_reason()}")
    return backend


FUNCTIONS = {  # implementation -> (forward, backward), one contract (trellis_kernels/bcjr.py)
    "torch": (bcjr.forward_reference, bcjr.backward_reference),
    "triton": (bcjr.forward_triton, bcjr.backward_triton),
    "cpp": (bcjr_cpu.forward, bcjr_cpu.backward),
}


class _Chains(torch.autograd.Function):
    """Posterior means of free chains, chunk by chunk, with the analytic backward."""

    @staticmethod
    def forward(ctx, chains: torch.Tensor, values: torch.Tensor, state_bits: int, step_bits: int,
                temperature: float, start: int, stop: int, chunk: int, implementation: str
                ) -> torch.Tensor:
        forward_fn = FUNCTIONS[implementation][0]
        out = chains.new_empty(chains.shape[0], stop - start, chains.shape[2])
        for i in range(0, chains.shape[0], chunk):
            out[i:i + chunk] = forward_fn(chains[i:i + chunk], values, state_bits, step_bits,
                                          temperature, start, stop)[0]
        ctx.save_for_backward(chains, values, out)
        ctx.args = (state_bits, step_bits, temperature, start, chunk, implementation)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        chains, values, out = ctx.saved_tensors
        state_bits, step_bits, temperature, start, chunk, implementation = ctx.args
        backward_fn = FUNCTIONS[implementation][1]
        values_grad = ctx.needs_input_grad[1]
        grad_out = grad_out.contiguous()
        dchains = torch.empty_like(chains)
        dvalues = torch.zeros_like(values) if values_grad else None
        for i in range(0, chains.shape[0], chunk):
            dx, dv = backward_fn(chains[i:i + chunk], values, out[i:i + chunk],
                                 grad_out[i:i + chunk], state_bits, step_bits, temperature,
                                 start, values_grad)
            dchains[i:i + chunk] = dx
            if dvalues is not None:
                dvalues += dv
        return dchains, dvalues, None, None, None, None, None, None, None


def _chains(seq: torch.Tensor, boundary: str, warmup: int | None
            ) -> tuple[torch.Tensor, int, int]:
    """The chains (tiles, chain steps, V) to run and the steps [start, stop) we report."""
    if boundary not in BOUNDARIES:
        raise ValueError(f"boundary must be one of {', '.join(BOUNDARIES)}, not {boundary!r}")
    steps = seq.shape[1]
    if boundary == "free":
        return seq, 0, steps
    w = warmup_steps(steps) if warmup is None else warmup
    if w < 1:
        raise ValueError(f"warmup must be at least 1 step, got {w}")
    order = torch.arange(-w, steps + w, device=seq.device) % steps
    return seq[:, order], w, w + steps


def _check_inputs(seq: torch.Tensor, values: torch.Tensor, state_bits: int, step_bits: int,
                  temperature: float, chunk_tiles: int | None) -> None:
    if seq.dim() != 3 or seq.shape[1] == 0:
        raise ValueError(f"observations must be (tiles, steps, V), got {tuple(seq.shape)}")
    if seq.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"x must be float32 (or float64 for checks), got {seq.dtype}")
    if not 0 < step_bits < state_bits:
        raise ValueError(f"need 0 < K*V < L, got K*V={step_bits} and L={state_bits}")
    if tuple(values.shape) != (1 << state_bits, seq.shape[2]):
        raise ValueError(f"values must be ({1 << state_bits}, {seq.shape[2]}), got "
                         f"{tuple(values.shape)}")
    if values.device != seq.device:
        raise ValueError(f"values on {values.device} but x on {seq.device}")
    if not float(temperature) > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if chunk_tiles is not None and chunk_tiles < 1:
        raise ValueError(f"chunk_tiles must be at least 1, got {chunk_tiles}")


def posterior_mean(seq: torch.Tensor, values: torch.Tensor, state_bits: int, step_bits: int,
                   temperature: float, boundary: str = "tail_biting",
                   chunk_tiles: int | None = None, *, backend: str = "auto",
                   warmup: int | None = None) -> torch.Tensor:
    """soft_reconstruct on bare trellis parameters: seq (tiles, steps, V) -> (tiles, steps, V).

    Any L > KV and any number of steps, so tests can reach trellises small enough to enumerate.
    """
    _check_inputs(seq, values, state_bits, step_bits, temperature, chunk_tiles)
    values = values.to(seq.dtype)
    implementation = _implementation(backend, seq)
    chains, start, stop = _chains(seq, boundary, warmup)
    if seq.shape[0] == 0:
        return seq.new_zeros(seq.shape) + 0 * values.sum()
    chunk = chunk_tiles or chunk_tiles_for(state_bits, step_bits, chains.shape[1], seq.device,
                                           implementation)
    return _Chains.apply(chains, values, state_bits, step_bits, float(temperature), start, stop,
                         chunk, implementation)


def _tile_steps(x: torch.Tensor, spec: TrellisSpec) -> torch.Tensor:
    if x.dim() != 2 or x.shape[1] % spec.vec or x.shape[1] == 0:
        raise ValueError(f"x must be (tiles, steps*V) with V={spec.vec}, got {tuple(x.shape)}")
    return x.reshape(x.shape[0], x.shape[1] // spec.vec, spec.vec)


def soft_reconstruct(x: torch.Tensor, values: torch.Tensor, spec: TrellisSpec, temperature: float,
                     boundary: str = "tail_biting", chunk_tiles: int | None = None, *,
                     backend: str = "auto", warmup: int | None = None) -> torch.Tensor:
    """Posterior-mean reconstruction (tiles, 256) of unit-scale tiles x (tiles, 256).

    values: (2^L, V) state values (`trellis_runtime.codes.state_values`). Differentiable w.r.t. x
    and values. boundary "free" or "tail_biting" (module doc); chunk_tiles bounds memory (chosen
    automatically when None); backend "auto" uses the Triton kernels on CUDA, the C++ kernels on
    CPU when they load, plain torch otherwise; warmup overrides the tail-biting warm-up length in
    steps. Computes in x's dtype (float32; float64 is accepted for numerical checks on the torch
    and C++ backends).
    """
    out = posterior_mean(_tile_steps(x, spec), values, spec.state_bits, spec.step_bits,
                         temperature, boundary, chunk_tiles, backend=backend, warmup=warmup)
    return out.reshape(x.shape)


def posterior_entropy(x: torch.Tensor, values: torch.Tensor, spec: TrellisSpec, temperature: float,
                      boundary: str = "tail_biting", chunk_tiles: int | None = None
                      ) -> torch.Tensor:
    """Mean marginal entropy per step (nats, a scalar): 0 when hard, L*ln 2 when uniform.

    A diagnostic for temperature schedules; no gradient.
    """
    seq = _tile_steps(x.detach(), spec)
    _check_inputs(seq, values, spec.state_bits, spec.step_bits, temperature, chunk_tiles)
    chains, start, stop = _chains(seq, boundary, None)
    values = values.detach().to(seq.dtype)
    chunk = chunk_tiles or chunk_tiles_for(spec.state_bits, spec.step_bits, chains.shape[1],
                                           x.device)
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    for i in range(0, chains.shape[0], chunk):
        _, ent = bcjr.forward_reference(chains[i:i + chunk], values, spec.state_bits,
                                        spec.step_bits, float(temperature), start, stop,
                                        entropy=True)
        total += ent.sum(dtype=torch.float64)
    return (total / max(1, chains.shape[0] * (stop - start))).to(x.dtype)
