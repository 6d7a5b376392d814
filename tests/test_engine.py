"""The engine on the real tiny checkpoint: exact greedy decoding, batching, finishing, cancelling."""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from trellis_runtime.engine import ContextLengthError, Engine, EngineError, Output
from trellis_runtime.openmp import release_workers
from trellis_runtime.sampling import SamplingParams

MAX_SEQ_LEN = 128
PROMPTS = [[1, 2, 3, 4, 5], [100, 200, 300], [7000, 42, 9, 123, 4567, 89, 10], [31]]


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint_dir: Path):
    from trellis_runtime.model import load_model

    return load_model(tiny_checkpoint_dir, "cpu")


@pytest.fixture
def engine(loaded):
    model, tokenizer = loaded
    with Engine(model, tokenizer, max_batch=4, max_seq_len=MAX_SEQ_LEN) as engine:
        yield engine


def greedy(max_tokens: int, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kwargs)


def reference_greedy(model, prompt: list[int], steps: int) -> list[int]:
    """Decode without the engine: prefill, then one token at a time, argmax of the model's logits."""
    cache = model.new_cache(1, MAX_SEQ_LEN)
    slot = cache.allocate()
    tokens = list(prompt)
    with torch.inference_mode():
        feed, start = tokens, 0
        for _ in range(steps):
            n = len(feed)
            logits = model(torch.tensor(feed), torch.arange(start, start + n), torch.full((n,), slot),
                           cache, logits_for=torch.tensor([n - 1]))
            tokens.append(int(logits[0].argmax()))
            feed, start = tokens[-1:], len(tokens) - 1
    return tokens[len(prompt):]


async def collect(engine: Engine, prompt: list[int], params: SamplingParams) -> list[Output]:
    return [out async for out in engine.generate(prompt, params)]


def run_all(engine: Engine, requests: list[tuple[list[int], SamplingParams]]) -> list[list[Output]]:
    async def main():
        return await asyncio.gather(*(collect(engine, p, s) for p, s in requests))
    return asyncio.run(main())


def tokens_of(outputs: list[Output]) -> list[int]:
    return [t for out in outputs for t in out.token_ids]


def wait_until_idle(engine: Engine) -> dict:
    for _ in range(200):
        stats = engine.stats()
        if stats["running"] == 0 and stats["waiting"] == 0:
            return stats
        time.sleep(0.01)
    return engine.stats()


def test_greedy_equals_reference_decode(engine: Engine, loaded) -> None:
    model, _ = loaded
    [outputs] = run_all(engine, [(PROMPTS[2], greedy(12))])
    assert tokens_of(outputs) == reference_greedy(model, PROMPTS[2], 12)
    assert [len(out.token_ids) for out in outputs] == [1] * 12
    assert outputs[-1].finish_reason == "length" and outputs[-1].completion_tokens == 12
    assert outputs[-1].prompt_tokens == len(PROMPTS[2])
    assert all(out.finish_reason is None for out in outputs[:-1])


def test_concurrent_requests_are_batched_and_match_solo(engine: Engine, loaded) -> None:
    model, _ = loaded
    results = run_all(engine, [(prompt, greedy(10)) for prompt in PROMPTS])
    for prompt, outputs in zip(PROMPTS, results):
        assert tokens_of(outputs) == reference_greedy(model, prompt, 10)
    stats = wait_until_idle(engine)
    assert stats["max_batch_seen"] > 1 and stats["kv_cache_usage"] == 0


def test_more_requests_than_slots_queue_and_finish(engine: Engine) -> None:
    requests = [([5 + i, 6, 7], greedy(4)) for i in range(9)]  # 9 requests, 4 slots
    results = run_all(engine, requests)
    assert all(outputs[-1].finish_reason == "length" for outputs in results)
    assert engine.stats()["max_batch_seen"] <= 4


def test_chunked_prefill_matches_whole_prefill(loaded) -> None:
    model, tokenizer = loaded
    prompt = list(range(1000, 1050))
    with Engine(model, tokenizer, max_batch=2, max_seq_len=MAX_SEQ_LEN, prefill_chunk=8) as engine:
        [outputs] = run_all(engine, [(prompt, greedy(5))])
    assert tokens_of(outputs) == reference_greedy(model, prompt, 5)


def test_top_k_1_equals_greedy(engine: Engine) -> None:
    results = run_all(engine, [(PROMPTS[0], greedy(8)),
                               (PROMPTS[0], SamplingParams(temperature=1.5, top_k=1, max_tokens=8,
                                                           ignore_eos=True))])
    assert tokens_of(results[0]) == tokens_of(results[1])


def test_seed_reproducible_alone_and_batched(engine: Engine) -> None:
    def seeded(seed: int) -> SamplingParams:
        return SamplingParams(temperature=1.0, seed=seed, max_tokens=8, ignore_eos=True)

    [alone] = run_all(engine, [(PROMPTS[0], seeded(1234))])
    crowd = run_all(engine, [(PROMPTS[1], seeded(5)), (PROMPTS[0], seeded(1234)),
                             (PROMPTS[2], SamplingParams(temperature=0.9, max_tokens=8)),
                             (PROMPTS[0], seeded(99))])
    assert tokens_of(crowd[1]) == tokens_of(alone)
    assert tokens_of(crowd[3]) != tokens_of(alone)


def test_stop_token_ids_and_eos_finish_with_stop(engine: Engine, loaded) -> None:
    model, tokenizer = loaded
    reference = reference_greedy(model, PROMPTS[1], 10)
    target = reference[4]
    cut = reference.index(target) + 1
    [outputs] = run_all(engine, [(PROMPTS[1], greedy(10, stop_token_ids=[target]))])
    assert tokens_of(outputs) == reference[:cut]
    assert outputs[-1].finish_reason == "stop" and outputs[-1].completion_tokens == cut
    # The stop token's own text is not part of the output.
    assert "".join(o.text for o in outputs) == tokenizer.decode(reference[:cut - 1])

    with Engine(model, tokenizer, max_batch=1, max_seq_len=MAX_SEQ_LEN,
                eos_token_ids=[target]) as eos_engine:
        stopped = eos_engine.generate_text(PROMPTS[1], SamplingParams(temperature=0, max_tokens=10))
        ignored = eos_engine.generate_text(PROMPTS[1], greedy(10))
    assert stopped.token_ids == reference[:cut] and stopped.finish_reason == "stop"
    assert ignored.token_ids == reference and ignored.finish_reason == "length"


def test_generate_text_is_the_stream_joined(engine: Engine) -> None:
    params = SamplingParams(temperature=1.0, seed=11, max_tokens=6, ignore_eos=True, logprobs=2)
    [streamed] = run_all(engine, [(PROMPTS[2], params)])
    whole = engine.generate_text(PROMPTS[2], params)
    assert whole.text == "".join(out.text for out in streamed)
    assert whole.token_ids == tokens_of(streamed) and len(whole.token_ids) == 6
    assert whole.logprobs == [lp for out in streamed for lp in out.logprobs]
    assert (whole.finish_reason, whole.prompt_tokens, whole.completion_tokens) == ("length", 7, 6)
    assert whole.prompt_logprobs is None
    assert engine.generate_text(PROMPTS[2], replace(params, logprobs=None)).logprobs is None


def test_stop_string_split_across_tokens(engine: Engine) -> None:
    # Seeded sampling: varied, reproducible text (the random model's greedy text repeats one word).
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=16, ignore_eos=True)
    [full] = run_all(engine, [(PROMPTS[3], params)])
    pieces = [out.text for out in full]
    text = "".join(pieces)
    # A stop string from the middle of one token's text to the middle of the next one's, occurring
    # there first.
    for k in range(1, len(pieces) - 1):
        start = len("".join(pieces[:k])) + 1
        stop = pieces[k][1:] + pieces[k + 1][:2]
        if len(pieces[k]) >= 2 and len(pieces[k + 1]) >= 3 and text.index(stop) == start:
            break
    else:
        pytest.fail(f"no usable stop string in {pieces}")
    [outputs] = run_all(engine, [(PROMPTS[3], replace(params, stop=["zzz-never", stop]))])
    streamed = [out.text for out in outputs]
    assert "".join(streamed) == text[:start]
    assert outputs[-1].finish_reason == "stop" and stop not in "".join(streamed)
    assert len(outputs) == k + 2  # it ended with the token that completed the stop string
    assert streamed[k] == pieces[k][:1] and streamed[k + 1] == ""  # held back, then cut


def test_context_limit_finishes_with_length(engine: Engine) -> None:
    prompt = list(range(10, 10 + MAX_SEQ_LEN - 3))
    [outputs] = run_all(engine, [(prompt, SamplingParams(temperature=0, max_tokens=None,
                                                         ignore_eos=True))])
    assert outputs[-1].finish_reason == "length" and outputs[-1].completion_tokens == 3


def test_context_length_error_before_anything_runs(engine: Engine) -> None:
    with pytest.raises(ContextLengthError) as info:
        engine.generate(list(range(MAX_SEQ_LEN)), SamplingParams())
    assert "\n" not in str(info.value) and str(MAX_SEQ_LEN) in str(info.value)
    with pytest.raises(ValueError, match="max_tokens"):
        engine.generate([1] * 100, SamplingParams(max_tokens=MAX_SEQ_LEN))
    with pytest.raises(ValueError, match="top_p"):
        engine.generate([1], SamplingParams(top_p=0))
    assert engine.stats()["waiting"] == 0


def test_aclose_and_cancel_free_the_slot(engine: Engine) -> None:
    long = SamplingParams(temperature=0, max_tokens=MAX_SEQ_LEN - 10, ignore_eos=True)

    async def leave_early() -> None:
        stream = engine.generate(PROMPTS[0], long)
        await stream.__anext__()
        await stream.__anext__()
        assert engine.stats()["kv_cache_usage"] > 0
        await stream.aclose()

    async def cancelled() -> None:
        started = asyncio.Event()

        async def consume() -> None:
            async for _ in engine.generate(PROMPTS[1], long):
                started.set()

        task = asyncio.create_task(consume())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    for scenario in (leave_early, cancelled):
        asyncio.run(scenario())
        stats = wait_until_idle(engine)
        assert stats["running"] == 0 and stats["kv_cache_usage"] == 0, scenario.__name__
        assert stats["decode_steps"] < MAX_SEQ_LEN // 2  # it stopped long before max_tokens
    assert engine.generate_text(PROMPTS[0], greedy(3)).finish_reason == "length"  # still serving


def test_failed_step_fails_its_requests_and_the_engine_recovers(engine: Engine) -> None:
    real = engine.model
    calls = 0

    def failing_once(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("simulated device fault")
        return real(*args, **kwargs)

    engine.model = failing_once
    with pytest.raises(EngineError, match="simulated device fault"):
        engine.generate_text(PROMPTS[0], greedy(3))
    assert engine.stats()["kv_cache_usage"] == 0
    assert engine.generate_text(PROMPTS[0], greedy(3)).completion_tokens == 3


def test_shutdown_fails_waiting_requests(loaded) -> None:
    model, tokenizer = loaded
    engine = Engine(model, tokenizer, max_batch=1, max_seq_len=MAX_SEQ_LEN).start()

    async def main() -> None:
        stream = engine.generate(PROMPTS[0], greedy(MAX_SEQ_LEN - 10))
        await stream.__anext__()
        engine.shutdown()
        with pytest.raises(EngineError):
            async for _ in stream:
                pass

    asyncio.run(main())
    with pytest.raises(EngineError):
        engine.generate(PROMPTS[0], greedy(1))


def test_alive_follows_the_loop_thread(loaded) -> None:
    """What a replica's health check reads: true only while the loop runs and takes requests."""
    model, tokenizer = loaded
    engine = Engine(model, tokenizer, max_batch=1, max_seq_len=MAX_SEQ_LEN)
    assert not engine.alive
    engine.start()
    assert engine.alive
    engine.shutdown()
    assert not engine.alive


def test_a_running_step_is_timed(engine: Engine) -> None:
    """What a replica's health check reads to tell a hung forward from a busy one."""
    real = engine.model
    inside: list[float] = []

    def slow(*args, **kwargs):
        time.sleep(0.3)
        inside.append(engine.step_running_for)
        return real(*args, **kwargs)

    assert engine.step_running_for == 0
    engine.model = slow
    engine.generate_text(PROMPTS[0], greedy(2))
    assert inside and min(inside) >= 0.3
    assert engine.step_running_for == 0


def thread_count() -> int:
    """This process's threads, once threads that were told to exit have gone (the count holds for
    0.2 s, or 5 s pass)."""
    deadline, last, held = time.monotonic() + 5, -1, 0
    while held < 10 and time.monotonic() < deadline:
        count = len(os.listdir("/proc/self/task"))
        held = held + 1 if count == last else 0
        last = count
        time.sleep(0.02)
    return last


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux's /proc")
def test_start_gives_back_the_callers_openmp_workers(loaded) -> None:
    """A parallel region on this thread leaves OpenMP workers behind; starting a CPU engine frees
    them (trellis_runtime/openmp.py), so the engine's thread holds the only pool."""
    model, tokenizer = loaded
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        release_workers()  # whatever earlier tests left
        before = thread_count()
        torch.randn(4_000_000).sum()  # a parallel region on this thread: one more worker
        with_workers = thread_count()
        engine = Engine(model, tokenizer, max_batch=1, max_seq_len=MAX_SEQ_LEN)
        engine.start()  # the engine's own thread: one more
        try:
            assert with_workers == before + 1 and thread_count() == with_workers
        finally:
            engine.shutdown()
    finally:
        torch.set_num_threads(threads)
