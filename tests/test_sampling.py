"""The sampler against straightforward per-row reference implementations, on small logits tensors."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from trellis_runtime.sampling import (SamplingParams, apply_penalties, filtered_probabilities,
                                      sample)


@dataclass
class Row:
    params: SamplingParams
    prompt_ids: list[int] = field(default_factory=list)
    output_ids: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        self.generator = self.params.make_generator(torch.device("cpu"))


@pytest.mark.parametrize("field_name, value", [
    ("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1), ("min_p", 1.1),
    ("min_p", -0.1), ("repetition_penalty", 0.0), ("presence_penalty", 2.5),
    ("frequency_penalty", -3.0), ("max_tokens", -1), ("stop", [""]), ("stop_token_ids", [-1]),
])
def test_validate_names_the_bad_field(field_name: str, value) -> None:
    params = SamplingParams(**{field_name: value})
    with pytest.raises(ValueError) as info:
        params.validate()
    message = str(info.value)
    assert message.startswith(field_name) and "\n" not in message


def test_defaults_are_valid() -> None:
    SamplingParams().validate()
    SamplingParams(temperature=0, top_p=1, top_k=0, min_p=1, max_tokens=None, seed=-5).validate()


def test_greedy_rows_are_exact_argmax_next_to_sampled_rows() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    rows = [Row(SamplingParams(temperature=0.0 if i % 2 == 0 else 1.5)) for i in range(6)]
    tokens = sample(logits, rows)
    assert tokens.dtype == torch.int64 and tokens.shape == (6,)
    assert torch.equal(tokens[::2], logits[::2].argmax(dim=-1))


def test_top_k_1_equals_greedy() -> None:
    torch.manual_seed(1)
    logits = torch.randn(8, 1000)
    rows = [Row(SamplingParams(temperature=1.3, top_k=1)) for _ in range(8)]
    assert torch.equal(sample(logits, rows), logits.argmax(dim=-1))


def test_seeded_rows_do_not_depend_on_the_batch() -> None:
    torch.manual_seed(2)
    logits = torch.randn(1, 500)
    alone = [sample(logits, [row]).item()
             for row in [Row(SamplingParams(seed=7))] for _ in range(20)]
    row = Row(SamplingParams(seed=7))
    others = [Row(SamplingParams(seed=8)), Row(SamplingParams(temperature=0.7)),
              Row(SamplingParams(top_p=0.5))]
    batched = []
    for step in range(20):
        crowd = others[:step % 4]  # the batch grows and shrinks around the seeded row
        batch = torch.cat([torch.randn(len(crowd), 500), logits])
        batched.append(sample(batch, crowd + [row])[-1].item())
    assert alone == batched
    different = Row(SamplingParams(seed=8))
    assert [sample(logits, [different]).item() for _ in range(20)] != alone


def test_choices_get_their_own_reproducible_seeds() -> None:
    """Choice i of a seeded request draws with seed + i: choice 0 is the n=1 answer, the others differ."""
    torch.manual_seed(5)
    logits = torch.randn(1, 500)
    params = SamplingParams(seed=41, logprobs=2)

    def draws(p: SamplingParams) -> list[int]:
        row = Row(p)
        return [sample(logits, [row]).item() for _ in range(12)]

    choices = [params.for_choice(i) for i in range(3)]
    assert [c.seed for c in choices] == [41, 42, 43] and choices[2].logprobs == 2
    assert draws(choices[0]) == draws(params) and draws(choices[2]) == draws(SamplingParams(seed=43))
    assert len({tuple(draws(c)) for c in choices}) == 3
    assert SamplingParams().for_choice(5).seed is None


def test_samples_follow_the_filtered_distribution() -> None:
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    params = SamplingParams(temperature=0.8)
    draws = 40000
    tokens = sample(logits.expand(draws, 5), [Row(params) for _ in range(draws)])
    frequencies = torch.bincount(tokens, minlength=5).float() / draws
    assert torch.allclose(frequencies, (logits / 0.8).softmax(-1), atol=0.01)


def reference_penalties(logits: torch.Tensor, row: Row) -> torch.Tensor:
    """One token at a time, as the Hugging Face and OpenAI documentation describe them."""
    out = logits.clone()
    p = row.params
    for token in set(row.prompt_ids) | set(row.output_ids):
        value = out[token]
        out[token] = value / p.repetition_penalty if value > 0 else value * p.repetition_penalty
    for token in set(row.output_ids):
        count = row.output_ids.count(token)
        out[token] -= p.frequency_penalty * count + p.presence_penalty
    return out


def test_penalties_match_the_reference() -> None:
    torch.manual_seed(3)
    logits = torch.randn(4, 20) * 3
    rows = [
        Row(SamplingParams(repetition_penalty=1.5), prompt_ids=[0, 1, 2, 2], output_ids=[3, 4, 4]),
        Row(SamplingParams(frequency_penalty=0.5), prompt_ids=[5], output_ids=[6, 6, 6, 7]),
        Row(SamplingParams(presence_penalty=-1.0), prompt_ids=[8], output_ids=[9, 9, 10]),
        Row(SamplingParams(repetition_penalty=0.8, frequency_penalty=1.0, presence_penalty=0.5),
            prompt_ids=[11, 12], output_ids=[12, 13, 13]),
    ]
    got = apply_penalties(logits, rows)
    for i, row in enumerate(rows):
        assert torch.allclose(got[i], reference_penalties(logits[i], row)), i


def test_repetition_penalty_makes_seen_tokens_less_likely_either_sign() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    row = Row(SamplingParams(repetition_penalty=2.0), prompt_ids=[0], output_ids=[1])
    assert apply_penalties(logits, [row]).tolist() == [[1.0, -4.0, 1.0]]


def test_penalties_steer_greedy_choice() -> None:
    logits = torch.tensor([[3.0, 2.5, 0.0]])
    row = Row(SamplingParams(temperature=0, frequency_penalty=0.4), output_ids=[0, 0])
    assert sample(logits, [row]).item() == 1


def reference_filter(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    probs = (logits / p.temperature).softmax(-1)
    probs = torch.where(probs < p.min_p * probs.max(), 0.0, probs)
    order = probs.argsort(descending=True).tolist()
    keep = order[:p.top_k] if p.top_k else order
    keep = [t for t in keep if probs[t] > 0]
    mass = sum(probs[t].item() for t in keep)
    kept, total = [], 0.0
    for t in keep:  # the smallest prefix of the ranking whose renormalised mass reaches top_p
        kept.append(t)
        total += probs[t].item() / mass
        if total >= p.top_p:
            break
    out = torch.zeros_like(probs)
    out[kept] = probs[kept]
    return out / out.sum()


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0, top_k=3),
    SamplingParams(temperature=0.5, top_p=0.6),
    SamplingParams(temperature=2.0, min_p=0.3),
    SamplingParams(temperature=1.0, top_k=5, top_p=0.7, min_p=0.05),
])
def test_filters_match_the_reference(params: SamplingParams) -> None:
    torch.manual_seed(4)
    logits = torch.randn(3, 12)
    rows = [Row(params), Row(SamplingParams()), Row(params)]
    got = filtered_probabilities(logits, rows)
    for i in (0, 2):
        assert torch.allclose(got[i], reference_filter(logits[i], params), atol=1e-6)
    assert torch.allclose(got[1], logits[1].softmax(-1), atol=1e-6)  # neighbours are untouched
