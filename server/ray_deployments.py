"""The Ray Serve application: engine replicas, and one ingress serving the OpenAI API before them.

- `EngineReplica` holds one Engine (one GPU on CUDA, a share of the CPUs on CPU) and streams a
  request's Outputs back; Serve probes its loop (check_health) and replaces a replica that died.
  At most max_batch requests go to a replica at once (its KV slots); autoscaling aims at half of
  them, so a replica is added while the ones running are still half empty.
- `Ingress` runs the very app `trellis serve` runs (server.app.create_app) over a RemoteEngine:
  the same routes, SSE, errors, keys, limits, /metrics and probes. It is one replica on purpose:
  its admission is then the whole cluster's, so --max-waiting bounds the cluster's queue.

`build_application` makes the application from settings (`trellis serve --ray`); `build_app` is
the same for `serve run` / `serve deploy`, which pass the settings as a dict (docker/ray/).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, AsyncIterator

import torch
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from server.app import create_app
from server.remote_engine import EngineLimits, RemoteEngine
from server.settings import AppConfig, ServerSettings
from trellis_runtime.checkpoint import is_checkpoint
from trellis_runtime.engine import Engine, EngineError
from trellis_runtime.generation_config import stop_token_ids
from trellis_runtime.model import load_model, load_tokenizer
from trellis_runtime.outputs import Output
from trellis_runtime.sampling import SamplingParams

APP_NAME = "trellis"
ENGINE_DEPLOYMENT = "engine"
INGRESS_DEPLOYMENT = "ingress"
# Requests the ingress takes besides generation (probes, /metrics, /v1/models) before Serve queues.
INGRESS_HEADROOM = 64
# A step (one decode, or one prefill chunk) running longer than this marks the replica unhealthy:
# far above any step's time, so only a hung forward (a stuck device, a deadlock) reaches it.
STALLED_STEP_S = 120.0
# Autoscaling averages the replicas' load over the upscale delay, within these bounds (seconds):
# Ray wants the window longer than its metrics interval (10 s).
LOOK_BACK_RANGE = (12.0, 30.0)


@serve.deployment(name=ENGINE_DEPLOYMENT)
class EngineReplica:
    """One engine on one replica; the methods are what the ingress and Serve call."""

    def __init__(self, checkpoint: str, device: str, head: str, max_batch: int,
                 max_seq_len: int | None, threads: int | None) -> None:
        if threads is not None:
            torch.set_num_threads(threads)
        model, tokenizer = load_model(checkpoint, device, head)
        self.engine = Engine(model, tokenizer, max_batch=max_batch, max_seq_len=max_seq_len,
                             eos_token_ids=stop_token_ids(checkpoint, tokenizer)).start()

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       request_id: str | None) -> AsyncIterator[Output]:
        async for output in self.engine.generate(prompt_ids, params, request_id):
            yield output

    def limits(self) -> EngineLimits:
        return EngineLimits(self.engine.max_batch, self.engine.max_seq_len,
                            self.engine.vocab_size)

    def check_health(self) -> None:
        """Serve calls this periodically; raising marks the replica unhealthy and replaces it."""
        if not self.engine.alive:
            raise EngineError("the engine loop has stopped")
        if self.engine.step_running_for > STALLED_STEP_S:
            raise EngineError(f"one engine step has run for over {STALLED_STEP_S:.0f} s")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


@serve.deployment(name=INGRESS_DEPLOYMENT, num_replicas=1, ray_actor_options={"num_cpus": 0})
@serve.ingress()
class Ingress:
    """The HTTP front: the app of server.app over the engine replicas, plus the drain controls
    that `trellis serve --ray` calls through a handle on SIGTERM."""

    async def __init__(self, replicas: DeploymentHandle, checkpoint: str, model_name: str,
                       config: AppConfig, most_replicas: int) -> None:
        limits = await replicas.limits.remote()  # waits for the first replica to be up
        engine = RemoteEngine(replicas, limits, most_replicas)
        self.routes_app = create_app(engine, load_tokenizer(checkpoint), model_name, config)

    def __serve_build_asgi_app__(self) -> Any:
        return self.routes_app

    async def drain(self) -> int:
        """Refuse new requests with 503 and turn /ready to 503; returns the requests in flight."""
        self.routes_app.state.admission.draining = True
        return self.routes_app.state.admission.in_flight

    async def in_flight(self) -> int:
        return self.routes_app.state.admission.in_flight

    async def cut_streams(self) -> None:
        """The drain deadline passed: running streams end with an error event."""
        self.routes_app.state.admission.streams_cut.set()


def replica_resources(device: str, cpus: float | None, most_replicas: int) -> tuple[dict, int]:
    """(ray_actor_options, torch threads) for one engine replica."""
    if device == "cuda":
        cpus = cpus or 1.0
        return {"num_cpus": cpus, "num_gpus": 1}, max(1, int(cpus))
    cpus = cpus or max(1.0, (os.cpu_count() or 1) / most_replicas)
    return {"num_cpus": cpus}, max(1, int(cpus))


def engine_options(settings: ServerSettings) -> dict[str, Any]:
    """Serve options of the engine deployment: resources, batch slots, scaling, drain."""
    fewest, most = settings.replica_range()
    actor, _ = replica_resources(settings.device, settings.replica_cpus, most)
    options: dict[str, Any] = {
        "ray_actor_options": actor,
        "max_ongoing_requests": settings.max_batch,
        "graceful_shutdown_timeout_s": settings.drain_timeout,
    }
    if fewest == most:
        options["num_replicas"] = fewest
    else:
        low, high = LOOK_BACK_RANGE
        options["autoscaling_config"] = {
            "min_replicas": fewest, "max_replicas": most,
            "target_ongoing_requests": max(1.0, settings.max_batch / 2),
            "upscale_delay_s": settings.upscale_delay,
            "downscale_delay_s": settings.downscale_delay,
            "look_back_period_s": min(high, max(low, settings.upscale_delay)),
        }
    return options


def build_application(settings: ServerSettings, checkpoint: Path, model_name: str) -> Application:
    """The Serve application for a packed checkpoint that every replica can read at `checkpoint`."""
    _, most = settings.replica_range()
    _, threads = replica_resources(settings.device, settings.replica_cpus, most)
    replicas = EngineReplica.options(**engine_options(settings)).bind(
        str(checkpoint), settings.device, settings.head, settings.max_batch, settings.max_seq_len,
        threads)
    capacity = settings.max_batch * most + settings.max_waiting
    return Ingress.options(max_ongoing_requests=capacity + INGRESS_HEADROOM).bind(
        replicas, str(checkpoint), model_name, settings.app_config(), most)


def build_app(args: dict[str, Any]) -> Application:
    """`serve run` / `serve deploy` entry (import_path server.ray_deployments:build_app): `args`
    are `trellis serve` settings by field name; `model` must be a packed checkpoint directory."""
    settings = ServerSettings(ray=True, **args)
    if settings.model is None or not is_checkpoint(settings.model):
        raise ValueError(f"model must be a packed checkpoint directory, got {settings.model!r} "
                         "(quantize first: trellis quantize SRC --out DIR)")
    return build_application(settings, Path(settings.model),
                             settings.served_model_name or Path(settings.model).name)
