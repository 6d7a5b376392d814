"""The operational surface of the app: probes, /metrics, the playground page, and the middleware
stack that enforces keys, limits and admission and writes the access log.

Probes follow the liveness/readiness split: /health answers while the process serves HTTP at all (a
restart is the cure otherwise); /ready answers 503 once the server drains, so load balancers stop
sending before it exits.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from server.access_log import AccessLogMiddleware
from server.admission import Admission, AdmissionMiddleware
from server.auth import AuthMiddleware
from server.errors import APIError
from server.limits import BodyLimitMiddleware
from server.metrics import CONTENT_TYPE, Metrics
from server.openapi import PROBE_RESPONSES, READY_RESPONSES
from server.settings import AppConfig

STATIC = Path(__file__).parent / "static"


def install_operations(app: FastAPI, config: AppConfig, admission: Admission,
                       metrics: Metrics) -> None:
    @app.get("/health", responses=PROBE_RESPONSES)
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", responses=READY_RESPONSES)
    async def ready() -> dict[str, str]:
        if admission.draining:
            raise APIError("The server is draining and will stop.", status=503,
                           code="server_shutting_down")
        return {"status": "ready"}

    @app.get("/metrics", response_class=Response, responses={
        200: {"description": "Prometheus text format.", "content": {"text/plain": {}}},
        **PROBE_RESPONSES})
    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE)

    @app.get("/", include_in_schema=False)
    async def playground() -> FileResponse:
        return FileResponse(STATIC / "playground.html", headers=_PAGE_HEADERS)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    # add_middleware wraps what is already there: the last added runs first. Admission is inside
    # the body reader, so a request is counted only once its body is in.
    app.add_middleware(AdmissionMiddleware, admission=admission)
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_body_bytes,
                       timeout=config.body_timeout)
    if config.api_key is not None:
        app.add_middleware(AuthMiddleware, api_key=config.api_key.get_secret_value(),
                           protect_probes=config.protect_probes)
    app.add_middleware(AccessLogMiddleware, routes=app.routes, enabled=config.access_log,
                       count=metrics.observe_http)


# The page loads only its own script and style and talks only to this server.
_PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'",
                 "X-Content-Type-Options": "nosniff"}
