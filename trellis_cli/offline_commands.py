"""`trellis quantize`, `trellis qat` and `trellis eval ppl`: the offline jobs of the `qat` package."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from trellis_cli.flags import add_device_flag, add_spec_flags, require_device, spec_from_arguments
from trellis_runtime.errors import TrellisError


def cmd_quantize(args: argparse.Namespace) -> int:
    device = require_device(args.device)
    spec = spec_from_arguments(args, device)
    from qat.ptq import QuantizeOptions, quantize_model
    from qat.text import read_text_file

    if args.calib_text is not None:
        read_text_file(args.calib_text)  # fail on bad text before loading the model
    options = QuantizeOptions(spec=spec, hessian=not args.no_hessian, calib_text=args.calib_text,
                              device=device, calib_windows=args.calib_windows,
                              layers_per_group=args.layers_per_group)
    quantize_model(args.src, Path(args.out), options)
    return 0


def cmd_qat(args: argparse.Namespace) -> int:
    device = require_device(args.device)
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


def cmd_eval_ppl(args: argparse.Namespace) -> int:
    device = require_device(args.device)
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


def add_commands(commands: argparse._SubParsersAction) -> None:
    quantize = commands.add_parser("quantize", help="quantize a float model to a packed checkpoint")
    quantize.add_argument("src", help="model directory, .gguf file, or built-in name smollm2-135m")
    quantize.add_argument("--out", required=True, help="checkpoint directory to create")
    add_spec_flags(quantize, default_code="hyb")
    quantize.add_argument("--no-hessian", action="store_true",
                          help="plain Viterbi rounding instead of Hessian-aware BlockLDLQ")
    quantize.add_argument("--calib-text", default=None,
                          help="UTF-8 text file for calibration (default: built-in Wikipedia text)")
    quantize.add_argument("--calib-windows", type=int, default=32,
                          help="calibration windows of 512 tokens")
    quantize.add_argument("--layers-per-group", type=int, default=3,
                          help="layers quantized together (batch size and resume granularity)")
    add_device_flag(quantize)
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
    add_device_flag(qat)
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
    add_device_flag(ppl)
    ppl.set_defaults(run=cmd_eval_ppl)
