"""Which sequences run in the next step, and which token chunk each one feeds (nano-vllm's scheduler).

Plain Python over lists: no tensors and no model, so the policy can be read and tested on its own.

A sequence waits in arrival order until it is admitted, which takes a free KV slot and the prefill turn:
at most one prompt is read at a time, a chunk of at most `prefill_chunk` tokens per step, while every
sequence already prefilled (running) feeds its last sampled token. Running plus prefilling never exceed
`max_batch`, the number of KV slots. A sequence leaves the schedule when it is released (finished,
aborted or failed), which frees its slot for the next waiting one.

Each step the engine calls drop_aborted, admit and plan, runs the plan, then calls advance and releases
what finished. The scheduler is not thread-safe: the engine calls it from its loop thread, holding its
lock around add, drop_aborted and admit (the waiting queue and the aborted flags are what other threads
touch).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

# The engine's sizes, here where torch is not imported, so the server's settings can offer them as
# defaults without loading the model code.
DEFAULT_MAX_BATCH = 8  # sequences decoded together: the KV-cache slots
DEFAULT_MAX_SEQ_LEN = 2048  # positions per KV slot when the model's own context is longer
DEFAULT_PREFILL_CHUNK = 512  # prompt tokens per step: long prompts share steps with running decodes


class SlotAllocator(Protocol):
    """Where sequences get their KV slots: the engine passes its KVCache."""

    def allocate(self) -> int: ...

    def free(self, slot: int) -> None: ...


@dataclass(eq=False, kw_only=True)
class ScheduledSequence:
    """A sequence's place in the schedule. The engine's requests extend it with what they generate by."""

    prompt_ids: list[int]
    output_ids: list[int] = field(default_factory=list)
    slot: int | None = None  # held from admission until release
    computed: int = 0  # tokens whose keys and values are in the cache
    finished: bool = False  # released: it will never run again
    aborted: bool = False  # set by the consumer's thread when it stops listening

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def prefilled(self) -> bool:
        return self.computed >= len(self.prompt_ids)

    def next_chunk(self, budget: int) -> list[int]:
        """The next tokens to feed: part of the prompt while prefilling, else the last sampled one."""
        if not self.prefilled:
            return self.prompt_ids[self.computed:self.computed + budget]
        return self.output_ids[self.computed - len(self.prompt_ids):]


@dataclass(frozen=True)
class Chunk:
    """One sequence's share of a step: `tokens` written at positions start, start + 1, ... of its slot."""

    sequence: ScheduledSequence
    tokens: list[int]
    start: int
    at_end: bool  # it feeds the sequence's last known token, whose logits choose the next one

    @property
    def positions(self) -> range:
        return range(self.start, self.start + len(self.tokens))


@dataclass(frozen=True)
class StepPlan:
    """The chunks of one step: one token for every running sequence, then the prefill chunk, if any."""

    chunks: list[Chunk]
    decoding: int  # how many leading chunks are decode steps (one token each)

    @property
    def decode_only(self) -> bool:
        return self.decoding == len(self.chunks)


class Scheduler:
    def __init__(self, slots: SlotAllocator, max_batch: int, prefill_chunk: int) -> None:
        self.slots = slots
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.waiting: deque[ScheduledSequence] = deque()  # arrived, no slot yet
        self.running: list[ScheduledSequence] = []  # prefilled, one token per step
        self.prefilling: ScheduledSequence | None = None  # holds the prefill turn

    def add(self, sequence: ScheduledSequence) -> None:
        self.waiting.append(sequence)

    @property
    def idle(self) -> bool:
        return not (self.waiting or self.running or self.prefilling)

    def active(self) -> list[ScheduledSequence]:
        """The sequences holding a slot, as a new list (releasing one edits self.running)."""
        return self.running + ([self.prefilling] if self.prefilling is not None else [])

    def drop_aborted(self) -> list[ScheduledSequence]:
        """Forget sequences whose consumer left, releasing the ones holding a slot (returned)."""
        self.waiting = deque(s for s in self.waiting if not s.aborted)
        dropped = [s for s in self.active() if s.aborted]
        for sequence in dropped:
            self.release(sequence)
        return dropped

    def admit(self) -> None:
        """Give the oldest waiting sequence a slot and the prefill turn, if both are free."""
        if self.prefilling is None and self.waiting and len(self.running) < self.max_batch:
            sequence = self.waiting.popleft()
            sequence.slot = self.slots.allocate()
            self.prefilling = sequence

    def plan(self) -> StepPlan | None:
        """What the next step feeds, or None when no sequence holds a slot."""
        chunks = [self._chunk(sequence, 1) for sequence in self.running]
        if self.prefilling is not None:
            chunks.append(self._chunk(self.prefilling, self.prefill_chunk))
        return StepPlan(chunks, decoding=len(self.running)) if chunks else None

    @staticmethod
    def _chunk(sequence: ScheduledSequence, budget: int) -> Chunk:
        tokens = sequence.next_chunk(budget)
        return Chunk(sequence, tokens, start=sequence.computed,
                     at_end=sequence.computed + len(tokens) == sequence.length)

    def advance(self, plan: StepPlan) -> None:
        """Record that the step ran: its chunks are in the cache, and a prompt read to its end runs."""
        for chunk in plan.chunks:
            chunk.sequence.computed += len(chunk.tokens)
        if self.prefilling is not None and self.prefilling.prefilled:
            self.running.append(self.prefilling)
            self.prefilling = None

    def release(self, sequence: ScheduledSequence) -> None:
        """Take a sequence out of the schedule for good and free its slot."""
        sequence.finished = True
        if sequence is self.prefilling:
            self.prefilling = None
        elif sequence in self.running:
            self.running.remove(sequence)
        if sequence.slot is not None:
            self.slots.free(sequence.slot)
            sequence.slot = None

    def take_waiting(self) -> list[ScheduledSequence]:
        """Empty the waiting queue, returning what was in it (at shutdown, to fail it)."""
        waiting = list(self.waiting)
        self.waiting.clear()
        return waiting
