"""Graceful shutdown: SIGTERM drains the server, then the process exits 0.

uvicorn on its own closes the listening socket at the first SIGTERM (new clients get "connection
refused", not an answer), cancels what is still running only if a timeout is set, and finally
re-raises the signal so the process dies with status -15. Orchestrators want something else
(Kubernetes' preStop / terminationGracePeriodSeconds model, vLLM's --shutdown-timeout): keep
listening, turn /ready to 503 and refuse new requests with 503 so load balancers move on, let running
requests finish within a deadline, then exit cleanly.

So the first SIGTERM or SIGINT only starts the drain; the server keeps ticking until nothing is in
flight or `drain_timeout` has passed, and then runs uvicorn's ordinary shutdown, in which requests
still running after the deadline are cancelled; streams among them first end with an error event
(within FINAL_GRACE_SECONDS). A second signal stops at once. No signal is re-raised, so
`trellis serve` returns 0.
"""

from __future__ import annotations

import logging
import signal
import time
from types import FrameType
from typing import Optional

import uvicorn

from server.admission import Admission

log = logging.getLogger("trellis.server")
# After the drain, how long uvicorn waits for responses that are still being written.
FINAL_GRACE_SECONDS = 2


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, admission: Admission, drain_timeout: float) -> None:
        config.timeout_graceful_shutdown = FINAL_GRACE_SECONDS
        super().__init__(config)
        self.admission = admission
        self.drain_timeout = drain_timeout
        self.drain_deadline: Optional[float] = None

    def handle_exit(self, sig: int, frame: Optional[FrameType]) -> None:
        # Runs in the main thread between two steps of the event loop: only set flags here.
        if self.drain_deadline is None and not self.should_exit:
            self.drain_deadline = time.monotonic() + self.drain_timeout
            self.admission.draining = True
            log.info("%s received: draining (at most %.0f s); a second signal stops at once",
                     signal.Signals(sig).name, self.drain_timeout)
        else:
            self.should_exit = True
            self.force_exit = sig == signal.SIGINT

    async def on_tick(self, counter: int) -> bool:
        if self.drain_deadline is not None and not self.should_exit:
            if self.admission.in_flight == 0:
                log.info("drained: no request in flight")
                self.should_exit = True
            elif time.monotonic() >= self.drain_deadline:
                log.warning("drain timeout: cutting streams and cancelling %d request(s) still "
                            "in flight", self.admission.in_flight)
                self.admission.streams_cut.set()
                self.should_exit = True
        return await super().on_tick(counter)
