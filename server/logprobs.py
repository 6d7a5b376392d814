"""The engine's logprobs in OpenAI's two response shapes, with every token's text and raw bytes.

Chat: `choices[].logprobs.content[]` items {token, logprob, bytes, top_logprobs: [{token, logprob,
bytes}]}, with exactly `top_logprobs` alternatives, most likely first.
Completions (the legacy shape): `choices[].logprobs = {tokens, token_logprobs, top_logprobs,
text_offset}`, parallel lists; each top_logprobs entry maps the `logprobs` likeliest tokens, plus the
chosen one, to their logprobs (so up to logprobs + 1 entries, as OpenAI documents). With echo the
prompt's tokens come first, the very first with nulls, since nothing precedes it to score it by.

Every generated token is listed, the stop token that ended a choice included (its text is not in the
content), so a choice has as many entries as usage counts completion tokens, as with vLLM. The numbers
are the model's raw log-softmax (see trellis_runtime.logprobs).

A token's bytes are its own, read from the vocabulary, so that tokens holding part of a UTF-8 character
(byte-level BPE splits emoji and CJK) join back into the exact text; decoding such a token alone gives
U+FFFD. Its `token` string is those bytes decoded, with U+FFFD for a partial character; text_offset
counts the characters of whole characters before the token.
"""

from __future__ import annotations

import codecs
import json
import re
from typing import Any, Optional, Sequence

from server.schemas import ChatLogprobs, CompletionLogprobs, TokenLogprobEntry, TopLogprob
from trellis_runtime.logprobs import TokenLogprob

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece byte fallback spelling
_SPACE = "\u2581"  # SentencePiece's visible space, "▁"


def _byte_level_spelling() -> dict[str, int]:
    """Byte-level BPE (GPT-2, Llama 3, SmolLM) writes each byte as one printable character: the
    printable Latin-1 bytes as themselves, the other 68 as U+0100 onwards, in byte order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in set(printable)]
    spelling = {chr(b): b for b in printable}
    spelling.update({chr(0x100 + i): b for i, b in enumerate(others)})
    return spelling


def _decoder_types(tokenizer: Any) -> set[str]:
    """The kinds of decoding step the tokenizer's backend applies ("ByteLevel", "ByteFallback"...)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return set()
    types: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            types.add(str(node.get("type")))
            for child in node.get("decoders") or []:
                walk(child)

    walk(json.loads(backend.to_str()).get("decoder"))
    return types


class TokenText:
    """Each token's bytes and display string, from the tokenizer's vocabulary; cached per token."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        types = _decoder_types(tokenizer)
        self.byte_level = _byte_level_spelling() if "ByteLevel" in types else None
        self.byte_fallback = "ByteFallback" in types
        added = getattr(tokenizer, "added_tokens_decoder", {})
        self.added = {int(i): getattr(t, "content", str(t)) for i, t in added.items()}
        self._bytes: dict[int, bytes] = {}

    def bytes(self, token_id: int) -> bytes:
        found = self._bytes.get(token_id)
        if found is None:
            found = self._bytes[token_id] = self._read(token_id)
        return found

    def text(self, token_id: int) -> str:
        return self.bytes(token_id).decode("utf-8", errors="replace")

    def _read(self, token_id: int) -> bytes:
        if token_id in self.added:  # special and added tokens are spelled as their text
            return self.added[token_id].encode()
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if self.byte_level is not None and all(ch in self.byte_level for ch in piece):
            return bytes(self.byte_level[ch] for ch in piece)
        if self.byte_fallback:
            byte = _BYTE_TOKEN.fullmatch(piece)
            return bytes([int(byte.group(1), 16)]) if byte else piece.replace(_SPACE, " ").encode()
        return self.tokenizer.decode([token_id]).encode()  # no vocabulary spelling we know

    def top_entry(self, token_id: int, logprob: float) -> TopLogprob:
        raw = self.bytes(token_id)
        return TopLogprob(token=self.text(token_id), logprob=logprob, bytes=list(raw))


def chat_logprobs(vocab: TokenText, scored: Sequence[TokenLogprob]) -> ChatLogprobs:
    return ChatLogprobs(content=[
        TokenLogprobEntry(**vocab.top_entry(s.token_id, s.logprob).model_dump(),
                          top_logprobs=[vocab.top_entry(t, v) for t, v in s.top])
        for s in scored])


Position = tuple[int, Optional[TokenLogprob]]  # a token of the text, and its score if it has one


def prompt_positions(prompt_ids: Sequence[int], scored: Sequence[TokenLogprob]) -> list[Position]:
    """The echoed prompt: its first token unscored, then the engine's prompt_logprobs."""
    return [(prompt_ids[0], None)] + [(s.token_id, s) for s in scored]


def generated_positions(scored: Sequence[TokenLogprob]) -> list[Position]:
    return [(s.token_id, s) for s in scored]


class CompletionLogprobsWriter:
    """One choice's logprobs in the completions shape, written in pieces (the echoed prompt, then
    each stream chunk) whose text offsets run on from piece to piece."""

    def __init__(self, vocab: TokenText) -> None:
        self.vocab = vocab
        self.offset = 0
        self.chars = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def write(self, positions: Sequence[Position]) -> CompletionLogprobs:
        out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
        for token_id, scored in positions:
            out.tokens.append(self.vocab.text(token_id))
            out.text_offset.append(self.offset)
            self.offset += len(self.chars.decode(self.vocab.bytes(token_id)))
            if scored is None:
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
                continue
            out.token_logprobs.append(scored.logprob)
            top = {self.vocab.text(t): v for t, v in scored.top}
            top.setdefault(self.vocab.text(token_id), scored.logprob)
            out.top_logprobs.append(top)
        return out
