"""`trellis serve --ray`: deploy the Serve application, serve until a signal, drain, and leave.

Without --ray-address a local Ray instance is started with this machine's CPUs
(trellis_runtime.ray_cluster) and stopped at the end; with one, the application joins that
cluster and only the application is deleted at the end. Ray's HTTP proxy listens on --host/--port (on a joined cluster whose Serve already runs, Serve
keeps the address it was started with).

SIGTERM or SIGINT drains as the single server does: the ingress refuses new requests with 503 and
/ready turns 503, running requests finish within --drain-timeout, streams still running then end
with an error event, and the process exits 0. A second signal stops at once.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Optional

from ray import serve

from server.ray_deployments import APP_NAME, build_application
from server.serve import configure_logging
from server.settings import ServerSettings
from server.shutdown import FINAL_GRACE_SECONDS
from trellis_runtime.errors import TrellisError
from trellis_runtime.ray_cluster import ray_cluster

log = logging.getLogger("trellis.server")
# How often the drain asks the ingress what is still in flight (seconds).
DRAIN_POLL_SECONDS = 0.2


class Signals:
    """The first SIGTERM/SIGINT asks for a drain; a second one for an immediate stop."""

    def __init__(self) -> None:
        self.drain = threading.Event()
        self.stop_now = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._received)

    def _received(self, sig: int, frame: Optional[FrameType]) -> None:
        if self.drain.is_set():
            self.stop_now.set()
        else:
            log.info("%s received: draining; a second signal stops at once",
                     signal.Signals(sig).name)
        self.drain.set()


def serve_on_ray(settings: ServerSettings, checkpoint: Path, model_name: str) -> None:
    """Serve `checkpoint` through Ray Serve until a signal has drained it."""
    configure_logging(settings.log_level)
    with ray_cluster(settings.ray_address) as local:
        _serve(settings, checkpoint, model_name)
        if local:
            serve.shutdown()


def _serve(settings: ServerSettings, checkpoint: Path, model_name: str) -> None:
    serve.start(http_options={"host": settings.host, "port": settings.port})
    signals = Signals()
    try:
        serve.run(build_application(settings, checkpoint, model_name), name=APP_NAME,
                  route_prefix="/", blocking=False)
    except RuntimeError as error:  # Serve's own message ends with the replicas' tracebacks
        raise TrellisError(f"the Ray Serve application did not start: "
                           f"{str(error).splitlines()[0]} (the replicas' logs say why)") from None
    fewest, most = settings.replica_range()
    log.info("serving %s on http://%s:%d through Ray Serve (%s engine replicas)", model_name,
             settings.host, settings.port, fewest if fewest == most else f"{fewest}-{most}")
    signals.drain.wait()
    _drain(settings.drain_timeout, signals.stop_now)
    serve.delete(APP_NAME)


def _drain(timeout: float, stop_now: threading.Event) -> None:
    """Wait, up to `timeout`, for the ingress's requests in flight to finish; then cut the rest."""
    ingress = serve.get_app_handle(APP_NAME)
    deadline = time.monotonic() + timeout
    in_flight = ingress.drain.remote().result()
    while in_flight and time.monotonic() < deadline and not stop_now.is_set():
        time.sleep(DRAIN_POLL_SECONDS)
        in_flight = ingress.in_flight.remote().result()
    if in_flight:
        log.warning("drain timeout: cutting %d request(s) still in flight", in_flight)
        ingress.cut_streams.remote().result()
        time.sleep(FINAL_GRACE_SECONDS)
    else:
        log.info("drained: no request in flight")
