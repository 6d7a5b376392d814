"""Timing of one generation request as its tokens leave the engine: what the metrics and the access
log report (time to first token, gaps between tokens, token counts, how it ended).

`traced` wraps the engine's output stream without changing it; the record is complete when the stream
is closed, which the server does on every path (end, error, client gone).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Optional

from server.choices import ChoiceOutput


@dataclass
class Trace:
    started: float = field(default_factory=time.perf_counter)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token_at: Optional[float] = None
    last_token_at: Optional[float] = None
    ended_at: Optional[float] = None
    finish_reason: Optional[str] = None  # "stop" or "length"; None if it ended early (abort)
    token_gaps: list[float] = field(default_factory=list)  # seconds between consecutive tokens

    @property
    def time_to_first_token(self) -> Optional[float]:
        return None if self.first_token_at is None else self.first_token_at - self.started

    @property
    def duration(self) -> Optional[float]:
        return None if self.ended_at is None else self.ended_at - self.started

    def observe(self, choice: ChoiceOutput) -> None:
        """Account for one choice's engine Output; completion_tokens is the whole request's."""
        output = choice.output
        now = time.perf_counter()
        tokens = len(output.token_ids)
        if tokens:
            if self.last_token_at is None:
                self.first_token_at = now
            else:  # several tokens in one output share its gap
                self.token_gaps += [(now - self.last_token_at) / tokens] * tokens
            self.last_token_at = now
        self.prompt_tokens = output.prompt_tokens
        self.completion_tokens = choice.completion_tokens
        self.finish_reason = output.finish_reason or self.finish_reason


async def traced(outputs: AsyncIterator[ChoiceOutput], trace: Trace,
                 on_end: Callable[[Trace], None]) -> AsyncIterator[ChoiceOutput]:
    """Yield the engine's outputs unchanged, timing each; call on_end once when the stream closes."""
    try:
        async for output in outputs:
            trace.observe(output)
            yield output
    finally:
        trace.ended_at = time.perf_counter()
        try:
            await outputs.aclose()  # type: ignore[attr-defined]
        finally:
            on_end(trace)
