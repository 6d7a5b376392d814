"""From a validated request body to what the engine takes: prompt token ids and SamplingParams.

Every check that depends on the model rather than on the JSON alone lives here (the model name, token
id range, chat template, context length), so that a request the engine would refuse is refused with a
400 before a response starts streaming, and every refusal names the field to fix.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Union

from server.errors import APIError
from server.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields
from trellis_runtime.sampling import SamplingParams

# OpenAI's default for /v1/completions; chat completions default to "until done or out of context".
COMPLETION_DEFAULT_MAX_TOKENS = 16

_PARAM_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}
# Request fields copied one-to-one onto SamplingParams when the client sets them.
_COPIED = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
           "frequency_penalty", "seed", "stop", "stop_token_ids", "ignore_eos")


def check_model(requested: Optional[str], served: str) -> None:
    """A wrong model name is a 404, as on OpenAI; leaving it out means the one model served."""
    if requested is not None and requested != served:
        raise APIError(f"The model `{requested}` does not exist. This server serves `{served}`.",
                       status=404, param="model", code="model_not_found")


def refuse_invalid_text(request: SamplingFields) -> None:
    """JSON may spell a lone UTF-16 surrogate (\\ud800); it is no Unicode character, so neither the
    tokenizer nor any answer that repeats the text could encode it. A 400 names the field."""
    param = _lone_surrogate(request.model_dump(), "")
    if param is not None:
        raise APIError(f"Invalid value for '{param}': the text holds a lone UTF-16 surrogate, "
                       f"which is not a Unicode character.", param=param)


def _lone_surrogate(value: Any, path: str) -> Optional[str]:
    """The path ("messages[0].content") of the first string in `value` that UTF-8 cannot encode."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    if isinstance(value, dict):
        items = ((f"{path}.{key}" if path else str(key), item) for key, item in value.items())
    elif isinstance(value, list):
        items = ((f"{path}[{index}]", item) for index, item in enumerate(value))
    else:
        return None
    return next((found for item_path, item in items
                 if (found := _lone_surrogate(item, item_path)) is not None), None)


def refuse_unsupported(request: SamplingFields) -> None:
    """Fields that would change the answer but that we cannot honour get a 400, not silence."""
    field = request.unsupported()
    if field is not None:
        value = getattr(request, field)
        raise APIError(f"'{field}'={value!r} is not supported by this server.", param=field)
    if request.stream_options is not None and not request.stream:
        raise APIError("'stream_options' is only allowed when 'stream' is true.",
                       param="stream_options")


def completion_prompt_ids(prompt: Union[str, list[int]], tokenizer: Any) -> list[int]:
    """Text is tokenized with the tokenizer's special tokens (BOS), as vLLM and llama-server do."""
    # Token ids are checked against the vocabulary by the engine (a 400 naming "prompt").
    ids = list(tokenizer.encode(prompt)) if isinstance(prompt, str) else list(prompt)
    if not ids:
        raise APIError("The prompt is empty.", param="prompt")
    return ids


def chat_prompt_ids(request: ChatCompletionRequest, tokenizer: Any) -> list[int]:
    """Render with the model's own chat template, then tokenize without adding specials again
    (the template already writes BOS where the model wants one)."""
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.content or ""}
                for m in request.messages]
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # no template, or the template itself rejects the conversation
        raise APIError(f"The chat template could not format these messages: {exc}",
                       param="messages") from exc
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    if not ids:
        raise APIError("The messages produce an empty prompt.", param="messages")
    return ids


def resolve_max_tokens(requested: Optional[int], default: Optional[int], prompt_tokens: int,
                       context_length: int, prompt_param: str, limit_param: str,
                       scoring: bool = False) -> Optional[int]:
    """The completion budget, or a 400 `context_length_exceeded` when prompt plus budget cannot fit.

    An explicit max_tokens beyond the room left is an error (the client asked for something
    impossible); the implicit default is shrunk to fit instead. When `scoring` (echo) a budget of 0
    is allowed: the prompt is only scored, and may then fill the whole context.
    """
    lowest = 0 if scoring else 1
    if requested is not None and requested < lowest:
        raise APIError(f"'{limit_param}' must be at least {lowest}, got {requested}.",
                       param=limit_param)
    room = context_length - prompt_tokens
    if room < (0 if requested == 0 else 1):
        raise APIError(f"This model's maximum context length is {context_length} tokens. However, "
                       f"your {prompt_param} has {prompt_tokens} tokens, leaving no room for a "
                       f"completion. Please reduce the length of the {prompt_param}.",
                       param=prompt_param, code="context_length_exceeded")
    if requested is None:
        return None if default is None else min(default, room)
    if requested > room:
        raise APIError(f"This model's maximum context length is {context_length} tokens. However, "
                       f"you requested {prompt_tokens + requested} tokens ({prompt_tokens} in the "
                       f"{prompt_param}, {requested} in the completion). Please reduce the length "
                       f"of the {prompt_param} or completion.",
                       param=limit_param, code="context_length_exceeded")
    return requested


def sampling_params(request: SamplingFields, max_tokens: Optional[int],
                    logprobs: Optional[int] = None,
                    prompt_logprobs: Optional[int] = None) -> SamplingParams:
    """Copy what the client set onto SamplingParams (unset fields keep the engine's defaults), then
    validate; its ValueError names the field first, which becomes the error's `param`."""
    values = {name: getattr(request, name) for name in _COPIED if getattr(request, name) is not None}
    params = SamplingParams(max_tokens=max_tokens, logprobs=logprobs,
                            prompt_logprobs=prompt_logprobs, **values)
    try:
        params.validate()
    except ValueError as exc:
        message = str(exc)
        field = message.split(" ", 1)[0]
        raise APIError(message, param=field if field in _PARAM_FIELDS else None) from exc
    return params


def completion_inputs(request: CompletionRequest, tokenizer: Any, context_length: int
                      ) -> tuple[list[int], SamplingParams]:
    ids = completion_prompt_ids(request.prompt, tokenizer)
    echo = bool(request.echo)
    budget = resolve_max_tokens(request.max_tokens, COMPLETION_DEFAULT_MAX_TOKENS, len(ids),
                                context_length, "prompt", "max_tokens", scoring=echo)
    # Echo with logprobs scores the prompt too: the harnesses' loglikelihood request.
    return ids, sampling_params(request, budget, logprobs=request.logprobs,
                                prompt_logprobs=request.logprobs if echo else None)


def chat_inputs(request: ChatCompletionRequest, tokenizer: Any, context_length: int
                ) -> tuple[list[int], SamplingParams]:
    if request.top_logprobs is not None and not request.logprobs:
        raise APIError("'top_logprobs' needs 'logprobs' set to true.", param="top_logprobs")
    ids = chat_prompt_ids(request, tokenizer)
    limit_param = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
    # Unset, a chat answer may run to the end of the context (OpenAI's and vLLM's behaviour).
    budget = resolve_max_tokens(request.token_limit, context_length, len(ids), context_length,
                                "messages", limit_param)
    logprobs = (request.top_logprobs or 0) if request.logprobs else None
    return ids, sampling_params(request, budget, logprobs=logprobs)
