"""Sampling parameters and the batched sampler that turns a step's logits into next tokens.

Semantics follow vLLM, which most OpenAI-compatible clients are tuned against:
- penalties act on the raw logits, before temperature: repetition_penalty (CTRL / Hugging Face: divide a
  positive logit, multiply a negative one, for every token seen in prompt or output), then
  frequency_penalty and presence_penalty (OpenAI: subtract penalty x count, and penalty once, for tokens
  of the output only);
- greedy rows (temperature 0) take the exact argmax of the penalized logits;
- other rows: temperature, then min_p, then top_k, then top_p on what top_k kept, then a draw.

The draw is argmax(p / q) with q ~ Exp(1) per token, which samples exactly from p (the exponential race).
A request with a seed draws its noise from its own generator, one vocab-sized vector per step, so its
tokens do not depend on which other requests share the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Protocol, Sequence

import torch

from trellis_runtime.logprobs import MAX_LOGPROBS

# Temperatures below this are treated as greedy: dividing by them overflows for no visible difference.
GREEDY_TEMPERATURE = 1e-5
PENALTY_RANGE = 2.0  # OpenAI's documented bound on presence_penalty and frequency_penalty


@dataclass
class SamplingParams:
    """One request's decoding settings. Call validate() on anything that came from a user."""

    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus mass kept, in (0, 1]; 1 = off
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    min_p: float = 0.0  # drop tokens below min_p x the top probability; 0 = off
    repetition_penalty: float = 1.0  # > 0; 1 = off
    presence_penalty: float = 0.0  # in [-2, 2]
    frequency_penalty: float = 0.0  # in [-2, 2]
    seed: int | None = None
    max_tokens: int | None = 16  # None = until a stop condition or the context limit; 0 = score only
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    # Report each generated token's logprob and this many likeliest alternatives; None = off.
    logprobs: int | None = None
    # The same for every prompt token after the first (each scored given the ones before); None = off.
    prompt_logprobs: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def penalized(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)

    def validate(self) -> None:
        """Raise ValueError with a one-line message naming the first bad field."""
        checks = [
            ("temperature", self.temperature >= 0, "must be >= 0"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("top_k", self.top_k >= 0, "must be >= 0 (0 disables it)"),
            ("min_p", 0 <= self.min_p <= 1, "must be in [0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0, "must be > 0"),
            ("presence_penalty", abs(self.presence_penalty) <= PENALTY_RANGE,
             f"must be in [-{PENALTY_RANGE:g}, {PENALTY_RANGE:g}]"),
            ("frequency_penalty", abs(self.frequency_penalty) <= PENALTY_RANGE,
             f"must be in [-{PENALTY_RANGE:g}, {PENALTY_RANGE:g}]"),
            ("max_tokens", self.max_tokens is None or self.max_tokens >= 0, "must be >= 0"),
            ("stop", all(isinstance(s, str) and s for s in self.stop),
             "must be a list of non-empty strings"),
            ("stop_token_ids", all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
             "must be a list of non-negative integers"),
            ("logprobs", _count_or_none(self.logprobs), f"must be in [0, {MAX_LOGPROBS}] or None"),
            ("prompt_logprobs", _count_or_none(self.prompt_logprobs),
             f"must be in [0, {MAX_LOGPROBS}] or None"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(f"{name} {rule}, got {getattr(self, name)!r}")

    def for_choice(self, index: int) -> "SamplingParams":
        """The settings of choice `index` of an n-choice request: its own sample, reproducibly.

        A seeded request gives choice i the seed seed + i (vLLM's rule), so choice 0 is exactly the
        answer the same request with n=1 gets, and every choice is reproducible on its own.
        """
        return replace(self, seed=None if self.seed is None else self.seed + index)

    def make_generator(self, device: torch.device) -> torch.Generator | None:
        """The request's own random stream, or None to share the global one (unseeded requests)."""
        if self.seed is None:
            return None
        # Any integer is a valid OpenAI seed; torch accepts 64-bit unsigned ones.
        return torch.Generator(device=device).manual_seed(self.seed % 2**64)


def _count_or_none(value: int | None) -> bool:
    return value is None or (isinstance(value, int) and 0 <= value <= MAX_LOGPROBS)


class SamplingRow(Protocol):
    """What the sampler needs to know about one sequence of the batch."""

    params: SamplingParams
    generator: torch.Generator | None
    prompt_ids: list[int]
    output_ids: list[int]


def sample(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Next token ids (B,) int64 for logits (B, vocab), row i decoded with rows[i]'s settings."""
    logits = logits.float()
    if any(row.params.penalized for row in rows):
        logits = apply_penalties(logits, rows)
    greedy = torch.tensor([row.params.greedy for row in rows], device=logits.device)
    chosen = logits.argmax(dim=-1)
    if bool(greedy.all()):
        return chosen
    probs = filtered_probabilities(logits, rows)
    return torch.where(greedy, chosen, _draw(probs, rows))


def apply_penalties(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Repetition penalty on prompt+output tokens, then frequency and presence on output tokens."""
    batch, vocab = logits.shape
    device = logits.device
    counts = torch.zeros(batch, vocab, device=device)  # occurrences in the output
    seen = torch.zeros(batch, vocab, dtype=torch.bool, device=device)  # in prompt or output
    for i, row in enumerate(rows):
        output = torch.tensor(row.output_ids, dtype=torch.int64, device=device)
        counts[i].index_add_(0, output, torch.ones_like(output, dtype=counts.dtype))
        seen[i, torch.tensor(row.prompt_ids, dtype=torch.int64, device=device)] = True
    seen |= counts > 0

    def column(name: str) -> torch.Tensor:
        return torch.tensor([getattr(row.params, name) for row in rows], device=device)[:, None]

    repetition = column("repetition_penalty")
    penalized = torch.where(logits > 0, logits / repetition, logits * repetition)
    logits = torch.where(seen, penalized, logits)
    logits = logits - column("frequency_penalty") * counts
    return logits - column("presence_penalty") * (counts > 0).float()


def filtered_probabilities(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Probabilities after temperature, min_p, top_k and top_p; greedy rows get temperature 1."""
    device = logits.device
    temperature = torch.tensor([1.0 if row.params.greedy else row.params.temperature for row in rows],
                               device=device)
    probs = (logits / temperature[:, None]).softmax(dim=-1)
    if any(row.params.min_p > 0 for row in rows):
        min_p = torch.tensor([row.params.min_p for row in rows], device=device)
        floor = min_p[:, None] * probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(probs < floor, 0.0)
    if any(row.params.top_k > 0 or row.params.top_p < 1 for row in rows):
        probs = _top_k_top_p(probs, rows)
    return probs / probs.sum(dim=-1, keepdim=True)


def _top_k_top_p(probs: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Zero all but each row's top_k most likely tokens, then all but the smallest set of those whose
    mass reaches top_p. Done in sorted order so both limits are one vectorised mask."""
    batch, vocab = probs.shape
    device = probs.device
    top_k = torch.tensor([min(row.params.top_k or vocab, vocab) for row in rows], device=device)
    top_p = torch.tensor([row.params.top_p for row in rows], device=device)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=device).expand(batch, vocab)
    sorted_probs = sorted_probs.masked_fill(ranks >= top_k[:, None], 0.0)
    kept = sorted_probs / sorted_probs.sum(dim=-1, keepdim=True)
    # A token goes when the more likely ones already reach top_p; the most likely always stays. Rows
    # with top_p = 1 are exempt, or rounding in the cumulative sum could drop their rarest tokens.
    beyond = (kept.cumsum(dim=-1) - kept > top_p[:, None]) & (top_p[:, None] < 1)
    sorted_probs = sorted_probs.masked_fill(beyond, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)


def _draw(probs: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """One sample per row via the exponential race; seeded rows use their own generator."""
    noise = torch.empty_like(probs).exponential_()
    for i, row in enumerate(rows):
        if row.generator is not None:
            noise[i].exponential_(generator=row.generator)
    # A zero draw would make 0/0 = NaN, which argmax prefers over everything.
    return (probs / noise.clamp_min_(torch.finfo(noise.dtype).tiny)).argmax(dim=-1)
