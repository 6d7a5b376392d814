"""What /openapi.json declares beyond the request and response models: the error shape of every
status a route can answer with, and the event-stream alternative of the generation routes.

Routes return their JSONResponse directly, so these declarations document and never re-validate; the
schemathesis test holds them to what the server really sends.
"""

from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str]
    code: Optional[str]


class ErrorResponse(BaseModel):
    """OpenAI's error envelope, which every failure of this server uses."""

    error: ErrorDetail


def _error(description: str, retry_after: bool = False) -> dict[str, Any]:
    declared: dict[str, Any] = {"model": ErrorResponse, "description": description}
    if retry_after:
        declared["headers"] = {"Retry-After": {"description": "seconds to wait before retrying",
                                               "schema": {"type": "string"}}}
    return declared


# One server-sent event (OpenAPI before 3.2 describes each event of a stream with `schema`).
_SSE_EVENT = {
    "type": "object", "required": ["data"],
    "properties": {"data": {"type": "string", "description": "a JSON chunk (the route's response "
                            "shape with a delta), an in-band {\"error\": ...}, or [DONE] last"}}}

_UNAUTHORIZED = {401: _error("Missing or wrong API key (only when the server has one).")}
_DRAINING = {503: _error("The server is shutting down (draining) and takes no new requests.",
                         retry_after=True)}
_OTHER = {"4XX": _error("Any other client error: wrong method, unsupported media type...")}

MODELS_RESPONSES: dict[int | str, dict[str, Any]] = {**_UNAUTHORIZED, **_DRAINING, **_OTHER}
MODEL_RESPONSES: dict[int | str, dict[str, Any]] = {
    404: _error("The model id is not the one this server serves."), **MODELS_RESPONSES}
GENERATION_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "The whole answer as JSON, or with `stream: true` server-sent events "
                         "of chunks ending with `data: [DONE]`.",
          "content": {"text/event-stream": {"schema": _SSE_EVENT}}},
    400: _error("Invalid request, including prompts or max_tokens beyond the context "
                "(code context_length_exceeded)."),
    404: _error("Unknown model (code model_not_found)."),
    413: _error("The request body is larger than --max-body-bytes."),
    408: _error("The body was not received within --body-timeout (code request_timeout)."),
    429: _error("Too many requests waiting (--max-waiting).", retry_after=True),
    **_UNAUTHORIZED, **_DRAINING, **_OTHER}
PROBE_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: _error("Missing or wrong API key (only with --protect-probes).")}
READY_RESPONSES: dict[int | str, dict[str, Any]] = {
    503: _error("Not ready: the server is draining."), **PROBE_RESPONSES}
