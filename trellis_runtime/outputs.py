"""What the engine hands back for a request, and how its sampled tokens become that.

A request streams Outputs, one per sampled token: the token, the new text (detokenized incrementally,
held back while a multi-byte character or a possible stop string is incomplete), its logprob when
asked for, and on the last one why it finished: "stop" (a stop token or string) or "length" (max_tokens
or the context). A stop token's own text is not output, nor is a stop string.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from trellis_runtime.detokenize import TextStream
from trellis_runtime.logprobs import TokenLogprob
from trellis_runtime.sampling import SamplingParams
from trellis_runtime.scheduler import ScheduledSequence


@dataclass
class Output:
    """One step's news for a request; the last one has a finish_reason."""

    text: str  # new text since the previous Output (may be "" while a character or stop is pending)
    token_ids: list[int]  # new token ids
    finish_reason: str | None  # None while running, then "stop" or "length"
    prompt_tokens: int
    completion_tokens: int  # generated so far, including token_ids
    # One per token_ids entry when the request asked for logprobs, else None.
    logprobs: list[TokenLogprob] | None = None
    # On a request's first Output, when it asked for prompt_logprobs: prompt tokens 1.. (the first
    # token has no context to be scored in), else None.
    prompt_logprobs: list[TokenLogprob] | None = None


@dataclass(eq=False, kw_only=True)
class Request(ScheduledSequence):
    """A request as the engine's loop sees it: its place in the schedule, and what it generates by.
    prompt_logprobs and the scheduler's fields belong to the loop thread."""

    request_id: str
    params: SamplingParams
    generator: torch.Generator | None
    stop_ids: frozenset[int]  # stop_token_ids, plus EOS unless ignore_eos
    stream: TextStream
    emit: Callable[[Output | BaseException], None]
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # scored so far, while prefilling

    def append(self, token: int, logprob: TokenLogprob | None, max_seq_len: int) -> Output:
        """Record a sampled token and stream its text; the Output says whether a limit finished it."""
        self.output_ids.append(token)
        if token in self.stop_ids:
            text, reason = self.stream.finish().text, "stop"  # a stop token's own text is not output
        else:
            delta = self.stream.push(token)
            text, reason = delta.text, "stop" if delta.stopped else None
            at_limit = len(self.output_ids) == self.params.max_tokens or self.length >= max_seq_len
            if reason is None and at_limit:
                rest = self.stream.finish()
                text, reason = text + rest.text, "stop" if rest.stopped else "length"
        first = len(self.output_ids) == 1
        return Output(text, [token], reason, len(self.prompt_ids), len(self.output_ids),
                      None if logprob is None else [logprob],
                      self._reported_prompt_logprobs() if first else None)

    def scored(self) -> Output:
        """The only Output of a request with max_tokens 0: its prompt scored, nothing generated."""
        return Output("", [], "length", len(self.prompt_ids), 0,
                      None if self.params.logprobs is None else [], self._reported_prompt_logprobs())

    def deliver(self, item: Output | BaseException) -> None:
        """Hand an Output (or the error that ends the request) to its consumer."""
        try:
            self.emit(item)
        except RuntimeError:  # the consumer's event loop is closed: nobody is listening
            self.aborted = True

    def _reported_prompt_logprobs(self) -> list[TokenLogprob] | None:
        """What a request's first Output carries about its prompt: the scores, if it asked for them."""
        return None if self.params.prompt_logprobs is None else self.prompt_logprobs


@dataclass
class OutputAccumulator:
    """A request's Outputs joined into its whole answer: what Engine.generate_text returns, and what the
    server renders for each choice of a response that is not streamed."""

    pieces: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None  # None unless the request asked for logprobs
    prompt_logprobs: list[TokenLogprob] | None = None

    def add(self, output: Output) -> None:
        self.pieces.append(output.text)
        self.token_ids += output.token_ids
        self.finish_reason = output.finish_reason or self.finish_reason
        self.prompt_tokens = output.prompt_tokens
        self.completion_tokens = output.completion_tokens
        if output.logprobs is not None:
            self.logprobs = self.logprobs if self.logprobs is not None else []
            self.logprobs += output.logprobs
        if output.prompt_logprobs is not None:  # carried by the first Output only
            self.prompt_logprobs = output.prompt_logprobs

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def output(self) -> Output:
        """The whole answer as one Output."""
        return Output(self.text, self.token_ids, self.finish_reason, self.prompt_tokens,
                      self.completion_tokens, self.logprobs, self.prompt_logprobs)
