"""`trellis serve` and `trellis generate`: run a packed checkpoint, quantizing a float model on first
use. Training code is imported only on that first use (checkpoint_for)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trellis_cli.flags import add_device_flag, add_head_flag, default_spec, require_device, require_head
from trellis_runtime.errors import TrellisError

BUILTIN_MODEL = "smollm2-135m"


def checkpoint_for(model: str | None, device: str) -> Path:
    """A packed checkpoint for MODEL: MODEL itself if it is one; otherwise the float model is
    quantized to 2 bits with the device's defaults once, into the cache, and reused after that."""
    import hashlib

    from trellis_runtime.checkpoint import is_checkpoint
    from trellis_runtime.paths import cache_dir

    name = model or BUILTIN_MODEL
    if is_checkpoint(name):
        return Path(name)
    spec = default_spec(device)
    key = name
    if Path(name).exists():
        digest = hashlib.sha256(str(Path(name).resolve()).encode()).hexdigest()[:10]
        key = f"{Path(name).stem}-{digest}"
    target = cache_dir() / "models" / f"{key}-{spec.code}-L{spec.state_bits}-K{spec.bits}"
    if not is_checkpoint(target):
        from qat.ptq import QuantizeOptions, quantize_model

        print(f"trellis: quantizing {name} to {spec.bits} bits into {target} "
              "(first use only; later starts reuse it)", file=sys.stderr)
        quantize_model(name, target, QuantizeOptions(spec=spec, device=device))
    return target


def cmd_serve(args: argparse.Namespace) -> int:
    from server.settings import settings_from_arguments

    try:
        settings = settings_from_arguments(args)
    except ValueError as err:
        raise TrellisError(str(err)) from None
    device = require_device(settings.device)
    require_head(settings.head, device)
    path = checkpoint_for(settings.model, device)
    model_name = settings.served_model_name or settings.model or BUILTIN_MODEL
    if settings.ray:
        try:
            from server.ray_serve import serve_on_ray
        except ImportError as err:
            raise TrellisError(f"--ray needs Ray Serve ({err}): pip install "
                               "'trellis-runtime[ray]'") from None
        serve_on_ray(settings, path, model_name)
        return 0
    from server.serve import serve
    from trellis_runtime.engine import Engine
    from trellis_runtime.generation_config import stop_token_ids
    from trellis_runtime.model import load_model

    model, tokenizer = load_model(path, device, settings.head)
    engine = Engine(model, tokenizer, max_batch=settings.max_batch,
                    max_seq_len=settings.max_seq_len, eos_token_ids=stop_token_ids(path, tokenizer))
    serve(engine, tokenizer, model_name, settings)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    device = require_device(args.device)
    require_head(args.head, device)
    path = checkpoint_for(args.model, device)
    from trellis_runtime.engine import Engine
    from trellis_runtime.generation_config import stop_token_ids
    from trellis_runtime.model import load_model
    from trellis_runtime.sampling import SamplingParams

    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens,
                            seed=args.seed)
    try:
        params.validate()
    except ValueError as err:
        raise TrellisError(str(err)) from None
    model, tokenizer = load_model(path, device, args.head)
    with Engine(model, tokenizer, max_batch=1,
                eos_token_ids=stop_token_ids(path, tokenizer)) as engine:
        output = engine.generate_text(tokenizer(args.prompt)["input_ids"], params)
    print(output.text)
    return 0


def serve_arguments(parser: argparse.ArgumentParser) -> None:
    from server.settings import add_arguments  # one flag per setting: flags and env stay one list

    add_arguments(parser)


def add_commands(commands: argparse._SubParsersAction) -> None:
    commands.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API",
        description="Every flag can also be set by the TRELLIS_* variable named in its help; a "
                    "flag wins over its variable.",
        arguments=serve_arguments).set_defaults(run=cmd_serve)

    generate = commands.add_parser("generate", help="print a completion of a prompt")
    generate.add_argument("model", nargs="?", default=None,
                          help=f"packed checkpoint or float source (default: {BUILTIN_MODEL})")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    generate.add_argument("--seed", type=int, default=None)
    add_device_flag(generate)
    add_head_flag(generate)
    generate.set_defaults(run=cmd_generate)
