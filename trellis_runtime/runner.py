"""One engine step on the model: a plan's chunks -> one flat batch -> forward -> next tokens and logprobs.

The batch is assembled as python lists (tokens, positions, slots, and which rows need logits), copied
to the device once, and planned into an AttentionLayout (trellis_runtime/attention.py) from those same
lists, which the forward is handed: nothing is read back from the device until the sampled tokens are. On CUDA a step that only
decodes replays a captured graph instead (trellis_runtime/cuda_graphs.py).

Logits are computed only where they are used: the last token of each chunk that ends its sequence
(its next token is sampled there), and, for a request scoring its prompt, every prefill position.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from trellis_runtime.cuda_graphs import DecodeGraphs
from trellis_runtime.kv_cache import KVCache
from trellis_runtime.logprobs import TokenLogprob, token_logprobs
from trellis_runtime.sampling import SamplingRow, sample
from trellis_runtime.scheduler import StepPlan


class StepSequence(SamplingRow, Protocol):
    """What the runner reads of a sequence: the sampler's view of it and its KV slot."""

    slot: int | None


@dataclass
class FlatBatch:
    """A plan's chunks laid end to end, with the logits rows each use of them needs."""

    tokens: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    logits_at: list[int] = field(default_factory=list)  # tokens needing logits, in the logits' row order
    sampled: list[StepSequence] = field(default_factory=list)  # sequences that get a next token
    sample_rows: list[int] = field(default_factory=list)  # their rows of the logits
    # Prefill chunks scoring their prompt: (sequence, first logits row, the prompt tokens scored).
    scored: list[tuple[StepSequence, int, list[int]]] = field(default_factory=list)
    scored_only: list[StepSequence] = field(default_factory=list)  # max_tokens 0: prefilled, done

    @classmethod
    def of(cls, plan: StepPlan) -> "FlatBatch":
        batch = cls()
        for chunk in plan.chunks:
            sequence: StepSequence = chunk.sequence  # type: ignore[assignment]
            start = len(batch.tokens)
            batch.tokens += chunk.tokens
            batch.positions += chunk.positions
            batch.slots += [sequence.slot] * len(chunk.tokens)
            at = chunk.start
            if sequence.params.prompt_logprobs is not None and at < len(sequence.prompt_ids):
                # Position p's logits score prompt token p + 1: all chunk positions but the prompt's last.
                targets = sequence.prompt_ids[at + 1:at + 1 + len(chunk.tokens)]
                batch.scored.append((sequence, len(batch.logits_at), targets))
                batch.logits_at += range(start, start + len(targets))
            if chunk.at_end:
                if sequence.params.max_tokens == 0:
                    batch.scored_only.append(sequence)
                else:
                    batch.sampled.append(sequence)
                    batch.sample_rows.append(len(batch.logits_at))
                    batch.logits_at.append(len(batch.tokens) - 1)
        return batch


@dataclass
class StepResult:
    """What one step produced, for the engine to hand out."""

    sampled: list[StepSequence]  # the sequences given a next token, in the order of next_ids
    next_ids: list[int]
    logprobs: list[TokenLogprob | None]  # per sampled sequence: its token's, if it asked, else None
    prompt_logprobs: list[tuple[StepSequence, list[TokenLogprob]]]  # this step's prompt scores
    scored_only: list[StepSequence]  # prefilled with max_tokens 0: done, nothing sampled


class ModelRunner:
    """Runs planned steps of `model` over `cache`, whose slots the scheduler hands out."""

    def __init__(self, model, cache: KVCache, max_batch: int) -> None:
        self.model = model
        self.cache = cache
        self.device = model.embed_tokens.device
        self.plan_layout = model.plan_layout  # the model's attention windows and head groups
        # On CUDA, steps that only decode replay captured graphs.
        self.graphs = DecodeGraphs(model, cache, max_batch) if self.device.type == "cuda" else None

    def run(self, plan: StepPlan) -> StepResult:
        batch = FlatBatch.of(plan)
        logits = self._logits(batch, plan.decode_only)
        # Without prompt scoring (the usual step) every row is a sampling row: no copy, no extra work.
        sample_logits = logits if not batch.scored else logits[self._tensor(batch.sample_rows)]
        next_ids = sample(sample_logits, batch.sampled).tolist() if batch.sampled else []
        prompt_logprobs = [(sequence, token_logprobs(logits[first:first + len(targets)], targets,
                                                     [sequence.params.prompt_logprobs] * len(targets)))
                           for sequence, first, targets in batch.scored]
        return StepResult(batch.sampled, next_ids,
                          _sampled_logprobs(sample_logits, batch.sampled, next_ids), prompt_logprobs,
                          batch.scored_only)

    def _logits(self, batch: FlatBatch, decode_only: bool) -> torch.Tensor:
        """Logits of the batch's logits_at rows, in that order."""
        if self.graphs is not None and decode_only and not batch.scored:
            return self.graphs.run(batch.tokens, batch.positions, batch.slots)  # every row is sampled
        # One copy to the device for the three inputs; each row is a contiguous view.
        tokens, positions, slots = torch.tensor([batch.tokens, batch.positions, batch.slots],
                                                dtype=torch.int64, device=self.device)
        layout = self.plan_layout(batch.positions, batch.slots, positions, self.cache)
        return self.model(tokens, positions, slots, self.cache, logits_for=self._tensor(batch.logits_at),
                          layout=layout)

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=self.device)


def _sampled_logprobs(logits: torch.Tensor, sampled: list[StepSequence], next_ids: list[int]
                      ) -> list[TokenLogprob | None]:
    """The sampled tokens' logprobs (rows of `logits`), for the sequences that asked; None elsewhere."""
    wanted = [i for i, sequence in enumerate(sampled) if sequence.params.logprobs is not None]
    found: list[TokenLogprob | None] = [None] * len(sampled)
    if wanted:
        rows = logits if len(wanted) == len(sampled) else logits[wanted]
        scored = token_logprobs(rows, [next_ids[i] for i in wanted],
                                [sampled[i].params.logprobs for i in wanted])
        for i, logprob in zip(wanted, scored):
            found[i] = logprob
    return found
