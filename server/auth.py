"""Optional API keys: `Authorization: Bearer KEY` on /v1/*, answered with 401 in OpenAI's shape.

Keys are compared as SHA-256 digests with hmac.compare_digest, so the time taken depends neither on
where a wrong key first differs nor on its length. The probes (/health, /ready) and /metrics stay open
unless `protect_probes` is set: orchestrators and scrapers usually carry no key. The playground page
itself is public; it asks for the key and sends it with each call.
"""

from __future__ import annotations

import hashlib
import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from server.errors import APIError, send_error

PROBE_PATHS = frozenset({"/health", "/ready", "/metrics"})


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


class AuthMiddleware:
    def __init__(self, app: ASGIApp, api_key: str, protect_probes: bool) -> None:
        self.app = app
        self.expected = _digest(api_key.encode())
        self.protect_probes = protect_probes

    def protected(self, path: str) -> bool:
        return path.startswith("/v1/") or (self.protect_probes and path in PROBE_PATHS)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.protected(scope["path"]):
            await self.app(scope, receive, send)
            return
        scheme, _, key = dict(scope["headers"]).get(b"authorization", b"").partition(b" ")
        if scheme.lower() != b"bearer" or not key.strip():
            await send_error(send, _unauthorized("No API key was provided. Send it as "
                                                 "'Authorization: Bearer KEY'."))
            return
        if not hmac.compare_digest(_digest(key.strip()), self.expected):
            await send_error(send, _unauthorized("Incorrect API key provided."))
            return
        await self.app(scope, receive, send)


def _unauthorized(message: str) -> APIError:
    return APIError(message, status=401, code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"})
