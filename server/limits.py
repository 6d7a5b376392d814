"""The request body size limit (--max-body-bytes): larger bodies get 413 before the app reads them.

A declared Content-Length over the limit is refused without reading a byte. A body without one
(chunked upload) is read here up to the limit and handed on to the app from memory; the route would
read it whole anyway, and this way a client cannot make the server buffer more than the limit.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import APIError, send_error


def too_large(limit: int, size: int | None = None) -> APIError:
    told = f"is {size} bytes" if size is not None else "is larger than that"
    return APIError(f"The request body {told}; this server accepts at most {limit} bytes "
                    f"(--max-body-bytes).", status=413, code="request_too_large")


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None:
            if declared.isdigit() and int(declared) > self.max_bytes:
                await send_error(send, too_large(self.max_bytes, int(declared)))
                return
            await self.app(scope, receive, send)  # the server stops the body at its declared length
            return
        if b"chunked" not in headers.get(b"transfer-encoding", b""):
            await self.app(scope, receive, send)  # no body
            return
        chunks: list[bytes] = []
        size = 0
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
