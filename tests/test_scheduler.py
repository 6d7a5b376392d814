"""The scheduler on its own, without a model: admission, the prefill turn, the batch limit, chunked
prefill, aborts and releases, and the steps it plans for a few sequences generated to the end."""

from __future__ import annotations

import heapq

from trellis_runtime.scheduler import ScheduledSequence, Scheduler, StepPlan


class Slots:
    """The KV cache's slot bookkeeping (lowest free slot first), without the cache's tensors."""

    def __init__(self, count: int) -> None:
        self.free_slots = list(range(count))
        self.used: set[int] = set()

    def allocate(self) -> int:
        slot = heapq.heappop(self.free_slots)
        self.used.add(slot)
        return slot

    def free(self, slot: int) -> None:
        self.used.remove(slot)
        heapq.heappush(self.free_slots, slot)


def sequence(prompt_length: int, first_token: int = 0) -> ScheduledSequence:
    return ScheduledSequence(prompt_ids=list(range(first_token, first_token + prompt_length)))


def fed(plan: StepPlan) -> list[tuple[ScheduledSequence, list[int], int]]:
    """What a plan feeds: (sequence, tokens, first position) per chunk."""
    return [(chunk.sequence, chunk.tokens, chunk.start) for chunk in plan.chunks]


def step(scheduler: Scheduler, sampled: int = 7) -> StepPlan:
    """One engine step without the model: admit, plan, run (every chunk at the end of its sequence
    gets `sampled` as its next token), advance."""
    scheduler.drop_aborted()
    scheduler.admit()
    plan = scheduler.plan()
    assert plan is not None
    scheduler.advance(plan)
    for chunk in plan.chunks:
        if chunk.at_end:
            chunk.sequence.output_ids.append(sampled)
    return plan


def test_nothing_to_plan_when_idle() -> None:
    scheduler = Scheduler(Slots(2), max_batch=2, prefill_chunk=4)
    assert scheduler.idle and scheduler.plan() is None
    scheduler.add(sequence(3))
    assert not scheduler.idle
    assert scheduler.plan() is None  # waiting is not running: nothing holds a slot yet


def test_admission_in_arrival_order_one_prefill_at_a_time() -> None:
    slots = Slots(4)
    scheduler = Scheduler(slots, max_batch=4, prefill_chunk=16)
    first, second, third = sequence(3), sequence(2, 100), sequence(5, 200)
    for s in (first, second, third):
        scheduler.add(s)
    scheduler.admit()
    scheduler.admit()  # the prefill turn is taken: nobody else gets in
    assert scheduler.prefilling is first and first.slot == 0
    assert list(scheduler.waiting) == [second, third] and second.slot is None

    plan = step(scheduler)
    assert fed(plan) == [(first, [0, 1, 2], 0)] and plan.decoding == 0
    assert scheduler.running == [first] and scheduler.prefilling is None

    plan = step(scheduler)  # first decodes while second prefills, in one step
    assert fed(plan) == [(first, [7], 3), (second, [100, 101], 0)]
    assert plan.decoding == 1 and not plan.decode_only
    assert second.slot == 1

    plan = step(scheduler)
    assert fed(plan) == [(first, [7], 4), (second, [7], 2), (third, [200, 201, 202, 203, 204], 0)]
    assert [c.at_end for c in plan.chunks] == [True, True, True]
    plan = step(scheduler)
    assert plan.decode_only and plan.decoding == 3 and slots.used == {0, 1, 2}


def test_chunked_prefill_feeds_the_prompt_in_order_and_samples_at_its_end() -> None:
    scheduler = Scheduler(Slots(1), max_batch=1, prefill_chunk=4)
    long = sequence(10)
    scheduler.add(long)
    plans = [step(scheduler) for _ in range(4)]
    assert [fed(p) for p in plans] == [[(long, [0, 1, 2, 3], 0)], [(long, [4, 5, 6, 7], 4)],
                                       [(long, [8, 9], 8)], [(long, [7], 10)]]
    assert [p.chunks[0].at_end for p in plans] == [False, False, True, True]
    assert [list(p.chunks[0].positions) for p in plans[1:3]] == [[4, 5, 6, 7], [8, 9]]
    assert long.output_ids == [7, 7] and long.computed == 11


def test_the_batch_limit_holds_arrivals_back_until_a_release_frees_a_slot() -> None:
    slots = Slots(2)
    scheduler = Scheduler(slots, max_batch=2, prefill_chunk=8)
    sequences = [sequence(2, 10 * i) for i in range(3)]
    for s in sequences:
        scheduler.add(s)
    for _ in range(4):
        step(scheduler)
    assert scheduler.running == sequences[:2] and list(scheduler.waiting) == sequences[2:]
    assert step(scheduler).decoding == 2 and sequences[2].slot is None

    scheduler.release(sequences[0])
    assert sequences[0].finished and sequences[0].slot is None and slots.used == {1}
    assert scheduler.running == [sequences[1]]
    plan = step(scheduler)
    assert sequences[2].slot == 0  # the freed slot
    assert fed(plan) == [(sequences[1], [7], 5), (sequences[2], [20, 21], 0)]


def test_release_of_the_prefilling_sequence_frees_the_turn() -> None:
    slots = Slots(2)
    scheduler = Scheduler(slots, max_batch=2, prefill_chunk=2)
    long, short = sequence(6), sequence(1, 50)
    scheduler.add(long)
    scheduler.add(short)
    step(scheduler)
    assert scheduler.prefilling is long
    scheduler.release(long)
    assert scheduler.prefilling is None and slots.used == set()
    assert fed(step(scheduler)) == [(short, [50], 0)]


def test_aborted_sequences_leave_before_the_step_waiting_or_running() -> None:
    slots = Slots(3)
    scheduler = Scheduler(slots, max_batch=3, prefill_chunk=8)
    running, prefilling, waiting = sequence(2), sequence(9, 100), sequence(3, 200)
    scheduler.add(running)
    step(scheduler)
    scheduler.add(prefilling)
    scheduler.add(waiting)
    scheduler.admit()
    assert scheduler.prefilling is prefilling and slots.used == {0, 1}

    for s in (running, prefilling, waiting):
        s.aborted = True
    assert scheduler.drop_aborted() == [running, prefilling]  # the ones that held a slot
    assert scheduler.idle and slots.used == set()
    assert all(s.finished for s in (running, prefilling)) and not waiting.finished
    assert scheduler.plan() is None


def test_an_aborted_waiter_does_not_take_a_slot() -> None:
    slots = Slots(1)
    scheduler = Scheduler(slots, max_batch=1, prefill_chunk=8)
    gone, next_one = sequence(2), sequence(2, 30)
    scheduler.add(gone)
    scheduler.add(next_one)
    gone.aborted = True
    assert fed(step(scheduler)) == [(next_one, [30, 31], 0)] and gone.slot is None


def test_take_waiting_empties_the_queue_and_active_lists_slot_holders() -> None:
    scheduler = Scheduler(Slots(2), max_batch=2, prefill_chunk=1)
    first, second, third = sequence(1), sequence(3, 10), sequence(1, 20)
    for s in (first, second, third):
        scheduler.add(s)
    step(scheduler)
    step(scheduler)
    assert scheduler.active() == [first, second]  # running, then prefilling
    assert scheduler.take_waiting() == [third] and not scheduler.waiting


def test_a_sequence_generated_to_the_end_feeds_each_sampled_token_once() -> None:
    """The prompt, then every sampled token, each fed once at the next position."""
    scheduler = Scheduler(Slots(1), max_batch=1, prefill_chunk=3)
    s = sequence(5)
    scheduler.add(s)
    tokens: list[int] = []
    positions: list[int] = []
    for token in range(100, 106):
        [chunk] = step(scheduler, sampled=token).chunks
        assert chunk.sequence is s
        tokens += chunk.tokens
        positions += chunk.positions
    # Two prompt chunks (the first ends mid-prompt: nothing sampled), then four decode steps.
    assert tokens == [0, 1, 2, 3, 4, 101, 102, 103, 104]
    assert positions == list(range(9))
    assert s.output_ids == [101, 102, 103, 104, 105] and s.computed == 9
