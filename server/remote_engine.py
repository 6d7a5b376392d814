"""The engine interface that create_app uses, served by engine replicas on Ray Serve.

With `trellis serve --ray` the routes run in one ingress and the models in replicas elsewhere in the
cluster; this class lets the very same app (server.app) drive them: `generate` refuses bad input
here, at the call, exactly as the local engine does (same check, same errors), so a refusal is still
an ordinary 4xx; only then does the request go to a replica, whose Outputs stream back through a
Serve handle. Ray's router sends each request to the less loaded of two sampled replicas (with two
replicas, the least loaded one).

A replica that dies mid-request ends its streams with EngineError, which the routes already turn
into an in-band error event (streaming) or a 500 (not streaming); closing a stream early cancels
the replica's generator, which aborts the request there and frees its KV slot.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, AsyncIterator, Sequence

from ray.exceptions import RayError

from trellis_runtime.engine import EngineError, check_prompt
from trellis_runtime.outputs import Output
from trellis_runtime.sampling import SamplingParams


@dataclass(frozen=True)
class EngineLimits:
    """What every replica's engine accepts; all replicas serve the same checkpoint and sizes."""

    max_batch: int  # sequences one replica decodes together
    max_seq_len: int
    vocab_size: int


class RemoteEngine:
    """Stands in for trellis_runtime.engine.Engine in front of `replicas` (a Serve handle to the
    engine deployment). max_batch is the whole cluster's at its most replicas, so the app's
    admission (max_batch running plus --max-waiting) bounds the queue cluster-wide."""

    def __init__(self, replicas: Any, limits: EngineLimits, most_replicas: int) -> None:
        self.replicas = replicas
        self.limits = limits
        self.max_batch = limits.max_batch * most_replicas
        self.max_seq_len = limits.max_seq_len
        self.open_streams = 0

    def start(self) -> "RemoteEngine":
        return self  # the replicas run their own engines from the moment they are up

    def shutdown(self) -> None:
        """Nothing to stop here: the replicas' engines stop with their replicas."""

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams,
                 request_id: str | None = None) -> AsyncIterator[Output]:
        params.validate()
        check_prompt(prompt_ids, params, self.limits.vocab_size, self.max_seq_len)
        return self._stream(list(prompt_ids), params, request_id)

    async def _stream(self, prompt_ids: list[int], params: SamplingParams,
                      request_id: str | None) -> AsyncIterator[Output]:
        responses = self.replicas.options(stream=True).generate.remote(prompt_ids, params,
                                                                       request_id)
        self.open_streams += 1
        try:
            async for output in responses:
                yield output
        except RayError as error:  # the replica died, or its engine failed the request
            raise EngineError(f"the engine replica failed: {type(error).__name__}") from error
        finally:
            self.open_streams -= 1
            responses.cancel()  # no-op once finished; otherwise aborts the request on its replica

    def stats(self) -> dict:
        """Gauges as the ingress sees them: requests handed to replicas, as running up to the
        cluster's slots and waiting past them. Each replica's own engine gauges stay in the
        replica; Ray exports its per-replica request counts itself."""
        running = min(self.open_streams, self.max_batch)
        return {"running": running, "waiting": self.open_streams - running,
                "kv_cache_usage": running / self.max_batch}
