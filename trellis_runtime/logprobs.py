"""Log-probabilities of chosen tokens and of their most likely alternatives, for the API's logprobs.

What is reported is the log-softmax of the model's raw logits at that position: before repetition,
presence and frequency penalties, temperature, min_p, top_k and top_p. That is what OpenAI's API and
vLLM (its default `raw_logprobs` mode) report, and it makes a logprob a property of the model and the
text alone: the same prompt scores the same whatever sampling settings came with it, which is what
evaluation harnesses rely on. (The distribution a token was actually drawn from is a different, less
useful number: with temperature 0 it would give the greedy token logprob 0.)

Precision: the model hands over float32 logits (the forward's compute dtype upcast) and log_softmax runs
in float32, which is within a few float32 ulps of the exact value for the given logits (max-subtracted
log-sum-exp). A chosen token's logprob and a top entry for the same token come from the same tensor
element, so a greedy token's logprob equals the top-1 value exactly, as clients test with `==`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

# The most alternatives one position may ask for: OpenAI's chat limit (top_logprobs <= 20), and vLLM's
# default --max-logprobs. It bounds the work (topk over the vocabulary) and the response size.
MAX_LOGPROBS = 20


@dataclass(frozen=True)
class TokenLogprob:
    """One position: the token that is there (sampled, or given in the prompt) and the likeliest ones."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, logprob), most likely first; as many as asked


def token_logprobs(logits: torch.Tensor, token_ids: Sequence[int],
                   top_counts: Sequence[int]) -> list[TokenLogprob]:
    """Row i of logits (rows, vocab) scored at token_ids[i], with its top_counts[i] likeliest tokens.

    Everything is gathered on the device and copied to the host once, so the cost is one log_softmax
    and one topk over these rows, whatever their number.
    """
    if not len(token_ids):
        return []
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    ids = torch.tensor(list(token_ids), dtype=torch.int64, device=logits.device)
    chosen = logprobs.gather(1, ids[:, None])[:, 0].tolist()
    top_values: list[list[float]] = []
    top_ids: list[list[int]] = []
    if max(top_counts) > 0:
        values, indices = logprobs.topk(max(top_counts), dim=-1)  # sorted, most likely first
        top_values, top_ids = values.tolist(), indices.tolist()
    return [TokenLogprob(token_id=int(token_ids[i]), logprob=chosen[i],
                         top=tuple(zip(top_ids[i][:count], top_values[i][:count])) if count else ())
            for i, count in enumerate(top_counts)]
