"""One structured line per request on the `trellis.access` logger, and the X-Request-Id header.

The outermost middleware: it sees every answer, including the refusals of the middlewares inside it
(401, 408, 413, 429, 503), and turns an unhandled error into the 500 in OpenAI's shape, so the log
and the request counters miss nothing. A client's X-Request-Id (a
short token of safe characters) is kept, otherwise one is made; either way it is echoed on the
response and is the `request_id` of the log line, so one request can be followed from a gateway's
logs into ours. Generation routes leave a Trace in the request state; its token counts and time to
first token join the line.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from typing import Any, Callable, Optional, Sequence

from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import APIError, send_error
from server.trace import Trace

access_log = logging.getLogger("trellis.access")
log = logging.getLogger("trellis.server")
REQUEST_ID_HEADER = b"x-request-id"
_SAFE_ID = re.compile(rb"[A-Za-z0-9._:\-]{1,128}")
# The key under which a route leaves its Trace in the ASGI scope's state (request.state.trace).
TRACE_KEY = "trace"


def request_id_from(headers: dict[bytes, bytes]) -> str:
    given = headers.get(REQUEST_ID_HEADER)
    return given.decode() if given is not None and _SAFE_ID.fullmatch(given) else uuid.uuid4().hex


def route_template(routes: Sequence[BaseRoute], scope: Scope) -> str:
    """The path template that serves `scope` ("/v1/models/{model_id:path}"), so metric labels stay
    few whatever paths clients send; "unmatched" for anything no route serves."""
    for route in routes:
        match, _ = route.matches(scope)
        if match == Match.FULL:
            return getattr(route, "path", "unmatched") or "/"
    return "unmatched"


class AccessLogMiddleware:
    def __init__(self, app: ASGIApp, routes: Sequence[BaseRoute], enabled: bool,
                 count: Callable[[str, str, int], None]) -> None:
        """`count(endpoint, method, status)` is called once per answered request."""
        self.app = app
        self.routes = routes
        self.enabled = enabled
        self.count = count

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        endpoint = route_template(self.routes, scope)  # before routing rewrites the scope
        request_id = request_id_from(dict(scope["headers"]))
        state = scope.setdefault("state", {})
        status: Optional[int] = None

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []),
                                      (REQUEST_ID_HEADER, request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            if status is not None:
                raise  # the answer has begun; the server can only close the connection
            # Answered here rather than by Starlette's outermost handler, so that the 500 carries
            # the request id and is logged and counted as a 500.
            log.exception("unhandled error while serving a request")
            await send_error(send_with_id, APIError(
                "The server had an error while processing the request.", status=500))
        finally:
            # No status: the client left before an answer began (nginx's 499).
            final = 499 if status is None else status
            self.count(endpoint, scope["method"], final)
            if self.enabled:
                self._log(request_id, scope, final, time.perf_counter() - started,
                          state.get(TRACE_KEY))

    @staticmethod
    def _log(request_id: str, scope: Scope, status: int, seconds: float,
             trace: Optional[Trace]) -> None:
        line: dict[str, Any] = {"request_id": request_id, "method": scope["method"],
                                "path": scope["path"], "status": status,
                                "prompt_tokens": None, "completion_tokens": None,
                                "ttft_s": None, "duration_s": round(seconds, 6)}
        if trace is not None:
            ttft = trace.time_to_first_token
            line.update(prompt_tokens=trace.prompt_tokens,
                        completion_tokens=trace.completion_tokens,
                        ttft_s=None if ttft is None else round(ttft, 6))
        access_log.info(json.dumps(line, separators=(",", ":")), extra={"access": line})
