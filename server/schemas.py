"""Request and response bodies of the OpenAI-compatible routes, as pydantic models.

Requests accept what OpenAI's API accepts for these two routes, plus the sampling extras vLLM takes
(top_k, min_p, repetition_penalty, stop_token_ids, ignore_eos), so existing clients and their
`extra_body` work unchanged. Fields that change what is generated but that we do not implement
(logit_bias, tools, suffix ...) are declared so they can be refused with a 400 naming them, instead of
being silently ignored; unknown fields are ignored, as OpenAI-compatible servers do.

Limits: n <= MAX_CHOICES; chat top_logprobs and completions logprobs <= MAX_LOGPROBS (20). OpenAI caps
completions logprobs at 5; we take vLLM's 20 on both routes (one engine limit), so clients written
for vLLM work, as do the many scripts that send logprobs=10 to /v1/completions.

Scalar fields are strict (no "0.5" for a float, no true for an int): a string where a number belongs
is a client bug we report rather than guess at. Union-typed fields (prompt, stop, message content)
are checked by hand so the error names the field rather than every arm of the union.

Responses mirror OpenAI's shapes field for field, nulls included, because clients index into them.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator

from trellis_runtime.logprobs import MAX_LOGPROBS
from trellis_runtime.scheduler import DEFAULT_MAX_BATCH

# Choices per request. Each is its own engine request (own prefill and KV slot), so n is bounded by
# what one batch holds: the engine's default batch.
MAX_CHOICES = DEFAULT_MAX_BATCH



def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_stop(value: Any) -> Optional[list[str]]:
    """OpenAI takes one string or a list of strings; we always hand the engine a list."""
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return value
    raise ValueError("must be a string or a list of strings")


# --------------------------------------------------------------------------------------- requests


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: Optional[StrictBool] = False


class SamplingFields(BaseModel):
    """What both routes share: the model name, sampling knobs and streaming switches."""

    # Python's JSON reader takes NaN and Infinity; no sampling knob means anything with them.
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)

    model: Optional[str] = None  # None: the one model this server serves
    max_tokens: Optional[StrictInt] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    n: Optional[StrictInt] = Field(1, ge=1, le=MAX_CHOICES)
    stream: Optional[StrictBool] = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Any] = None
    seed: Optional[StrictInt] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    user: Optional[str] = None
    # vLLM's extras (sent by the openai client through extra_body).
    top_k: Optional[StrictInt] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    stop_token_ids: Optional[list[StrictInt]] = None
    ignore_eos: Optional[StrictBool] = None
    # Declared only to be refused when set (see unsupported()).
    logit_bias: Optional[dict[str, Any]] = None

    @field_validator("stop", mode="plain")
    @classmethod
    def _stop_list(cls, value: Any) -> Optional[list[str]]:
        return _check_stop(value)

    def unsupported(self) -> Optional[str]:
        """The first field set to a value this server cannot honour, or None."""
        if self.logit_bias:
            return "logit_bias"
        return None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def choices(self) -> int:
        return 1 if self.n is None else self.n


class CompletionRequest(SamplingFields):
    """POST /v1/completions. One prompt per request: text, a list of one text, or token ids."""

    prompt: Any
    # The logprobs of the chosen token and of the `logprobs` likeliest ones, at every position.
    logprobs: Optional[StrictInt] = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: Optional[StrictBool] = None  # the prompt comes first in the text (and its logprobs)
    suffix: Optional[str] = None
    best_of: Optional[StrictInt] = None

    @field_validator("prompt", mode="plain")
    @classmethod
    def _one_prompt(cls, value: Any) -> Union[str, list[int]]:
        """Batched prompts would need n-way responses; refuse them rather than answer only the first."""
        if isinstance(value, str):
            return value
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
            value = value[0]
            if isinstance(value, str):
                return value
        if isinstance(value, list) and value and all(_is_int(t) for t in value):
            return value
        raise ValueError("must be a string, a list of one string, or a non-empty list of token ids "
                         "(only one prompt per request is supported)")

    def unsupported(self) -> Optional[str]:
        if self.suffix:
            return "suffix"
        if self.best_of not in (None, 1, self.choices):  # best_of = n keeps every sample: no choice
            return "best_of"
        return super().unsupported()


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One turn. Content is a string or a list of text parts (joined, as the template sees text)."""

    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Any = None
    name: Optional[str] = None

    @field_validator("content", mode="plain")
    @classmethod
    def _text_only(cls, value: Any) -> Optional[str]:
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, list):
            parts = []
            for part in value:
                if not (isinstance(part, dict) and part.get("type") == "text"
                        and isinstance(part.get("text"), str)):
                    raise ValueError("only text content parts ({\"type\": \"text\", \"text\": ...}) "
                                     "are supported")
                parts.append(part["text"])
            return "".join(parts)
        raise ValueError("must be a string or a list of text parts")


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[StrictInt] = None
    logprobs: Optional[StrictBool] = None
    top_logprobs: Optional[StrictInt] = Field(None, ge=0, le=MAX_LOGPROBS)  # needs logprobs: true
    tools: Optional[list[Any]] = None
    tool_choice: Optional[Any] = None
    response_format: Optional[dict[str, Any]] = None

    def unsupported(self) -> Optional[str]:
        if self.tools:
            return "tools"
        if self.response_format and self.response_format.get("type") != "text":
            return "response_format"
        return super().unsupported()

    @property
    def token_limit(self) -> Optional[int]:
        """max_completion_tokens is OpenAI's newer name for max_tokens; it wins when both are sent."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# -------------------------------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> "Usage":
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


FinishReason = Optional[Literal["stop", "length"]]


class CompletionLogprobs(BaseModel):
    """The legacy completions shape: parallel lists, one entry per token of the choice's text."""

    tokens: list[str]
    token_logprobs: list[Optional[float]]  # null for the first prompt token (nothing to score it by)
    top_logprobs: list[Optional[dict[str, float]]]  # the likeliest tokens plus the chosen one
    text_offset: list[int]  # where each token starts in the choice's text, in characters


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: FinishReason = None


class _Envelope(BaseModel):
    """The fields every completion response and stream chunk starts with; `object` names the kind."""

    id: str
    object: str
    created: int
    model: str
    system_fingerprint: Optional[str] = None


class CompletionResponse(_Envelope):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None  # always set on full responses; null on stream chunks


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]]  # the token's UTF-8 bytes: joined, they rebuild split characters


class TokenLogprobEntry(TopLogprob):
    top_logprobs: list[TopLogprob]  # exactly top_logprobs of them, most likely first


class ChatLogprobs(BaseModel):
    content: Optional[list[TokenLogprobEntry]]


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: FinishReason = None


class ChatCompletionResponse(_Envelope):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: dict[str, str]  # {"role", "content"} first, {"content"} next, {} on the finishing chunk
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: FinishReason = None


class ChatCompletionChunk(_Envelope):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Optional[Usage] = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "trellis-runtime"
    max_model_len: int  # vLLM's name for the context length; clients use it to size prompts
    # This server's limits (extra fields, ignored by OpenAI clients; see the README).
    max_num_seqs: int  # requests decoded at once (vLLM's name)
    max_waiting: int  # requests that may wait for a slot; past them new requests get 429
    max_body_bytes: int  # largest request body; larger ones get 413


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
