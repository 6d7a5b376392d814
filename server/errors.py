"""Every failure leaves the server in OpenAI's error shape: {"error": {message, type, param, code}}.

openai-python (and every client modelled on it) turns the status into a typed exception and reads
error.type / .param / .code, so the shape must hold for our own refusals, for FastAPI's validation
errors (whose default is 422 {"detail": [...]}), for malformed JSON, for unknown routes and for bugs.
Bad input is always a 4xx; 500 is reserved for faults of ours and never carries a traceback (it is
sent by server.access_log, which sees every exception no handler here took).
`code` is a string or null, as OpenAI sends it (vLLM's integer codes break clients that switch on it).
"""

from __future__ import annotations

import json
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Send

# The OpenAI `type` that goes with each status we send.
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 408: "invalid_request_error",
          413: "invalid_request_error", 415: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
          500: "server_error", 503: "service_unavailable_error"}


class APIError(Exception):
    """A refusal we decided on; raised anywhere in a route, rendered by the handler below."""

    def __init__(self, message: str, status: int = 400, param: Optional[str] = None,
                 code: Optional[str] = None, type: Optional[str] = None,
                 headers: Optional[dict[str, str]] = None) -> None:
        super().__init__(message)
        self.message, self.status, self.param, self.code = message, status, param, code
        self.type = type or _TYPES.get(status, "invalid_request_error")
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: Optional[str] = None,
               code: Optional[str] = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


async def send_error(send: Send, error: APIError) -> None:
    """Answer with `error` straight from ASGI middleware, which runs outside FastAPI's handlers."""
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in (error.headers or {}).items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def field_path(loc: tuple[Any, ...]) -> Optional[str]:
    """("body", "messages", 0, "content") -> "messages[0].content", the path a client can find."""
    path = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or None


def _validation_error(exc: RequestValidationError) -> APIError:
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request", "type": ""}
    if first.get("type") == "json_invalid":
        return APIError(f"The request body is not valid JSON: {first.get('ctx', {}).get('error', '')}"
                        .rstrip(": "))
    param = field_path(tuple(first.get("loc", ())))
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if param is None:  # the body as a whole: empty, or not an object
        return APIError(f"The request body must be a JSON object: {message}")
    return APIError(f"Invalid value for '{param}': {message}", param=param)


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers that turn every exception class we can meet into the OpenAI shape."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        error = _validation_error(exc)
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Routing failures (404 unknown path, 405 wrong method) come through here.
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        type = _TYPES.get(exc.status_code, "server_error" if exc.status_code >= 500
                          else "invalid_request_error")
        return JSONResponse(error_body(message, type), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))
