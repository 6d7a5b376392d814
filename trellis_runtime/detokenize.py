"""Turning generated token ids into streamed text: incremental decoding and stop strings.

Two things make this more than `tokenizer.decode(new_id)`:
- a character can span several tokens (byte-level BPE splits emoji and CJK into byte tokens), so a token
  alone may decode to U+FFFD; and a token's text can depend on its neighbours (spaces, merges). So we
  decode a short window of recent tokens and emit only what the window adds, holding back while its
  tail is an incomplete character (the approach of TGI and vLLM);
- a stop string can arrive split across tokens, and must not reach the client at all. So text that could
  still become the start of a stop string is held back until the next tokens decide it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

REPLACEMENT_CHAR = "\ufffd"  # what a tokenizer decodes an incomplete UTF-8 sequence to
PROMPT_CONTEXT_TOKENS = 5  # prompt tokens decoded with the first outputs, as vLLM does, for spacing


class IncrementalDetokenizer:
    """Yields the text each new token adds, never a broken character."""

    def __init__(self, tokenizer, prompt_ids: Sequence[int], skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:])
        # ids[prefix:read] were already turned into text; ids[read:] are waiting for a full character.
        self.prefix = 0
        self.read = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """The text that `token_id` completes; "" while a character is still incomplete."""
        self.ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """Whatever is still held back, at the end of generation (a broken tail stays U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        known = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        if len(text) <= len(known) or (text.endswith(REPLACEMENT_CHAR) and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(known):]


class StopStringFilter:
    """Cuts text at the first stop string, holding back any tail that may begin one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = list(stops)
        self.pending = ""  # received but not yet released

    def push(self, text: str) -> tuple[str, bool]:
        """(text safe to release, whether a stop string ended generation)."""
        self.pending += text
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            released, self.pending = self.pending[:cut], ""
            return released, True
        hold = self._partial_stop_length()
        released = self.pending[:len(self.pending) - hold]
        self.pending = self.pending[len(released):]
        return released, False

    def flush(self) -> str:
        """At the end of generation a partial stop string is just text."""
        released, self.pending = self.pending, ""
        return released

    def _partial_stop_length(self) -> int:
        """Length of the longest tail of `pending` that is a proper prefix of some stop string."""
        for length in range(min(len(self.pending), max(map(len, self.stops), default=1) - 1), 0, -1):
            tail = self.pending[-length:]
            if any(stop.startswith(tail) for stop in self.stops):
                return length
        return 0


@dataclass
class TextDelta:
    text: str
    stopped: bool  # a stop string was found; `text` ends just before it


class TextStream:
    """One sequence's output text: incremental detokenization followed by stop-string filtering."""

    def __init__(self, tokenizer, prompt_ids: Sequence[int], stops: Sequence[str]) -> None:
        self.detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
        self.stops = StopStringFilter(stops)

    def push(self, token_id: int) -> TextDelta:
        text, stopped = self.stops.push(self.detokenizer.push(token_id))
        return TextDelta(text, stopped)

    def finish(self) -> TextDelta:
        """The held-back remainder when generation ends for another reason (EOS, length)."""
        text, stopped = self.stops.push(self.detokenizer.flush())
        return TextDelta(text if stopped else text + self.stops.flush(), stopped)
