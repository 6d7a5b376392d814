"""Perplexity on non-overlapping windows of text, the protocol of GPTQ/QuIP#/QTIP evaluations."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm import tqdm


@torch.no_grad()
def perplexity(model, tokens: torch.Tensor, ctx: int = 512, max_tokens: int | None = None
               ) -> tuple[float, int]:
    """(perplexity, predicted tokens) over consecutive windows of `ctx` tokens.

    Each window is scored independently, so its first token is context only: a window contributes
    ctx - 1 predictions. A trailing partial window is dropped; `max_tokens` caps the text used.
    """
    if max_tokens is not None:
        tokens = tokens[:max_tokens]
    windows = tokens.numel() // ctx
    if windows == 0:
        raise ValueError(f"need at least {ctx} tokens for one window, got {tokens.numel()}")
    device = next(model.parameters()).device
    total_nll, count = 0.0, 0
    for w in tqdm(range(windows), desc="perplexity", unit="window", leave=False):
        ids = tokens[w * ctx:(w + 1) * ctx].unsqueeze(0).to(device)
        logits = model(ids).logits[0, :-1].to(torch.float32)
        total_nll += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        count += ctx - 1
    return math.exp(total_nll / count), count
