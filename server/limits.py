"""Reading a request's body before anything else runs: at most --max-body-bytes (413 past it), within
--body-timeout seconds (408 past it).

A declared Content-Length over the limit is refused without reading a byte. Every other body is read
here in full and handed on to the app from memory; the route would read it whole anyway, and this way
a client can make the server buffer no more than the limit, and a client that trickles its upload
cannot hold anything further in: admission (server.admission) sits inside this middleware, so a
request takes a place in the queue only once its body is in.
"""

from __future__ import annotations

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import APIError, send_error


def too_large(limit: int, size: int | None = None) -> APIError:
    told = f"is {size} bytes" if size is not None else "is larger than that"
    return APIError(f"The request body {told}; this server accepts at most {limit} bytes "
                    f"(--max-body-bytes).", status=413, code="request_too_large")


def too_slow(timeout: float) -> APIError:
    # Connection: close, since the rest of the body may still be on its way.
    return APIError(f"The request body was not received within {timeout:g} s (--body-timeout).",
                    status=408, code="request_timeout", headers={"Connection": "close"})


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int, timeout: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await send_error(send, too_large(self.max_bytes, int(declared)))
            return
        if declared is None and b"chunked" not in headers.get(b"transfer-encoding", b""):
            await self.app(scope, receive, send)  # no body
            return
        chunks: list[bytes] = []
        size = 0
        with anyio.move_on_after(self.timeout) as deadline:
            while True:
                message = await receive()
                if message["type"] != "http.request":  # the client left while sending
                    return
                chunks.append(message.get("body", b""))
                size += len(chunks[-1])
                if size > self.max_bytes:
                    await send_error(send, too_large(self.max_bytes))
                    return
                if not message.get("more_body", False):
                    break
        if deadline.cancelled_caught:
            await send_error(send, too_slow(self.timeout))
            return
        await self.app(scope, _replay(b"".join(chunks), receive), send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive() that returns the buffered body once, then the connection's own messages (so a
    disconnect is still seen by the app)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
