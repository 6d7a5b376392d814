"""Admission control: a bounded number of generation requests in flight, and draining on shutdown.

The engine runs `max_batch` sequences and queues the rest for a free KV slot, without bound. Here, in
front of it, at most `max_batch + max_waiting` generation requests are admitted at once; one more gets
429 with Retry-After at once, so a client or a gateway can back off or go to another replica instead of
piling onto a queue whose wait only grows (TGI's behaviour; vLLM's long-standing gap). Prompts that
could never fit the context are refused with 400 by the route, before they occupy anything.

While draining (after SIGTERM) every new /v1 request gets 503 and `/ready` reports not ready, and the
server waits for `in_flight` to reach zero before it exits; if the drain deadline passes first,
`streams_cut` is set and running streams end with an error event before the server stops.

A request counts from when it is admitted, which is once its body has been read (server.limits runs
first, under --body-timeout, so a slow upload holds no place), until its response has been sent in
full, or its connection has dropped: the ASGI call's own lifetime, so no code path can leak a place.
Everything runs on the event loop's thread, so plain integers suffice.
"""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Receive, Scope, Send

from server.errors import APIError, send_error

# Paths that run the model; everything else under /v1 is cheap and never queued.
GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
# A client told to come back may do so after this many seconds (the header of 429 and 503).
RETRY_AFTER_SECONDS = 1


class Admission:
    """The count of generation requests in flight and whether new ones are still accepted."""

    def __init__(self, max_running: int, max_waiting: int) -> None:
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.in_flight = 0
        self.draining = False
        # Set when the drain deadline passes: running streams end with an error event.
        self.streams_cut = asyncio.Event()

    @property
    def capacity(self) -> int:
        return self.max_running + self.max_waiting

    def refusal(self, generation: bool) -> APIError | None:
        """Why a new request may not start now, or None to admit it."""
        retry = {"Retry-After": str(RETRY_AFTER_SECONDS)}
        if self.draining:
            return APIError("The server is shutting down and accepts no new requests; retry on "
                            "another replica.", status=503, code="server_shutting_down",
                            headers=retry)
        if generation and self.in_flight >= self.capacity:
            return APIError(f"The server is at capacity: {self.max_running} requests running and "
                            f"{self.max_waiting} waiting (--max-waiting). Retry after "
                            f"{RETRY_AFTER_SECONDS} s.", status=429, code="server_overloaded",
                            headers=retry)
        return None


class AdmissionMiddleware:
    """Counts generation requests through their whole ASGI call; refuses past capacity or while
    draining."""

    def __init__(self, app: ASGIApp, admission: Admission) -> None:
        self.app = app
        self.admission = admission

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        generation = scope["method"] == "POST" and scope["path"] in GENERATION_PATHS
        refusal = self.admission.refusal(generation)
        if refusal is not None:
            await send_error(send, refusal)
            return
        if not generation:
            await self.app(scope, receive, send)
            return
        self.admission.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.admission.in_flight -= 1
