"""Prometheus metrics at GET /metrics, named in the spirit of vLLM's under a `trellis:` prefix.

Each app has its own CollectorRegistry, so several apps in one process (tests, embedders) never
clash and no metric of another library leaks in. Engine gauges (running and waiting requests, KV-cache
usage) are read from the engine's stats() when scraped rather than pushed, so they are never stale.
"""

from __future__ import annotations

from typing import Any, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from server.trace import Trace

CONTENT_TYPE = CONTENT_TYPE_LATEST
# Seconds; vLLM's buckets, cut to the range a CPU or one GPU serves in.
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15,
                0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                60.0, 120.0, 240.0, 480.0)


class _EngineGauges(Collector):
    """Gauges computed from engine.stats() at each scrape."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily]:
        stats = self.engine.stats()
        yield GaugeMetricFamily("trellis:num_requests_running",
                                "Requests holding a KV-cache slot (prefilling or decoding).",
                                value=stats["running"])
        yield GaugeMetricFamily("trellis:num_requests_waiting",
                                "Requests queued in the engine for a free KV-cache slot.",
                                value=stats["waiting"])
        yield GaugeMetricFamily("trellis:kv_cache_usage_perc",
                                "Fraction of KV-cache slots in use (1 = full).",
                                value=stats["kv_cache_usage"])


class Metrics:
    def __init__(self, engine: Any) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.http_requests = Counter("trellis:http_requests", "HTTP requests answered.",
                                     ["endpoint", "method", "status"], registry=r)
        self.prompt_tokens = Counter("trellis:prompt_tokens", "Prompt tokens prefilled.",
                                     registry=r)
        self.generation_tokens = Counter("trellis:generation_tokens", "Tokens generated.",
                                         registry=r)
        self.finished = Counter("trellis:request_finished",
                                "Generation requests ended, by finish reason (abort: the client "
                                "left or generation failed).", ["finished_reason"], registry=r)
        self.ttft = Histogram("trellis:time_to_first_token_seconds",
                              "Time from admission to the first generated token.",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.itl = Histogram("trellis:inter_token_latency_seconds",
                             "Time between consecutive generated tokens of one request.",
                             buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("trellis:e2e_request_latency_seconds",
                             "Time from admission to the end of a generation request.",
                             buckets=_E2E_BUCKETS, registry=r)
        r.register(_EngineGauges(engine))

    def observe_http(self, endpoint: str, method: str, status: int) -> None:
        self.http_requests.labels(endpoint, method, str(status)).inc()

    def observe_request(self, trace: Trace) -> None:
        """Record one generation request once its output stream has closed."""
        # Counts are 0 for a request that ended before the engine answered; a scoring-only request
        # (echo with max_tokens 0) has prompt tokens and no first token.
        self.prompt_tokens.inc(trace.prompt_tokens)
        self.generation_tokens.inc(trace.completion_tokens)
        if trace.first_token_at is not None:
            self.ttft.observe(trace.time_to_first_token)
        for gap in trace.token_gaps:
            self.itl.observe(gap)
        if trace.duration is not None:
            self.e2e.observe(trace.duration)
        self.finished.labels(trace.finish_reason or "abort").inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
