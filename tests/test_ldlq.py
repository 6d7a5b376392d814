"""BlockLDLQ: the feedback factorisation is exact, and it lowers the Hessian-weighted error."""

from __future__ import annotations

import torch

from qat.hessian import damp
from qat.ldlq import BLOCK, LdlqJob, block_feedback, run_ldlq
from trellis_runtime.codes import state_values
from trellis_runtime.trellis import TrellisSpec
from trellis_runtime.viterbi import encode


def correlated_hessian(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(n, n, generator=gen, dtype=torch.float64) / n ** 0.5
    x = torch.randn(4 * n, n, generator=gen, dtype=torch.float64) @ (torch.eye(n) + 2 * mixing)
    return damp(x.t() @ x / x.shape[0], 0.01)


def test_feedback_gives_block_ldl() -> None:
    hessian = correlated_hessian(64, 0)
    unit = torch.eye(64, dtype=torch.float64) + block_feedback(hessian)
    inverse = torch.linalg.inv(unit)
    middle = inverse @ hessian @ inverse.t()
    blocks = torch.block_diag(*[torch.ones(BLOCK, BLOCK)] * (64 // BLOCK)).bool()
    assert torch.allclose(middle.masked_fill(blocks, 0.0), torch.zeros_like(middle), atol=1e-9)
    assert torch.allclose(torch.triu(unit, 1), torch.zeros_like(unit))


def proxy_loss(weight: torch.Tensor, recon: torch.Tensor, hessian: torch.Tensor) -> float:
    error = (weight - recon).to(torch.float64)
    return torch.trace(error @ hessian @ error.t()).item()


def test_ldlq_beats_plain_rounding_on_the_proxy_loss() -> None:
    spec = TrellisSpec(state_bits=8, bits=2, vec=1, code="1mad")
    values = state_values(spec)

    def quantize(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        states = encode(tiles, values, spec)
        return values[states].reshape(tiles.shape), states

    hessian = correlated_hessian(128, 1)
    weight = torch.randn(32, 128, generator=torch.Generator().manual_seed(2)) * 0.9
    with_h = LdlqJob(weight, block_feedback(hessian).to(torch.float32))
    plain = LdlqJob(weight, None)
    run_ldlq([with_h, plain], quantize)
    loss_h = proxy_loss(weight, with_h.reconstruction, hessian)
    loss_plain = proxy_loss(weight, plain.reconstruction, hessian)
    assert loss_h < 0.9 * loss_plain
    # Without feedback each tile is encoded alone, so the result equals direct encoding.
    tiles = weight.reshape(2, 16, 8, 16).permute(0, 2, 1, 3).reshape(-1, 256)
    direct = values[encode(tiles, values, spec)].reshape(2, 8, 16, 16).permute(0, 2, 1, 3)
    assert torch.equal(plain.reconstruction, direct.reshape(32, 128))
    assert plain.states.shape == (2, 8, spec.steps)
