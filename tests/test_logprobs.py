"""Logprobs from the engine against a float64 recomputation from the model's own logits.

The reference runs the runtime model once over the whole text (prompt + generated tokens), teacher
forced, and takes log_softmax of its logits in float64. The engine gets there another way: chunked
prefill, one-token decode steps in a batch, float32 log_softmax. Both use the same float32 weights, so
they differ only by float32 rounding: logprobs here are about -11, where one float32 ulp is ~1e-6, and
the measured difference is ~1e-6. TOLERANCE leaves 50x headroom for another BLAS's summation order and is
still far below what a real mistake costs on this model (scoring the neighbouring position, or applying
temperature or penalties, moves a logprob by 0.05 or more; the tests check that too).
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from trellis_runtime.engine import Engine, Output
from trellis_runtime.logprobs import MAX_LOGPROBS, TokenLogprob, token_logprobs
from trellis_runtime.sampling import SamplingParams

TOLERANCE = 5e-5
MAX_SEQ_LEN = 96
PROMPT = [7000, 42, 9, 123, 4567, 89, 10, 31, 2718, 2818, 4590, 45, 235, 360, 28, 747, 135, 266, 24, 977]


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint_dir: Path):
    from trellis_runtime.model import load_model

    return load_model(tiny_checkpoint_dir, "cpu")


@pytest.fixture(scope="module")
def engine(loaded):
    model, tokenizer = loaded
    # A small prefill chunk, so prompt scoring crosses chunk boundaries.
    with Engine(model, tokenizer, max_batch=4, max_seq_len=MAX_SEQ_LEN, prefill_chunk=7) as engine:
        yield engine


def reference_logprobs(model, ids: list[int]) -> torch.Tensor:
    """(len(ids), vocab) float64 log-softmax of one teacher-forced forward over `ids`."""
    cache = model.new_cache(1, MAX_SEQ_LEN)
    slot = cache.allocate()
    with torch.inference_mode():
        logits = model(torch.tensor(ids), torch.arange(len(ids)), torch.full((len(ids),), slot), cache)
    return logits.double().log_softmax(dim=-1)


def assert_matches(scored: TokenLogprob, reference_row: torch.Tensor, top: int) -> None:
    """One position: the token's logprob and its top list against the reference row."""
    assert scored.logprob == pytest.approx(reference_row[scored.token_id].item(), abs=TOLERANCE)
    assert len(scored.top) == top
    expected = reference_row.topk(top)
    assert [t for t, _ in scored.top] == expected.indices.tolist()
    assert [v for _, v in scored.top] == pytest.approx(expected.values.tolist(), abs=TOLERANCE)
    values = [v for _, v in scored.top]
    assert values == sorted(values, reverse=True)
    if scored.token_id in dict(scored.top):  # the same tensor element: exactly equal
        assert dict(scored.top)[scored.token_id] == scored.logprob
    elif top:
        assert scored.logprob <= values[-1]


# ------------------------------------------------------------------------------------ token_logprobs


def test_token_logprobs_against_float64() -> None:
    torch.manual_seed(0)
    logits = torch.randn(5, 300) * 4
    ids = [3, 17, 250, 0, 299]
    counts = [0, 1, 5, 20, 3]
    scored = token_logprobs(logits, ids, counts)
    reference = logits.double().log_softmax(dim=-1)
    for row, (item, token, count) in enumerate(zip(scored, ids, counts)):
        assert item.token_id == token
        assert_matches(item, reference[row], count)
    assert token_logprobs(logits[:0], [], []) == []


# ------------------------------------------------------------------------------------ the engine


def generate(engine: Engine, prompt: list[int], params: SamplingParams) -> Output:
    return engine.generate_text(prompt, params)


def test_greedy_logprobs_equal_reference_and_top1_is_the_token(engine: Engine, loaded) -> None:
    model, _ = loaded
    out = generate(engine, PROMPT, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True,
                                                  logprobs=5))
    assert out.prompt_logprobs is None and len(out.logprobs) == len(out.token_ids) == 8
    reference = reference_logprobs(model, PROMPT + out.token_ids)
    for j, scored in enumerate(out.logprobs):
        assert scored.token_id == out.token_ids[j]
        assert_matches(scored, reference[len(PROMPT) - 1 + j], 5)
        assert scored.top[0] == (scored.token_id, scored.logprob)  # greedy: the token is the top-1


def test_sampled_logprobs_are_of_the_raw_logits(engine: Engine, loaded) -> None:
    """Temperature and penalties shape the draw, not the reported numbers."""
    model, _ = loaded
    params = SamplingParams(temperature=1.7, top_k=50, repetition_penalty=1.3, presence_penalty=1.0,
                            seed=11, max_tokens=10, ignore_eos=True, logprobs=MAX_LOGPROBS)
    out = generate(engine, PROMPT, params)
    reference = reference_logprobs(model, PROMPT + out.token_ids)
    rows = reference[len(PROMPT) - 1:-1]
    for j, scored in enumerate(out.logprobs):
        assert_matches(scored, rows[j], MAX_LOGPROBS)
    tempered = (rows / 1.7).log_softmax(dim=-1)  # rows are the logits up to a per-row constant
    chosen = torch.tensor(out.token_ids)[:, None]
    gap = (tempered.gather(1, chosen) - rows.gather(1, chosen)).abs().max().item()
    assert gap > 1000 * TOLERANCE, "temperature would go unnoticed by this test"
    without = generate(engine, PROMPT, replace(params, logprobs=None))
    assert without.token_ids == out.token_ids and without.logprobs is None  # logprobs change nothing


def test_prompt_logprobs_equal_teacher_forced_forward(engine: Engine, loaded) -> None:
    """Prompt scoring across prefill chunks of 7 tokens, next to a generation."""
    model, _ = loaded
    out = generate(engine, PROMPT, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True,
                                                  logprobs=2, prompt_logprobs=4))
    assert [p.token_id for p in out.prompt_logprobs] == PROMPT[1:]
    reference = reference_logprobs(model, PROMPT + out.token_ids)
    for j, scored in enumerate(out.prompt_logprobs):
        assert_matches(scored, reference[j], 4)
    shifted = reference[1:len(PROMPT)].gather(1, torch.tensor(PROMPT[1:])[:, None])[:, 0]
    exact = torch.tensor([p.logprob for p in out.prompt_logprobs], dtype=torch.float64)
    assert (shifted - exact).abs().max().item() > 1000 * TOLERANCE, "an off-by-one would pass"


def test_scoring_only_with_max_tokens_zero(engine: Engine, loaded) -> None:
    """max_tokens=0: the prompt is scored and nothing is generated, even at the context limit."""
    model, _ = loaded
    out = generate(engine, PROMPT, SamplingParams(max_tokens=0, prompt_logprobs=0, logprobs=1))
    assert out.token_ids == [] and out.logprobs == [] and out.text == ""
    assert out.finish_reason == "length" and out.completion_tokens == 0
    reference = reference_logprobs(model, PROMPT)
    assert [p.top for p in out.prompt_logprobs] == [()] * (len(PROMPT) - 1)
    for j, scored in enumerate(out.prompt_logprobs):
        assert scored.logprob == pytest.approx(reference[j, PROMPT[j + 1]].item(), abs=TOLERANCE)

    full = [(5 * i) % 49000 + 11 for i in range(MAX_SEQ_LEN)]
    whole = generate(engine, full, SamplingParams(max_tokens=0, prompt_logprobs=1))
    assert len(whole.prompt_logprobs) == MAX_SEQ_LEN - 1 and whole.completion_tokens == 0
    assert math.isfinite(sum(p.logprob for p in whole.prompt_logprobs))
    assert engine.stats()["kv_cache_usage"] == 0


def test_batched_logprobs_match_alone(engine: Engine) -> None:
    """A request's logprobs do not depend on what shares its steps."""
    import asyncio

    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3,
                            prompt_logprobs=2)
    alone = generate(engine, PROMPT, params)

    async def crowd() -> list[list[Output]]:
        async def run(prompt, p):
            return [o async for o in engine.generate(prompt, p)]
        return await asyncio.gather(run([5, 6, 7], SamplingParams(max_tokens=9, ignore_eos=True)),
                                    run(PROMPT, params),
                                    run(PROMPT[:9], SamplingParams(max_tokens=0, prompt_logprobs=5)))

    _, together, _ = asyncio.run(crowd())
    assert [t for o in together for t in o.token_ids] == alone.token_ids
    assert together[0].prompt_logprobs is not None
    assert all(o.prompt_logprobs is None for o in together[1:])
    pairs = list(zip(together[0].prompt_logprobs, alone.prompt_logprobs))
    pairs += list(zip([lp for o in together for lp in o.logprobs], alone.logprobs))
    for a, b in pairs:
        assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob, abs=TOLERANCE)
        assert [t for t, _ in a.top] == [t for t, _ in b.top]


def test_no_logprobs_unless_asked(engine: Engine) -> None:
    out = generate(engine, PROMPT, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    assert out.logprobs is None and out.prompt_logprobs is None


def test_logprob_counts_are_validated() -> None:
    for name in ("logprobs", "prompt_logprobs"):
        for bad in (-1, MAX_LOGPROBS + 1):
            with pytest.raises(ValueError, match=f"^{name} "):
                SamplingParams(**{name: bad}).validate()
        SamplingParams(**{name: MAX_LOGPROBS}).validate()
