"""The runner's flat batch: which tokens a plan feeds, and which logits rows sampling and prompt scoring
read. (The runner's forward and sampling run end to end in test_engine.py and test_logprobs.py.)"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trellis_runtime.runner import FlatBatch
from trellis_runtime.sampling import SamplingParams
from trellis_runtime.scheduler import ScheduledSequence, Scheduler


@dataclass(eq=False, kw_only=True)
class Row(ScheduledSequence):
    params: SamplingParams
    generator: torch.Generator | None = None


class Slots:
    def __init__(self) -> None:
        self.next = 0

    def allocate(self) -> int:
        self.next += 1
        return self.next - 1

    def free(self, slot: int) -> None:
        pass


def test_decodes_then_a_scored_prefill_chunk() -> None:
    scheduler = Scheduler(Slots(), max_batch=3, prefill_chunk=4)
    decoding = Row(prompt_ids=[1, 2], params=SamplingParams(max_tokens=5))
    scored = Row(prompt_ids=[10, 11, 12, 13, 14, 15], params=SamplingParams(prompt_logprobs=2))
    for sequence, sampled in ((decoding, 99), (scored, 98)):  # two steps: the prefill, then 4 tokens
        scheduler.add(sequence)
        scheduler.admit()
        scheduler.advance(scheduler.plan())
        decoding.output_ids.append(sampled)

    batch = FlatBatch.of(scheduler.plan())
    assert batch.tokens == [98, 14, 15] and batch.positions == [3, 4, 5] and batch.slots == [0, 1, 1]
    # Rows: the decode's token (sampled), then prompt positions 4 (scoring token 5) and 5 (the prompt's
    # last: it scores nothing, and its logits choose the first generated token).
    assert batch.logits_at == [0, 1, 2]
    assert batch.sampled == [decoding, scored] and batch.sample_rows == [0, 2]
    assert batch.scored == [(scored, 1, [15])] and batch.scored_only == []


def test_a_prompt_scored_with_max_tokens_0_is_not_sampled() -> None:
    scheduler = Scheduler(Slots(), max_batch=1, prefill_chunk=8)
    only = Row(prompt_ids=[5, 6, 7], params=SamplingParams(max_tokens=0, prompt_logprobs=0))
    scheduler.add(only)
    scheduler.admit()
    batch = FlatBatch.of(scheduler.plan())
    assert batch.logits_at == [0, 1] and batch.scored == [(only, 0, [6, 7])]
    assert batch.sampled == [] and batch.scored_only == [only]


def test_without_scoring_only_each_sequences_last_token_has_logits() -> None:
    scheduler = Scheduler(Slots(), max_batch=1, prefill_chunk=3)
    long = Row(prompt_ids=list(range(7)), params=SamplingParams())
    scheduler.add(long)
    scheduler.admit()
    first = FlatBatch.of(plan := scheduler.plan())
    assert first.tokens == [0, 1, 2] and first.logits_at == [] and first.sampled == []
    scheduler.advance(plan)
    scheduler.advance(scheduler.plan())
    last = FlatBatch.of(scheduler.plan())
    assert last.tokens == [6] and last.positions == [6] and last.logits_at == [0]
    assert last.sampled == [long]
