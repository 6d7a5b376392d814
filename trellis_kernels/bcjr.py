"""BCJR on the bitshift trellis: posterior-mean reconstruction and its analytic gradient, per chunk.

Pure functions over tensors and integers (this package imports nothing of the project). A chain is
x (B, N, V): B independent sequences of N steps of V observations. State s has L bits; step t moves
to ((s << KV) | c) mod 2^L, so every state has F = 2^KV predecessors and successors. The measure is
P(s_0..s_{N-1}) ∝ prod_t exp(l_t(s_t)) over legal paths with free ends, where

    l_t(s) = (2 <c_s, x_t> - |c_s|^2) / T

is -|c_s - x_t|^2 / T up to a per-step constant that cancels. The output at steps [start, stop) is
the posterior mean sum_s P_t(s) c_s. A caller builds other boundaries from chains (tail-biting is a
free chain padded with wrap-around warm-up steps; see qat/soft_trellis.py).

Two implementations with one contract: forward_reference/backward_reference in plain torch (any
device, float32 or float64; the CPU path and the reference) and forward_triton/backward_triton,
fused kernels for CUDA (float32, V = 1 or 2), tested for parity against the former.

Group messages. Write s = F*h + c (h = s >> KV: the predecessor group; its members' predecessors
are j*G + h, j < F, with G = 2^(L-KV)). Then

    alpha_t(s) = l_t(s) + m_t[s >> KV],   m_{t+1}[h] = LSE_j alpha_t(j*G + h)
    beta_t(s)  = g_t[s mod G],            g_{t-1}[h] = LSE_c (l_t + beta_t)(F*h + c)

so forward and backward messages are G-sized per step: only m and g (and, in the backward, two
more G-sized messages) are ever stored, while l_t is recomputed from the codebook when needed. Each
step is one max-subtracted log-sum-exp per group: O(2^L) work. Messages are re-centred every step
(any per-step constant cancels), so fp32 never sees the huge magnitudes of unnormalised alphas.

Marginals come out of the beta step without extra exponentials: with e = exp(y - max_group) the
exponentials of y = l_t + beta_t taken for g_{t-1}, P_t(F*h + c) = e(F*h + c) * exp(max[h] + m_t[h]
- Lambda_t), Lambda_t = LSE_h (m_t[h] + g_{t-1}[h]).

Backward. With f_t(s) = <grad_t, c_s - out_t> (centred, so the sums below stay small), the
gradient of the loss w.r.t. l_t(s) is P_t(s) * (E[F | s_t = s] - E[F]) for F = sum_t f_t(s_t).
By the Markov property that conditional expectation splits into a past part phi and a future part
psi, each with a group message of its own:

    phi_t(s) = f_t(s) + Phi_t[s >> KV],  Phi_{t+1}[h] = sum_j r(j*G+h) phi_t(j*G+h)
    psi_t(s) = Psi_t[s mod G],           Psi_{t-1}[h] = sum_c q(F*h+c) (f_t + psi_t)(F*h+c)

with r, q the within-group softmax weights of the alpha and beta steps. Then dl_t = P_t (phi_t +
psi_t), dx_t = (2/T) sum_s dl_t(s) c_s, and the codebook gets sum_t P_t grad_t + (2/T) dl_t (x_t -
c_s). This equals (2/T) Cov(c_t, c_u) applied to the incoming gradient.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


def _check(x: torch.Tensor, values: torch.Tensor, state_bits: int, step_bits: int,
           temperature: float, start: int, stop: int) -> None:
    if x.dim() != 3:
        raise ValueError(f"bcjr: x must be (chains, steps, V), got shape {tuple(x.shape)}")
    if not 0 < step_bits < state_bits:
        raise ValueError(f"bcjr: need 0 < KV < L, got KV={step_bits} L={state_bits}")
    if tuple(values.shape) != (1 << state_bits, x.shape[2]):
        raise ValueError(f"bcjr: values must be ({1 << state_bits}, {x.shape[2]}), got "
                         f"{tuple(values.shape)}")
    if x.dtype != values.dtype or x.device != values.device:
        raise ValueError("bcjr: x and values must share dtype and device")
    if not temperature > 0:
        raise ValueError(f"bcjr: temperature must be positive, got {temperature}")
    if not 0 <= start < stop <= x.shape[1]:
        raise ValueError(f"bcjr: emitted steps [{start}, {stop}) outside the chain of "
                         f"{x.shape[1]} steps")


def bit_reverse(index: torch.Tensor, width: int) -> torch.Tensor:
    """index with its low `width` bits in reverse order."""
    out = torch.zeros_like(index)
    for bit in range(width):
        out |= ((index >> bit) & 1) << (width - 1 - bit)
    return out


class _Trellis:
    """Per-call constants: the costs l_t = bias + x_t @ weight in two state orders.

    The alpha step reduces over a predecessor group {j*G + h}: a middle dimension of the (B, F, G)
    view, and adds m[s >> KV] over the last dimension of (B, G, F). The beta step's groups
    {F*h + c} would be the last dimension, which torch reduces several times slower, so the beta
    passes index states bit-reversed (r = rev_L(s)): reversed time on reversed bits is again a
    shift trellis, its groups become middle dimensions, and its message g_t[s mod G] lands at
    r >> KV. Group messages in that order are permuted by rev_{L-KV} (G-sized gathers).
    """

    def __init__(self, values: torch.Tensor, state_bits: int, step_bits: int,
                 temperature: float) -> None:
        self.S, self.G, self.F = 1 << state_bits, 1 << (state_bits - step_bits), 1 << step_bits
        self.floor = log_floor(values.dtype)
        self.scale = 2.0 / temperature
        states = torch.arange(self.S, device=values.device)
        self.reverse_states = bit_reverse(states, state_bits)
        self.reverse_groups = bit_reverse(states[:self.G], state_bits - step_bits)
        self.values_rev = values[self.reverse_states]
        # (S, V) operands of (B, S) @ (S, V) products, stored transposed: torch is faster that way.
        self.values_t = values.t().contiguous()
        self.values_rev_t = self.values_rev.t().contiguous()
        self.weight = (values * self.scale).t().contiguous()  # (V, S)
        self.bias = values.pow(2).sum(1) * (-1.0 / temperature)  # (S,)
        self.weight_rev = self.weight[:, self.reverse_states].contiguous()
        self.bias_rev = self.bias[self.reverse_states]

    def costs_plus(self, x_t: torch.Tensor, msg: torch.Tensor, out: torch.Tensor,
                   reverse: bool = False) -> torch.Tensor:
        """out (B, S) = l_t + msg broadcast over each group's 2^KV members ((B, G, F) view).

        One broadcast add and V multiply-adds: faster in torch than a rank-V addmm.
        """
        bias, weight = (self.bias_rev, self.weight_rev) if reverse else (self.bias, self.weight)
        torch.add(bias.view(self.G, self.F), msg.unsqueeze(2), out=out.view(-1, self.G, self.F))
        for v in range(weight.shape[0]):
            out.addcmul_(x_t[:, v:v + 1], weight[v])
        return out

    def regroup(self, msgs: torch.Tensor) -> torch.Tensor:
        """(N, B, G) group messages from natural into bit-reversed group order."""
        return torch.gather(msgs, 2, self.reverse_groups.expand(msgs.shape))


def _centre(msg: torch.Tensor) -> torch.Tensor:
    return msg.sub_(msg.amax(1, keepdim=True))


def _log_norm(u: torch.Tensor) -> torch.Tensor:
    """LSE over dim 1, keeping it (torch.logsumexp is slow on these small shapes)."""
    top = u.amax(1, keepdim=True)
    return torch.exp(u - top).sum(1, keepdim=True).log_().add_(top)


def log_floor(dtype: torch.dtype) -> float:
    """Lowest exponent we evaluate: exp(-C) with C a third of the normal range's log.

    Exponentials below it are raised to it. Products of up to three such factors (a within-group
    weight, a group factor, a gradient term) then stay normal numbers: denormals and exp's
    underflow path are each tens of times slower on CPU. The mass added is at most
    2^L * exp(-C) relative (5e-10 at L=12 in float32), below float32 resolution.
    """
    return math.log(torch.finfo(dtype).tiny) / 3


def _power_of_two_scale(t: torch.Tensor) -> float:
    """2^k with 2^k * max|t| in [0.5, 1), or 1 for an all-zero t."""
    peak = float(t.abs().max()) if t.numel() else 0.0
    return 1.0 if peak == 0.0 or not math.isfinite(peak) else 2.0 ** -math.frexp(peak)[1]


def _group_lse_(view: torch.Tensor, floor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Max-subtracted LSE over dim 1 of a (B, F, G) view, leaving the weights exp(v - max) in it.

    Returns (max, sum of weights); the LSE is max + log(sum).
    """
    top = view.amax(1)
    view.sub_(top.unsqueeze(1)).clamp_min_(floor).exp_()
    return top, view.sum(1)


def _scores_plus(grad_t: torch.Tensor, out_t: torch.Tensor, values_t: torch.Tensor,
                 msg: torch.Tensor, into: torch.Tensor) -> torch.Tensor:
    """into (B, S) = f_t + msg broadcast over group members, f_t(s) = <grad_t, c_s - out_t>.

    values_t is (V, S) in the state order of `into`; msg is (B, G).
    """
    B, G = msg.shape
    torch.mul(grad_t[:, :1], values_t[0], out=into)
    for v in range(1, values_t.shape[0]):
        into.addcmul_(grad_t[:, v:v + 1], values_t[v])
    base = msg - (grad_t * out_t).sum(1, keepdim=True)
    into.view(B, G, -1).add_(base.unsqueeze(2))
    return into


def _alpha_pass(xs: torch.Tensor, tr: _Trellis, stop: int, grad: torch.Tensor | None = None,
                outs: torch.Tensor | None = None, start: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """m_t for t < stop, (stop, B, G); with grad, also Phi_t (module doc), same shape.

    xs is the chain time-major (N, B, V); grad and outs are time-major over the emitted steps.
    """
    B = xs.shape[1]
    S, G, F = tr.S, tr.G, tr.F
    m = xs.new_zeros(stop, B, G)
    phi_msg = xs.new_zeros(stop, B, G) if grad is not None else None
    buf = xs.new_empty(B, S)
    phi = xs.new_empty(B, S) if grad is not None else None
    for t in range(stop - 1):
        tr.costs_plus(xs[t], m[t], buf)
        weights = buf.view(B, F, G)
        top, total = _group_lse_(weights, tr.floor)
        _centre(torch.log(total, out=m[t + 1]).add_(top))
        if grad is None or t < start:
            continue  # no score before the first emitted step: Phi stays zero
        k = t - start
        if k < grad.shape[0]:  # phi_t = f_t + Phi_t[s >> KV]
            _scores_plus(grad[k], outs[k], tr.values_t, phi_msg[t], phi)
        else:
            phi.view(B, G, F).copy_(phi_msg[t].unsqueeze(2).expand(B, G, F))
        torch.sum(phi.view(B, F, G).mul_(weights), 1, out=phi_msg[t + 1]).div_(total)
    return m, phi_msg


def forward_reference(x: torch.Tensor, values: torch.Tensor, state_bits: int, step_bits: int,
                      temperature: float, start: int = 0, stop: int | None = None,
                      entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Posterior means (B, stop-start, V) of chains x (B, N, V); optionally marginal entropies.

    The entropy (B, stop-start) is -sum_s P_t(s) log P_t(s) in nats, a diagnostic of how hard the
    soft trellis has become.
    """
    stop = x.shape[1] if stop is None else stop
    _check(x, values, state_bits, step_bits, temperature, start, stop)
    B, N, V = x.shape
    tr = _Trellis(values, state_bits, step_bits, temperature)
    xs = x.permute(1, 0, 2).contiguous()
    m, _ = _alpha_pass(xs, tr, stop)
    m = tr.regroup(m)  # into the beta passes' group order
    out = x.new_empty(stop - start, B, V)
    ent = x.new_empty(stop - start, B) if entropy else None
    g = x.new_zeros(B, tr.G)  # g_t in bit-reversed group order
    buf = x.new_empty(B, tr.S)
    for t in range(N - 1, start - 1, -1):
        tr.costs_plus(xs[t], g, buf, reverse=True)
        weights = buf.view(B, tr.F, tr.G)
        top, total = _group_lse_(weights, tr.floor)
        g = total.log_().add_(top)
        if t < stop:  # P_t = weights * exp(top + m_t - Lambda_t)
            norm = _log_norm(m[t] + g)
            factor = torch.add(m[t], top).sub_(norm).clamp_min_(tr.floor).exp_()
            weights.mul_(factor.unsqueeze(1))
            torch.mm(buf, tr.values_rev_t.t(), out=out[t - start])
            if ent is not None:
                ent[t - start] = -torch.xlogy(buf, buf).sum(1)
        _centre(g)
    return out.permute(1, 0, 2), None if ent is None else ent.t()


def backward_reference(x: torch.Tensor, values: torch.Tensor, out: torch.Tensor,
                       grad_out: torch.Tensor, state_bits: int, step_bits: int,
                       temperature: float, start: int = 0, values_grad: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradients (dx (B, N, V), dvalues (S, V) or None) of <grad_out, forward(x)>.

    `out` is forward_reference's output for the same arguments (B, E, V) and grad_out matches it;
    the emitted steps are [start, start + E). Recomputes the messages instead of storing them.
    """
    E = out.shape[1]
    _check(x, values, state_bits, step_bits, temperature, start, start + E)
    B, N, V = x.shape
    tr = _Trellis(values, state_bits, step_bits, temperature)
    S, G, F = tr.S, tr.G, tr.F
    xs = x.permute(1, 0, 2).contiguous()
    # A power-of-two rescale of the incoming gradient keeps the products below in the normal range
    # whatever the loss's scale; it is undone exactly at the end.
    grad_scale = _power_of_two_scale(grad_out)
    grad = (grad_out.permute(1, 0, 2) * grad_scale).contiguous()
    outs = out.permute(1, 0, 2).contiguous()
    m, phi_msg = _alpha_pass(xs, tr, N, grad, outs, start)
    m, phi_msg = tr.regroup(m), tr.regroup(phi_msg)
    dx = x.new_empty(N, B, V)
    dvalues = values.new_zeros(S, V) if values_grad else None  # bit-reversed state order
    dl_total = values.new_zeros(S) if values_grad else None
    g = x.new_zeros(B, G)  # g_t and Psi_t in bit-reversed group order
    psi_msg = x.new_zeros(B, G)
    buf = x.new_empty(B, S)
    work = x.new_empty(B, S)
    for t in range(N - 1, -1, -1):
        tr.costs_plus(xs[t], g, buf, reverse=True)
        weights = buf.view(B, F, G)
        top, total = _group_lse_(weights, tr.floor)
        g = total.log().add_(top)
        norm = _log_norm(m[t] + g)
        factor = torch.add(m[t], top).sub_(norm).clamp_min_(tr.floor).exp_().unsqueeze(1)
        k = t - start
        if 0 <= k < E:  # work = f_t + psi_t
            _scores_plus(grad[k], outs[k], tr.values_rev_t, psi_msg, work)
        else:
            work.view(B, G, F).copy_(psi_msg.unsqueeze(2).expand(B, G, F))
        w = work.view(B, F, G).mul_(weights)
        group_sums = w.sum(1)
        psi_msg = group_sums / total
        # dl_t = P_t (h_t - E_t) with h_t = phi_t + psi_t = f_t + psi_t + Phi_t and E_t its mean
        # under P_t: mathematically the same E[F] at every step, so subtracting each step's own
        # keeps dl_t summing to zero despite rounding in the centring (a term (2/T) E out_t).
        # Phi_t is constant over a group here, so E_t needs only group-sized sums.
        mean = (factor[:, 0] * group_sums.addcmul_(phi_msg[t], total)).sum(1, keepdim=True)
        w.addcmul_(weights, (phi_msg[t] - mean).unsqueeze(1)).mul_(factor)
        torch.mm(work, tr.values_rev_t.t(), out=dx[t]).mul_(tr.scale)
        if dvalues is not None:
            dvalues.addmm_(work.t(), xs[t], alpha=tr.scale)
            dl_total.add_(work.sum(0))
            if 0 <= k < E:
                dvalues.addmm_(weights.mul_(factor).view(B, S).t(), grad[k])
        _centre(g)
    dx = dx.permute(1, 0, 2).div_(grad_scale)
    if dvalues is None:
        return dx, None
    dvalues.sub_(tr.values_rev * dl_total.unsqueeze(1) * tr.scale).div_(grad_scale)
    return dx, dvalues[tr.reverse_states]


# ---------------------------------------------------------------------------------------------
# Fused Triton kernels. One program per chain runs a whole pass (every step, every state) in one
# launch: a step reads the previous step's group messages, written by the same program, after a
# barrier. Each step loops over blocks of groups; a block is a (groups x 2^KV members) tile whose
# costs l_t are recomputed from the codebook. The reductions that span all groups (the marginals'
# normaliser Lambda_t, the outputs, E_t) are accumulated online across blocks with a running
# maximum, as in a streaming softmax, so nothing of size 2^L is ever written. Messages are stored
# relative to their previous step's maximum (a per-step constant, which every use cancels).
# ---------------------------------------------------------------------------------------------

BLOCK_ELEMENTS = 2048  # states per block: groups x members


@triton.jit
def _costs(coef_ptr, bias_ptr, s, x0, x1, V: tl.constexpr):
    """l_t(s) = bias[s] + <coef[s], x_t> with coef = 2 c / T and bias = -|c|^2 / T."""
    cost = tl.load(bias_ptr + s) + x0 * tl.load(coef_ptr + s * V)
    if V == 2:
        cost += x1 * tl.load(coef_ptr + s * V + 1)
    return cost


@triton.jit
def _scores(values_ptr, s, g0, g1, centre, V: tl.constexpr):
    """f_t(s) = <grad_t, c_s> - <grad_t, out_t> (zero outside the emitted steps: grad = 0)."""
    score = g0 * tl.load(values_ptr + s * V) - centre
    if V == 2:
        score += g1 * tl.load(values_ptr + s * V + 1)
    return score


@triton.jit
def _load_step(ptr, row, t, V: tl.constexpr, mask=True):
    """(v0, v1) of a (rows, steps, V) tensor at [row, t]; v1 = 0 when V = 1."""
    v0 = tl.load(ptr + row * V + t * V, mask=mask, other=0.0)
    v1 = 0.0
    if V == 2:
        v1 = tl.load(ptr + row * V + t * V + 1, mask=mask, other=0.0)
    return v0, v1


@triton.jit
def _step_gradient(grad_ptr, out_ptr, b, emitted, t, start, V: tl.constexpr):
    """(active, g0, g1, centre) at step t: the output gradient and <grad_t, out_t>, all zero
    outside the emitted steps."""
    k = t - start
    active = (k >= 0) & (k < emitted)
    g0, g1 = _load_step(grad_ptr, b * emitted, k, V, active)
    o0, o1 = _load_step(out_ptr, b * emitted, k, V, active)
    return active, g0, g1, g0 * o0 + g1 * o1


@triton.jit
def _beta_rows(i, t, chains, b, G: tl.constexpr):
    """Offsets of chain b's rows at backward step i (step t): the ping-pong rows of g (read cur,
    write nxt) and its forward messages m_t."""
    cur = ((i % 2) * chains + b) * G
    nxt = (((i + 1) % 2) * chains + b) * G
    return cur, nxt, (t * chains + b) * G


@triton.jit
def _successor_block(coef_ptr, bias_ptr, g_ptr, cur, h, member, x0, x1, shift, floor,
                     STEP_BITS: tl.constexpr, G: tl.constexpr, V: tl.constexpr):
    """One block of groups h of the beta recursion: the successors s = h*F + member of each h,
    their group-normalised terms e = exp(y - top) for y = l_t(s) + g_{t+1}(s mod G) - shift, and
    the sums of e; g_t[h] = top + log(total)."""
    s = h[:, None] * (1 << STEP_BITS) + member  # (BLOCK_G, F)
    low = s & (G - 1)
    y = _costs(coef_ptr, bias_ptr, s, x0, x1, V) + tl.load(g_ptr + cur + low) - shift
    top = tl.max(y, axis=1)
    e = tl.exp(tl.maximum(y - top[:, None], floor))
    return s, low, top, e, tl.sum(e, axis=1)


@triton.jit
def _alpha_kernel(x_ptr, coef_ptr, bias_ptr, values_ptr, m_ptr, phi_ptr, grad_ptr, out_ptr,
                  chains, steps, stop, start, emitted, floor,
                  STATE_BITS: tl.constexpr, STEP_BITS: tl.constexpr, V: tl.constexpr,
                  BLOCK_G: tl.constexpr, WITH_PHI: tl.constexpr):
    """m_{t+1}[h] = LSE_j (l_t + m_t)(j*G + h) for t < stop-1; with WITH_PHI also Phi_{t+1}."""
    G: tl.constexpr = 1 << (STATE_BITS - STEP_BITS)
    F: tl.constexpr = 1 << STEP_BITS
    b = tl.program_id(0).to(tl.int64)
    member = tl.arange(0, F)[:, None]
    lane = tl.arange(0, BLOCK_G)
    shift = 0.0
    for t in range(0, stop - 1):
        x0, x1 = _load_step(x_ptr, b * steps, t, V)
        active, g0, g1, centre = _step_gradient(grad_ptr, out_ptr, b, emitted, t, start, V)
        here = (t * chains + b) * G
        there = here + chains * G
        new_shift = -float("inf")
        for h0 in range(0, G, BLOCK_G):
            h = h0 + lane
            p = member * G + h[None, :]  # (F, BLOCK_G): the predecessor group of each h
            a = _costs(coef_ptr, bias_ptr, p, x0, x1, V) - shift
            a += tl.load(m_ptr + here + (p >> STEP_BITS))
            top = tl.max(a, axis=0)
            e = tl.exp(tl.maximum(a - top[None, :], floor))
            total = tl.sum(e, axis=0)
            m_next = top + tl.log(total)
            tl.store(m_ptr + there + h, m_next)
            new_shift = tl.maximum(new_shift, tl.max(m_next, axis=0))
            if WITH_PHI:
                phi = _scores(values_ptr, p, g0, g1, centre, V) * active.to(tl.float32)
                phi += tl.load(phi_ptr + here + (p >> STEP_BITS))
                tl.store(phi_ptr + there + h, tl.sum(e * phi, axis=0) / total)
        shift = new_shift
        tl.debug_barrier()


@triton.jit
def _beta_forward_kernel(x_ptr, coef_ptr, bias_ptr, values_ptr, m_ptr, g_ptr, out_ptr,
                         chains, steps, start, stop, floor,
                         STATE_BITS: tl.constexpr, STEP_BITS: tl.constexpr, V: tl.constexpr,
                         BLOCK_G: tl.constexpr):
    """Beta recursion from the last step down to `start`; posterior means at steps < stop."""
    G: tl.constexpr = 1 << (STATE_BITS - STEP_BITS)
    F: tl.constexpr = 1 << STEP_BITS
    b = tl.program_id(0).to(tl.int64)
    member = tl.arange(0, F)[None, :]
    lane = tl.arange(0, BLOCK_G)
    shift = 0.0
    for i in range(0, steps - start):
        t = steps - 1 - i
        x0, x1 = _load_step(x_ptr, b * steps, t, V)
        cur, nxt, m_row = _beta_rows(i, t, chains, b, G)
        new_shift = -float("inf")
        run_max = -float("inf")
        z = 0.0
        o0 = 0.0
        o1 = 0.0
        for h0 in range(0, G, BLOCK_G):
            h = h0 + lane
            s, _, top, e, total = _successor_block(coef_ptr, bias_ptr, g_ptr, cur, h, member, x0,
                                                   x1, shift, floor, STEP_BITS, G, V)
            g_next = top + tl.log(total)
            tl.store(g_ptr + nxt + h, g_next)
            new_shift = tl.maximum(new_shift, tl.max(g_next, axis=0))
            if t < stop:  # P_t(s) = e(s) exp(top + m_t - Lambda_t), streamed over blocks
                m_t = tl.load(m_ptr + m_row + h)
                block_max = tl.max(m_t + g_next, axis=0)
                new_max = tl.maximum(run_max, block_max)
                rescale = tl.exp(run_max - new_max)
                weight = tl.exp(m_t + top - new_max)
                z = z * rescale + tl.sum(tl.exp(m_t + g_next - new_max), axis=0)
                v0 = tl.sum(e * tl.load(values_ptr + s * V), axis=1)
                o0 = o0 * rescale + tl.sum(weight * v0, axis=0)
                if V == 2:
                    v1 = tl.sum(e * tl.load(values_ptr + s * V + 1), axis=1)
                    o1 = o1 * rescale + tl.sum(weight * v1, axis=0)
                run_max = new_max
        if t < stop:
            row = (b * (stop - start) + t - start) * V
            tl.store(out_ptr + row, o0 / z)
            if V == 2:
                tl.store(out_ptr + row + 1, o1 / z)
        shift = new_shift
        tl.debug_barrier()


@triton.jit
def _beta_backward_kernel(x_ptr, coef_ptr, bias_ptr, values_ptr, m_ptr, phi_ptr, g_ptr, psi_ptr,
                          grad_ptr, out_ptr, dx_ptr, dvalues_ptr,
                          chains, steps, start, emitted, floor, scale,
                          STATE_BITS: tl.constexpr, STEP_BITS: tl.constexpr, V: tl.constexpr,
                          BLOCK_G: tl.constexpr, VALUES_GRAD: tl.constexpr):
    """dx_t = (2/T) sum_s P_t (h_t - E_t) c_s with h_t = f_t + psi_t + Phi_t, all steps."""
    G: tl.constexpr = 1 << (STATE_BITS - STEP_BITS)
    F: tl.constexpr = 1 << STEP_BITS
    S: tl.constexpr = 1 << STATE_BITS
    b = tl.program_id(0).to(tl.int64)
    member = tl.arange(0, F)[None, :]
    lane = tl.arange(0, BLOCK_G)
    shift = 0.0
    for i in range(0, steps):
        t = steps - 1 - i
        x0, x1 = _load_step(x_ptr, b * steps, t, V)
        active, g0, g1, centre = _step_gradient(grad_ptr, out_ptr, b, emitted, t, start, V)
        cur, nxt, m_row = _beta_rows(i, t, chains, b, G)
        new_shift = -float("inf")
        run_max = -float("inf")
        z = 0.0
        su = 0.0
        u0 = 0.0
        u1 = 0.0
        a0 = 0.0
        a1 = 0.0
        for h0 in range(0, G, BLOCK_G):
            h = h0 + lane
            s, low, top, e, total = _successor_block(coef_ptr, bias_ptr, g_ptr, cur, h, member,
                                                     x0, x1, shift, floor, STEP_BITS, G, V)
            g_next = top + tl.log(total)
            tl.store(g_ptr + nxt + h, g_next)
            new_shift = tl.maximum(new_shift, tl.max(g_next, axis=0))
            w = _scores(values_ptr, s, g0, g1, centre, V) * active.to(tl.float32)
            ew = e * (w + tl.load(psi_ptr + cur + low))
            tl.store(psi_ptr + nxt + h, tl.sum(ew, axis=1) / total)
            u = ew + e * tl.load(phi_ptr + m_row + h)[:, None]  # e * h_t
            m_t = tl.load(m_ptr + m_row + h)
            new_max = tl.maximum(run_max, tl.max(m_t + g_next, axis=0))
            rescale = tl.exp(run_max - new_max)
            weight = tl.exp(m_t + top - new_max)
            z = z * rescale + tl.sum(tl.exp(m_t + g_next - new_max), axis=0)
            su = su * rescale + tl.sum(weight * tl.sum(u, axis=1), axis=0)
            v0 = tl.load(values_ptr + s * V)
            u0 = u0 * rescale + tl.sum(weight * tl.sum(u * v0, axis=1), axis=0)
            a0 = a0 * rescale + tl.sum(weight * tl.sum(e * v0, axis=1), axis=0)
            if V == 2:
                v1 = tl.load(values_ptr + s * V + 1)
                u1 = u1 * rescale + tl.sum(weight * tl.sum(u * v1, axis=1), axis=0)
                a1 = a1 * rescale + tl.sum(weight * tl.sum(e * v1, axis=1), axis=0)
            run_max = new_max
        mean = su / z
        row = (b * steps + t) * V
        tl.store(dx_ptr + row, scale * (u0 - mean * a0) / z)
        if V == 2:
            tl.store(dx_ptr + row + 1, scale * (u1 - mean * a1) / z)
        if VALUES_GRAD:  # a second sweep, now that Lambda_t and E_t are known
            log_norm = run_max + tl.log(z)
            for h0 in range(0, G, BLOCK_G):
                h = h0 + lane
                s, low, top, e, _ = _successor_block(coef_ptr, bias_ptr, g_ptr, cur, h, member,
                                                     x0, x1, shift, floor, STEP_BITS, G, V)
                factor = tl.exp(tl.load(m_ptr + m_row + h) + top - log_norm)[:, None]
                w = _scores(values_ptr, s, g0, g1, centre, V) * active.to(tl.float32)
                hw = w + tl.load(psi_ptr + cur + low) + tl.load(phi_ptr + m_row + h)[:, None]
                p = e * factor
                dl = p * (hw - mean)
                dv = dvalues_ptr + (b * S + s) * V
                v0 = tl.load(values_ptr + s * V)
                tl.store(dv, tl.load(dv) + p * g0 + scale * dl * (x0 - v0))
                if V == 2:
                    v1 = tl.load(values_ptr + s * V + 1)
                    tl.store(dv + 1, tl.load(dv + 1) + p * g1 + scale * dl * (x1 - v1))
        shift = new_shift
        tl.debug_barrier()


def _kernel_inputs(x: torch.Tensor, values: torch.Tensor, state_bits: int, step_bits: int,
                   temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    if x.dtype != torch.float32:
        raise ValueError(f"bcjr kernels run in float32, got {x.dtype}")
    if x.shape[2] not in (1, 2):
        raise ValueError(f"bcjr kernels support V = 1 or 2, got {x.shape[2]}")
    values = values.contiguous()
    coef = (values * (2.0 / temperature)).contiguous()
    bias = (values.pow(2).sum(1) * (-1.0 / temperature)).contiguous()
    groups = 1 << (state_bits - step_bits)
    block_g = max(1, min(groups, BLOCK_ELEMENTS >> step_bits))
    meta = dict(STATE_BITS=state_bits, STEP_BITS=step_bits, V=x.shape[2], BLOCK_G=block_g)
    return values, coef, bias, meta


def _output(given: torch.Tensor | None, shape: tuple[int, ...], device: torch.device,
            name: str) -> torch.Tensor:
    if given is None:
        return torch.empty(shape, device=device, dtype=torch.float32)
    if tuple(given.shape) != shape or given.dtype != torch.float32 or not given.is_contiguous():
        raise ValueError(f"bcjr: {name} must be a contiguous float32 tensor of shape {shape}")
    return given


def forward_triton(x: torch.Tensor, values: torch.Tensor, state_bits: int, step_bits: int,
                   temperature: float, start: int = 0, stop: int | None = None,
                   out: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
    """forward_reference in two fused kernels (float32; V = 1 or 2; no entropy).

    `out`, if given, is a contiguous float32 (B, stop-start, V) tensor written in full.
    """
    stop = x.shape[1] if stop is None else stop
    _check(x, values, state_bits, step_bits, temperature, start, stop)
    values, coef, bias, meta = _kernel_inputs(x, values, state_bits, step_bits, temperature)
    B, N, V = x.shape
    x = x.contiguous()
    G = 1 << (state_bits - step_bits)
    floor = log_floor(torch.float32)
    m = torch.empty(stop, B, G, device=x.device, dtype=torch.float32)
    m[0].zero_()
    _alpha_kernel[(B,)](x, coef, bias, values, m, m, x, x, B, N, stop, 0, 0, floor,
                        WITH_PHI=False, **meta)
    g = torch.zeros(2, B, G, device=x.device, dtype=torch.float32)
    out = _output(out, (B, stop - start, V), x.device, "out")
    _beta_forward_kernel[(B,)](x, coef, bias, values, m, g, out, B, N, start, stop, floor,
                               **meta)
    return out, None


def backward_triton(x: torch.Tensor, values: torch.Tensor, out: torch.Tensor,
                    grad_out: torch.Tensor, state_bits: int, step_bits: int, temperature: float,
                    start: int = 0, values_grad: bool = False, dx: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """backward_reference in two fused kernels (float32; V = 1 or 2).

    `dx`, if given, is a contiguous float32 tensor shaped like x, written in full.
    """
    E = out.shape[1]
    _check(x, values, state_bits, step_bits, temperature, start, start + E)
    values, coef, bias, meta = _kernel_inputs(x, values, state_bits, step_bits, temperature)
    B, N, V = x.shape
    x, out, grad_out = x.contiguous(), out.contiguous(), grad_out.contiguous()
    G, S = 1 << (state_bits - step_bits), 1 << state_bits
    floor = log_floor(torch.float32)
    m = torch.empty(N, B, G, device=x.device, dtype=torch.float32)
    phi = torch.empty(N, B, G, device=x.device, dtype=torch.float32)
    m[0].zero_()
    phi[0].zero_()
    _alpha_kernel[(B,)](x, coef, bias, values, m, phi, grad_out, out, B, N, N, start, E, floor,
                        WITH_PHI=True, **meta)
    g = torch.zeros(2, B, G, device=x.device, dtype=torch.float32)
    psi = torch.zeros(2, B, G, device=x.device, dtype=torch.float32)
    dx = _output(dx, tuple(x.shape), x.device, "dx")
    dvalues = torch.zeros(B if values_grad else 1, S, V, device=x.device, dtype=torch.float32)
    _beta_backward_kernel[(B,)](x, coef, bias, values, m, phi, g, psi, grad_out, out, dx,
                                dvalues, B, N, start, E, floor, 2.0 / temperature,
                                VALUES_GRAD=values_grad, **meta)
    return dx, dvalues.sum(0) if values_grad else None
