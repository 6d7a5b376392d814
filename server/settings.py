"""Configuration of `trellis serve`: one typed model, filled from flags, then TRELLIS_* variables,
then defaults.

Two layers, so that tests and embedders can build an app without the process environment leaking
in: `AppConfig` holds what the HTTP app itself enforces (keys, limits, drain) and is a plain model;
`ServerSettings` adds what only the process needs (model, address, engine sizes) and reads the
environment (`TRELLIS_API_KEY`, `TRELLIS_MAX_WAITING`, ...). The CLI builds one flag per field from
these declarations, so `trellis serve --help`, the environment and the README table cannot drift.
"""

from __future__ import annotations

import argparse
from typing import Literal, Optional, get_args, get_origin

from pydantic import (BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator,
                      model_validator)
from pydantic_settings import BaseSettings, SettingsConfigDict

from trellis_runtime.devices import DEFAULT_DEVICE, DEFAULT_HEAD, Device, Head
from trellis_runtime.scheduler import DEFAULT_MAX_BATCH, DEFAULT_MAX_SEQ_LEN

ENV_PREFIX = "TRELLIS_"


class AppConfig(BaseModel):
    """What the HTTP app enforces, whatever process runs it."""

    model_config = ConfigDict(extra="forbid")

    api_key: Optional[SecretStr] = Field(
        None, description="require 'Authorization: Bearer KEY' on /v1/* (401 otherwise)")
    protect_probes: bool = Field(
        False, description="also require the key on /health, /ready and /metrics, which "
                           "otherwise stay open for probes and scrapers")
    max_waiting: int = Field(
        64, ge=0, description="requests that may wait for a batch slot; past it new requests "
                              "get 429 with Retry-After")
    max_body_bytes: int = Field(
        1 << 20, ge=1, description="largest request body accepted; larger ones get 413")
    body_timeout: float = Field(
        30.0, gt=0, description="seconds a client has to send a request's whole body once its "
                                "headers are in; slower uploads get 408")
    drain_timeout: float = Field(
        30.0, ge=0, description="seconds a SIGTERM waits for running requests before exiting")
    access_log: bool = Field(
        True, description="one JSON line per request on the trellis.access logger")

    @field_validator("api_key", mode="before")
    @classmethod
    def _not_empty(cls, value: object) -> object:
        """TRELLIS_API_KEY= (set but empty) is refused: read as "no key" it would silently serve
        without auth what its operator meant to protect (a secret that failed to load, say)."""
        secret = value.get_secret_value() if isinstance(value, SecretStr) else value
        if isinstance(secret, str) and not secret.strip():
            raise ValueError("is set but empty; unset it to serve without a key")
        return value


class ServerSettings(BaseSettings, AppConfig):
    """Everything `trellis serve` takes; each field is a flag and a TRELLIS_<NAME> variable."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid")

    model: Optional[str] = Field(
        None, description="packed checkpoint or float source; none = the built-in smollm2-135m, "
                          "quantized on first use into the cache")
    host: str = Field("127.0.0.1", description="address to bind")
    port: int = Field(8000, ge=0, le=65535, description="port to bind")
    max_batch: int = Field(DEFAULT_MAX_BATCH, ge=1,
                           description="sequences decoded together (KV-cache slots)")
    max_seq_len: Optional[int] = Field(
        None, ge=2, description="context length per sequence; none = the model's, capped at "
                                f"{DEFAULT_MAX_SEQ_LEN}")
    header_timeout: float = Field(
        10.0, gt=0, description="seconds a connection has to send a request's headers (from "
                                "connecting, or from a kept-alive request's first byte); slower "
                                "ones get 408 and are closed")
    served_model_name: Optional[str] = Field(None, description="model id in the API")
    device: Device = Field(DEFAULT_DEVICE, description="where the model runs")
    head: Head = Field(DEFAULT_HEAD, description="output head on CPU: as stored, or int8 rows quantized "
                                           "at load (half the bytes per token)")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="server log level")

    ray: bool = Field(False, description="serve through Ray Serve: engine replicas behind one "
                                         "ingress that answers the same API")
    ray_address: Optional[str] = Field(
        None, description="with --ray: join this Ray cluster (e.g. ray://head:10001 or auto); "
                          "none = start a local one")
    replicas: Optional[int] = Field(None, ge=1, description="with --ray: a fixed number of "
                                                            "engine replicas; none = 1")
    min_replicas: Optional[int] = Field(None, ge=1, description="with --ray: autoscale from this "
                                                                "many engine replicas")
    max_replicas: Optional[int] = Field(None, ge=1, description="with --ray: autoscale up to "
                                                                "this many engine replicas")
    replica_cpus: Optional[float] = Field(
        None, gt=0, description="with --ray: CPUs each engine replica reserves and runs its "
                                "threads on; none = 1 on CUDA (plus one GPU), else the machine's "
                                "CPUs shared by the most replicas")
    upscale_delay: float = Field(30.0, ge=0, description="with --ray autoscaling: seconds of "
                                                         "sustained load before adding a replica")
    downscale_delay: float = Field(600.0, ge=0, description="with --ray autoscaling: seconds "
                                                            "idle before removing a replica")

    @model_validator(mode="after")
    def _ray_flags_need_ray(self) -> "ServerSettings":
        """Replica flags without --ray would be silently ignored; contradictory ones are refused."""
        ray_only = [name for name in ("ray_address", "replicas", "min_replicas", "max_replicas",
                                      "replica_cpus") if getattr(self, name) is not None]
        if ray_only and not self.ray:
            raise ValueError(f"--{ray_only[0].replace('_', '-')} needs --ray")
        autoscaled = self.min_replicas is not None or self.max_replicas is not None
        if self.replicas is not None and autoscaled:
            raise ValueError("give either --replicas or --min-replicas/--max-replicas, not both")
        low, high = self.replica_range()
        if low > high:
            raise ValueError(f"--min-replicas ({low}) is above --max-replicas ({high})")
        return self

    def replica_range(self) -> tuple[int, int]:
        """(fewest, most) engine replicas: equal for a fixed count."""
        if self.replicas is not None:
            return self.replicas, self.replicas
        low = self.min_replicas or 1
        return low, self.max_replicas or low

    def app_config(self) -> AppConfig:
        """The part the app enforces, as the plain model create_app takes."""
        return AppConfig(**{name: getattr(self, name) for name in AppConfig.model_fields})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per ServerSettings field (the model is positional), each defaulting to None so that
    an unset flag falls through to its TRELLIS_* variable and then to the field's default."""
    own = [name for name in ServerSettings.model_fields if name not in AppConfig.model_fields]
    for name in own + list(AppConfig.model_fields):
        field = ServerSettings.model_fields[name]
        default = "none" if field.default is None else field.default
        help = f"{field.description} [env {ENV_PREFIX}{name.upper()}; default {default}]"
        if name == "model":
            parser.add_argument("model", nargs="?", default=None, help=help)
            continue
        flag = "--" + name.replace("_", "-")
        annotation = field.annotation
        if annotation is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=help)
        elif get_origin(annotation) is Literal:
            parser.add_argument(flag, choices=get_args(annotation), default=None, help=help)
        else:
            arg_type = next((t for t in (int, float) if annotation in (t, Optional[t])), str)
            parser.add_argument(flag, type=arg_type, default=None, metavar=name.upper(), help=help)


def settings_from_arguments(args: argparse.Namespace) -> ServerSettings:
    """Flags given on the command line, over TRELLIS_* variables, over defaults. A bad value from
    either source raises ValueError naming the setting."""
    given = {name: getattr(args, name) for name in ServerSettings.model_fields
             if getattr(args, name, None) is not None}
    try:
        return ServerSettings(**given)
    except ValidationError as error:
        first = error.errors()[0]
        name = ".".join(str(part) for part in first["loc"])
        if not name:  # a rule across settings: its message names the flags
            raise ValueError(f"invalid settings: {first['msg'].removeprefix('Value error, ')}") \
                from None
        raise ValueError(f"invalid setting {name} ({ENV_PREFIX}{name.upper()} or "
                         f"--{name.replace('_', '-')}): {first['msg']}") from None
