"""How one choice reads in each route's response: whole (a non-streamed response) or as the chunks
of a stream, with its logprobs when the request asked for them.

The engine's news for a choice arrives as ChoiceOutputs (see server.streaming.start); a non-streamed
request gathers each choice's Outputs into an OutputAccumulator first (the engine's own, as
Engine.generate_text uses). ChatChoices and CompletionChoices render both
forms the same way, so a streamed answer joins to exactly the non-streamed one: text, logprobs and text
offsets included.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from server.logprobs import (CompletionLogprobsWriter, Position, TokenText, chat_logprobs,
                             generated_positions, prompt_positions)
from server.schemas import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatLogprobs,
                            CompletionChoice, CompletionLogprobs)
from trellis_runtime.logprobs import TokenLogprob
from trellis_runtime.outputs import Output, OutputAccumulator


@dataclass(frozen=True)
class ChoiceOutput:
    """One engine Output of one choice, as the request's merged stream carries it."""

    index: int  # the choice
    output: Output  # as the engine sent it: its finish_reason and completion_tokens are this choice's
    completion_tokens: int  # the whole request's so far, every choice together (what usage reports)


class ChatChoices:
    """Chat: a message, or deltas after a first chunk that names the role."""

    def __init__(self, vocab: TokenText) -> None:
        self.vocab = vocab

    def whole(self, index: int, answer: OutputAccumulator) -> ChatChoice:
        return ChatChoice(index=index, message=AssistantMessage(content=answer.text),
                          logprobs=self._logprobs(answer.logprobs),
                          finish_reason=answer.finish_reason)

    def opening(self, index: int) -> list[ChatChunkChoice]:
        return [ChatChunkChoice(index=index, delta={"role": "assistant", "content": ""})]

    def chunks(self, choice: ChoiceOutput) -> list[ChatChunkChoice]:
        """A content chunk when there is text or a token to score (a token whose text is held back,
        or a stop token, still has its logprob), then the finishing chunk."""
        chunks, output = [], choice.output
        if output.text or output.logprobs:
            chunks.append(ChatChunkChoice(index=choice.index, delta={"content": output.text},
                                          logprobs=self._logprobs(output.logprobs)))
        if output.finish_reason is not None:
            chunks.append(ChatChunkChoice(index=choice.index, delta={},
                                          finish_reason=output.finish_reason))
        return chunks

    def _logprobs(self, scored: Optional[list[TokenLogprob]]) -> Optional[ChatLogprobs]:
        return None if scored is None else chat_logprobs(self.vocab, scored)


class CompletionChoices:
    """Completions: text, with the prompt first under echo; streamed, the echo is the first chunk."""

    def __init__(self, vocab: TokenText, echo: Optional[str], prompt_ids: list[int]) -> None:
        self.vocab = vocab
        self.echo = echo  # the prompt text when echoing, else None
        self.prompt_ids = prompt_ids
        self.writers: dict[int, CompletionLogprobsWriter] = {}  # per streamed choice: text offsets run on

    def whole(self, index: int, answer: OutputAccumulator) -> CompletionChoice:
        logprobs = None
        if answer.logprobs is not None:
            logprobs = CompletionLogprobsWriter(self.vocab).write(
                self._echoed(answer.prompt_logprobs) + generated_positions(answer.logprobs))
        return CompletionChoice(index=index, text=(self.echo or "") + answer.text, logprobs=logprobs,
                                finish_reason=answer.finish_reason)

    def opening(self, index: int) -> list[CompletionChoice]:
        return []

    def chunks(self, choice: ChoiceOutput) -> list[CompletionChoice]:
        chunks, output, index = [], choice.output, choice.index
        first = index not in self.writers
        writer = self.writers.setdefault(index, CompletionLogprobsWriter(self.vocab))
        if first and self.echo is not None:
            echoed = self._echoed(output.prompt_logprobs)
            chunks.append(CompletionChoice(index=index, text=self.echo,
                                           logprobs=writer.write(echoed) if echoed else None))
        if output.text or output.logprobs:
            chunks.append(CompletionChoice(index=index, text=output.text,
                                           logprobs=self._write(writer, output.logprobs)))
        if output.finish_reason is not None:
            chunks.append(CompletionChoice(index=index, text="", finish_reason=output.finish_reason))
        return chunks

    def _echoed(self, prompt_logprobs: Optional[list[TokenLogprob]]) -> list[Position]:
        """The prompt's positions, when echoing with logprobs (the engine then scored the prompt)."""
        if self.echo is None or prompt_logprobs is None:
            return []
        return prompt_positions(self.prompt_ids, prompt_logprobs)

    @staticmethod
    def _write(writer: CompletionLogprobsWriter, scored: Optional[list[TokenLogprob]]
               ) -> Optional[CompletionLogprobs]:
        return None if scored is None else writer.write(generated_positions(scored))
