"""Running the app as `trellis serve` does: logging, uvicorn, and the draining shutdown."""

from __future__ import annotations

import logging
import sys
from typing import Any

import uvicorn

from server.app import create_app
from server.protocol import guarded_protocol
from server.settings import ServerSettings
from server.shutdown import DrainingServer


def configure_logging(level: str) -> None:
    """Give the server's loggers (trellis.access, trellis.server) a handler: uvicorn configures only
    its own."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("trellis")
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False


def serve(engine: Any, tokenizer: Any, model_name: str, settings: ServerSettings) -> None:
    """Serve until SIGTERM/SIGINT has drained the server; returns normally (exit status 0)."""
    configure_logging(settings.log_level)
    app = create_app(engine, tokenizer, model_name, settings.app_config())
    # uvicorn's own access log is replaced by trellis.access (one structured line per request).
    config = uvicorn.Config(app, host=settings.host, port=settings.port,
                            log_level=settings.log_level, access_log=False,
                            http=guarded_protocol(settings.header_timeout))
    DrainingServer(config, app.state.admission, settings.drain_timeout).run()
