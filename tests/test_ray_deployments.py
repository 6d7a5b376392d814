"""The Ray Serve application as built from settings, and the deploy files that describe it: checked
through Ray's own config models, without starting Ray."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray
import yaml
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import ServeDeploySchema

from server.ray_deployments import (APP_NAME, ENGINE_DEPLOYMENT, INGRESS_DEPLOYMENT, build_app,
                                    engine_options, replica_resources)
from server.settings import ServerSettings

DEPLOY = Path(__file__).resolve().parents[1] / "docker" / "ray"


def test_fixed_replicas_take_one_batch_each() -> None:
    options = engine_options(ServerSettings(ray=True, replicas=3, max_batch=6, drain_timeout=7))
    assert options["num_replicas"] == 3 and "autoscaling_config" not in options
    assert options["max_ongoing_requests"] == 6  # one replica's KV slots
    assert options["graceful_shutdown_timeout_s"] == 7


def test_autoscaling_targets_half_the_batch_slots() -> None:
    settings = ServerSettings(ray=True, min_replicas=1, max_replicas=4, max_batch=8,
                              upscale_delay=5, downscale_delay=60)
    options = engine_options(settings)
    scaling = AutoscalingConfig(**options["autoscaling_config"])  # Ray accepts what we pass
    assert (scaling.min_replicas, scaling.max_replicas) == (1, 4)
    assert scaling.target_ongoing_requests == 4
    assert (scaling.upscale_delay_s, scaling.downscale_delay_s) == (5, 60)
    assert "num_replicas" not in options


def test_replicas_share_the_cpus_or_take_a_gpu_each() -> None:
    assert replica_resources("cuda", None, 4) == ({"num_cpus": 1.0, "num_gpus": 1}, 1)
    actor, threads = replica_resources("cpu", 1.0, 2)
    assert actor == {"num_cpus": 1.0} and threads == 1
    actor, threads = replica_resources("cpu", None, 1000)  # never less than one CPU each
    assert actor == {"num_cpus": 1.0} and threads == 1


@pytest.mark.parametrize("flags, message", [
    ({"replicas": 2}, "--replicas needs --ray"),
    ({"ray_address": "auto"}, "--ray-address needs --ray"),
    ({"ray": True, "replicas": 2, "max_replicas": 3}, "not both"),
    ({"ray": True, "min_replicas": 3, "max_replicas": 2}, "above --max-replicas"),
])
def test_contradictory_replica_settings_are_refused(flags: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ServerSettings(**flags)


def _application(config: dict) -> dict:
    schema = ServeDeploySchema(**config)  # Ray's own model of a Serve config file
    [app] = schema.applications
    assert app.name == APP_NAME and app.route_prefix == "/"
    assert app.import_path == "server.ray_deployments:build_app"
    return app.args


def test_serve_config_file_is_a_valid_serve_config(tiny_checkpoint_dir: Path) -> None:
    args = _application(yaml.safe_load((DEPLOY / "serve_config.yaml").read_text()))
    ingress = build_app({**args, "model": str(tiny_checkpoint_dir)})._bound_deployment
    assert ingress.name == INGRESS_DEPLOYMENT
    engine = ingress.init_args[0]._bound_deployment  # the ingress is bound to the engine replicas
    assert engine.name == ENGINE_DEPLOYMENT
    assert engine.init_args[0] == str(tiny_checkpoint_dir)
    scaling = engine._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas) == (args["min_replicas"],
                                                            args["max_replicas"])
    assert engine.ray_actor_options["num_gpus"] == 1


def test_rayservice_manifest_carries_the_same_application() -> None:
    manifest = yaml.safe_load((DEPLOY / "rayservice.yaml").read_text())
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayService")
    served = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    assert _application(served) == _application(
        yaml.safe_load((DEPLOY / "serve_config.yaml").read_text()))
    cluster = manifest["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__  # the image's Ray, which the pin installs
    [workers] = cluster["workerGroupSpecs"]
    [container] = workers["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1  # one engine replica per GPU
    assert workers["maxReplicas"] >= served["applications"][0]["args"]["max_replicas"]


def test_build_app_refuses_a_model_that_is_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="packed checkpoint"):
        build_app({"model": str(tmp_path)})
