"""The `trellis` command. Heavy modules are imported inside the subcommand that needs them."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from trellis_runtime.devices import DEVICES
from trellis_runtime.errors import TrellisError
from trellis_runtime.trellis import CODES, spec_for

# On a CPU the full 16-bit trellis would take hours for even a small model; 12 state bits keep a
# 2-bit SmolLM2-135M under about 15 minutes on 2 cores (README: L vs MSE vs time).
DEFAULT_STATE_BITS = {"cpu": 12, "cuda": 16}


def _device(name: str) -> str:
    if name == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise TrellisError("--device cuda requested but no CUDA device is available")
    return name


def _add_spec_arguments(parser: argparse.ArgumentParser, default_code: str) -> None:
    parser.add_argument("--bits", type=int, default=2, help="bits per weight K (1-4)")
    parser.add_argument("--state-bits", type=int, default=None,
                        help="trellis state bits L (8-16); default 12 on CPU, 16 on CUDA")
    parser.add_argument("--code", choices=CODES, default=default_code, help="state-to-value code")
    parser.add_argument("--vec", type=int, default=None,
                        help="values per trellis step V; default 1 for 1mad/3inst, 2 for hyb/lut")


def _spec(args: argparse.Namespace, device: str):
    state_bits = args.state_bits if args.state_bits is not None else DEFAULT_STATE_BITS[device]
    return spec_for(args.code, bits=args.bits, state_bits=state_bits, vec=args.vec)


def cmd_quantize(args: argparse.Namespace) -> int:
    device = _device(args.device)
    spec = _spec(args, device)
    from qat.ptq import QuantizeOptions, quantize_model
    from qat.text import read_text_file

    if args.calib_text is not None:
        read_text_file(args.calib_text)  # fail on bad text before loading the model
    options = QuantizeOptions(spec=spec, hessian=not args.no_hessian, calib_text=args.calib_text,
                              device=device, calib_windows=args.calib_windows,
                              layers_per_group=args.layers_per_group)
    quantize_model(args.src, Path(args.out), options)
    return 0


def cmd_eval_ppl(args: argparse.Namespace) -> int:
    device = _device(args.device)
    from qat.perplexity import perplexity
    from qat.sources import load_any_model
    from qat.text import evaluation_text

    text = evaluation_text(args.text)
    model, tokenizer = load_any_model(args.model, device)
    import torch

    tokens = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.int64)
    try:
        ppl, count = perplexity(model, tokens, ctx=args.ctx, max_tokens=args.max_tokens)
    except ValueError as err:
        raise TrellisError(str(err)) from None
    if args.json:
        print(json.dumps({"ppl": ppl, "tokens": count}))
    else:
        print(f"perplexity {ppl:.4f} over {count} predicted tokens (ctx {args.ctx})")
    return 0


def cmd_bench_codes(args: argparse.Namespace) -> int:
    device = _device(args.device)
    from trellis_cli.code_bench import bench_codes

    state_bits = 16 if args.state_bits is None else args.state_bits
    spec = spec_for(args.code, bits=args.bits, state_bits=state_bits, vec=args.vec)
    result = bench_codes(spec, sequences=args.sequences, device=device)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{spec}: mse {result['mse']:.5f} (bound 4^-K = {result['bound']:.5f}, "
              f"ratio {result['mse'] / result['bound']:.3f}) at pre-scale {result['scale_ratio']}, "
              f"{result['sequences']} sequences of 256, {result['tiles_per_second']:.1f} tiles/s")
    return 0


def cmd_bench_kernels(args: argparse.Namespace) -> int:
    from trellis_cli.kernel_bench import bench_kernels

    return bench_kernels(json_output=args.json)


def cmd_qat(args: argparse.Namespace) -> int:
    device = _device(args.device)
    from qat.text import read_text_file
    from qat.train import QatOptions, train_qat

    if args.calib_text is not None:
        read_text_file(args.calib_text)  # fail on bad text before loading any model
    options = QatOptions(layers=args.layers, steps=args.steps, lr=args.lr, t_start=args.t_start,
                         t_end=args.t_end, calib_text=args.calib_text, teacher=args.teacher,
                         device=device, ctx=args.ctx, eval_every=args.eval_every, loss=args.loss,
                         train_table=args.train_table, train_scale=args.train_scale, seed=args.seed)
    summary = train_qat(args.checkpoint, args.out, options)
    ppl = summary["validation_ppl"]
    print(f"wrote {args.out}: validation perplexity {ppl['ptq']:.3f} (PTQ) -> "
          f"{ppl['best_hardened']:.3f} (hardened, step {summary['best_step']}) in "
          f"{summary['seconds']:.0f} s; escape condition held: "
          f"{summary['drift_budget']['escape_condition_held']}")
    return 0


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
    spec = spec_for("hyb", bits=2, state_bits=DEFAULT_STATE_BITS[device])
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
    device = _device(settings.device)
    path = checkpoint_for(settings.model, device)
    from server.serve import serve
    from trellis_runtime.engine import Engine
    from trellis_runtime.model import load_model

    model, tokenizer = load_model(path, device)
    engine = Engine(model, tokenizer, max_batch=settings.max_batch,
                    max_seq_len=settings.max_seq_len)
    serve(engine, tokenizer, settings.served_model_name or settings.model or BUILTIN_MODEL,
          settings)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    device = _device(args.device)
    path = checkpoint_for(args.model, device)
    from trellis_runtime.engine import Engine
    from trellis_runtime.model import load_model
    from trellis_runtime.sampling import SamplingParams

    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens,
                            seed=args.seed)
    try:
        params.validate()
    except ValueError as err:
        raise TrellisError(str(err)) from None
    model, tokenizer = load_model(path, device)
    with Engine(model, tokenizer, max_batch=1) as engine:
        output = engine.generate_text(tokenizer(args.prompt)["input_ids"], params)
    print(output.text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trellis", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    quantize = commands.add_parser("quantize", help="quantize a float model to a packed checkpoint")
    quantize.add_argument("src", help="model directory, .gguf file, or built-in name smollm2-135m")
    quantize.add_argument("--out", required=True, help="checkpoint directory to create")
    _add_spec_arguments(quantize, default_code="hyb")
    quantize.add_argument("--no-hessian", action="store_true",
                          help="plain Viterbi rounding instead of Hessian-aware BlockLDLQ")
    quantize.add_argument("--calib-text", default=None,
                          help="UTF-8 text file for calibration (default: built-in Wikipedia text)")
    quantize.add_argument("--calib-windows", type=int, default=32,
                          help="calibration windows of 512 tokens")
    quantize.add_argument("--layers-per-group", type=int, default=3,
                          help="layers quantized together (batch size and resume granularity)")
    quantize.add_argument("--device", choices=DEVICES, default="cpu")
    quantize.set_defaults(run=cmd_quantize)

    qat = commands.add_parser("qat", help="BCJR-QAT: train a PTQ checkpoint through the soft "
                              "trellis against its float model, then harden with Viterbi")
    qat.add_argument("checkpoint", help="packed PTQ checkpoint (from trellis quantize)")
    qat.add_argument("--out", required=True, help="checkpoint directory to create")
    qat.add_argument("--layers", default="auto",
                     help="all, auto (CPU: the layer whose quantization costs the most; CUDA: "
                          "all) or comma-separated layer indices")
    qat.add_argument("--steps", type=int, default=12, help="optimizer steps, one text window each")
    qat.add_argument("--lr", type=float, default=None,
                     help="AdamW learning rate in units of each matrix's scale (default: twice the "
                          "largest measured Voronoi radius spread over the steps)")
    qat.add_argument("--t-start", type=float, default=0.3, help="first temperature")
    qat.add_argument("--t-end", type=float, default=0.05, help="last temperature (exponential)")
    qat.add_argument("--calib-text", default=None,
                     help="UTF-8 text file (default: the built-in Wikipedia calibration text)")
    qat.add_argument("--teacher", default=None,
                     help="float model to distil from (default: the checkpoint's source)")
    qat.add_argument("--ctx", type=int, default=1024, help="tokens per training window")
    qat.add_argument("--eval-every", type=int, default=4,
                     help="steps between hardened snapshots (scored; the best is kept)")
    qat.add_argument("--loss", choices=("kl", "mse"), default="kl",
                     help="kl: full-vocabulary KL to the teacher; mse: per-layer output MSE")
    qat.add_argument("--train-table", action="store_true", help="also train the code table")
    qat.add_argument("--train-scale", action="store_true", help="also train each matrix's scale")
    qat.add_argument("--seed", type=int, default=0)
    qat.add_argument("--device", choices=DEVICES, default="cpu")
    qat.set_defaults(run=cmd_qat)

    evaluate = commands.add_parser("eval", help="evaluate a model")
    eval_kinds = evaluate.add_subparsers(dest="kind", required=True)
    ppl = eval_kinds.add_parser("ppl", help="perplexity on text")
    ppl.add_argument("model", help="packed checkpoint, model directory, .gguf, or smollm2-135m")
    ppl.add_argument("--text", default=None,
                     help="UTF-8 text file (default: the evaluation part of the built-in text)")
    ppl.add_argument("--ctx", type=int, default=512, help="window length in tokens")
    ppl.add_argument("--max-tokens", type=int, default=None, help="use at most this many tokens")
    ppl.add_argument("--json", action="store_true", help='print one line {"ppl": ..., "tokens": ...}')
    ppl.add_argument("--device", choices=DEVICES, default="cpu")
    ppl.set_defaults(run=cmd_eval_ppl)

    serve = commands.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API",
        description="Every flag can also be set by the TRELLIS_* variable named in its help; a "
                    "flag wins over its variable.")
    from server.settings import add_arguments  # light (pydantic only); keeps flags and env as one

    add_arguments(serve)
    serve.set_defaults(run=cmd_serve)

    generate = commands.add_parser("generate", help="print a completion of a prompt")
    generate.add_argument("model", nargs="?", default=None,
                          help="packed checkpoint or float source (default: smollm2-135m)")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    generate.add_argument("--seed", type=int, default=None)
    generate.add_argument("--device", choices=DEVICES, default="cpu")
    generate.set_defaults(run=cmd_generate)

    bench = commands.add_parser("bench", help="benchmarks")
    bench_kinds = bench.add_subparsers(dest="kind", required=True)
    codes = bench_kinds.add_parser("codes", help="encoder MSE on Gaussian data vs the bound 4^-K")
    _add_spec_arguments(codes, default_code="hyb")
    codes.add_argument("--sequences", type=int, default=64, help="Gaussian tiles of 256 to encode")
    codes.add_argument("--json", action="store_true", help="print one JSON line")
    codes.add_argument("--device", choices=DEVICES, default="cpu")
    codes.set_defaults(run=cmd_bench_codes)
    kernels = bench_kinds.add_parser(
        "kernels", help="kernel max relative errors vs their references; timings on a GPU")
    kernels.add_argument("--json", action="store_true", help="print one JSON line: a list of rows")
    kernels.set_defaults(run=cmd_bench_kernels)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except TrellisError as err:
        message = " ".join(str(err).split())
        print(f"trellis: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("trellis: interrupted", file=sys.stderr)
        return 130
