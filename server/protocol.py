"""The HTTP/1.1 connection handling under the app: uvicorn's h11 protocol, with a deadline on request
headers and its refusals in OpenAI's error shape.

Neither h11 nor uvicorn bounds the time a client may take to send a request's headers (uvicorn's
keep-alive timeout only covers the idle gap before a kept-alive request's first byte), so a client
trickling header bytes holds a connection and a socket forever. Here each connection must complete a
request's headers within `header_timeout` seconds, counted from when it connects or, on a kept-alive
connection, from the next request's first byte; otherwise it gets 408 and is closed. The body has
its own deadline, enforced by the app (server.limits).

A request h11 cannot parse (malformed, or headers beyond h11's 16 KiB buffer, an oversized
Authorization header for one) gets a JSON 400 instead of uvicorn's plain-text one, so clients that
parse every error body as OpenAI's still can.
"""

from __future__ import annotations

import asyncio
import json
from functools import partial
from http import HTTPStatus
from typing import Any, Callable, Optional

import h11
from h11._connection import DEFAULT_MAX_INCOMPLETE_EVENT_SIZE  # as uvicorn reads it
from uvicorn.protocols.http.h11_impl import H11Protocol

from server.errors import APIError


def raw_error(error: APIError) -> bytes:
    """A whole HTTP/1.1 response that closes the connection, written straight to the socket: these
    answers come before h11 has a request to answer."""
    body = json.dumps(error.body()).encode()
    head = (f"HTTP/1.1 {error.status} {HTTPStatus(error.status).phrase}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\n\r\n")
    return head.encode() + body


class GuardedH11Protocol(H11Protocol):
    def __init__(self, *args: Any, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self.header_deadline: Optional[asyncio.TimerHandle] = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_deadline()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self._arm_header_deadline()  # the headers of the next request are still incomplete
        else:
            self._disarm_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_deadline()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        self.transport.write(raw_error(APIError(
            f"The request is not valid HTTP/1.1: malformed, or its headers are larger than "
            f"{self.config.h11_max_incomplete_event_size or DEFAULT_MAX_INCOMPLETE_EVENT_SIZE} "
            f"bytes.", code="invalid_http_request")))
        self.transport.close()

    def _arm_header_deadline(self) -> None:
        if self.header_deadline is None:
            self.header_deadline = self.loop.call_later(self.header_timeout, self._headers_late)

    def _disarm_header_deadline(self) -> None:
        if self.header_deadline is not None:
            self.header_deadline.cancel()
            self.header_deadline = None

    def _headers_late(self) -> None:
        self.header_deadline = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.write(raw_error(APIError(
                f"The request headers were not received within {self.header_timeout:g} s "
                f"(--header-timeout).", status=408, code="request_timeout")))
            self.transport.close()


def guarded_protocol(header_timeout: float) -> Callable[..., GuardedH11Protocol]:
    """What uvicorn.Config(http=...) takes to serve with GuardedH11Protocol."""
    return partial(GuardedH11Protocol, header_timeout=header_timeout)
