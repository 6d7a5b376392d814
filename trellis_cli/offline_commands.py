"""`trellis quantize`, `trellis qat` and `trellis eval ppl`: the offline jobs of the `qat` package.

The flags of quantize and qat are generated from their options dataclasses (trellis_cli/options.py),
which live in the training code; they are added only when that command runs (see CommandParser), so
no other command imports it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from trellis_cli.flags import (DEFAULT_CODE, DEFAULT_STATE_BITS, add_device_flag, add_head_flag,
                               add_spec_flags, device_code_help, device_state_bits_help, require_device,
                               spec_from_arguments)
from trellis_cli.options import add_option_flags, options_from_arguments
from trellis_runtime.errors import TrellisError


def cmd_quantize(args: argparse.Namespace) -> int:
    device = require_device(args.device)
    spec = spec_from_arguments(args, DEFAULT_STATE_BITS[device], DEFAULT_CODE[device])
    from qat.ptq import QuantizeOptions, quantize_model
    from qat.text import read_text_file

    if args.calib_text is not None:
        read_text_file(args.calib_text)  # fail on bad text before loading the model
    options = options_from_arguments(QuantizeOptions, args, spec=spec)
    if not args.ray:
        if args.ray_address is not None or args.ray_task_cpus is not None:
            raise TrellisError("--ray-address and --ray-task-cpus need --ray")
        quantize_model(args.src, Path(args.out), options)
        return 0
    try:
        from trellis_runtime.ray_cluster import ray_cluster
    except ImportError as err:
        raise TrellisError(f"--ray needs Ray ({err}): pip install 'trellis-runtime[ray]'") from None
    with ray_cluster(args.ray_address):
        quantize_model(args.src, Path(args.out), options, ray_task_cpus=args.ray_task_cpus or 1)
    return 0


def cmd_qat(args: argparse.Namespace) -> int:
    require_device(args.device)
    from qat.recipe import run_recipe
    from qat.text import read_text_file
    from qat.train import QatOptions

    if args.calib_text is not None:
        read_text_file(args.calib_text)  # fail on bad text before loading any model
    summaries = run_recipe(args.checkpoint, args.out, options_from_arguments(QatOptions, args))
    for stage, summary in summaries.items():
        ppl = summary["validation_ppl"]
        if stage == "bcjr":
            print(f"bcjr: validation perplexity {ppl['ptq']:.3f} (PTQ) -> "
                  f"{ppl['best_hardened']:.3f} (hardened, step {summary['best_step']}) in "
                  f"{summary['seconds']:.0f} s; escape condition held: "
                  f"{summary['drift_budget']['escape_condition_held']}")
        else:
            print(f"finetune: validation perplexity {ppl['start']:.3f} -> {ppl['best']:.3f} "
                  f"(step {summary['best_step']}) in {summary['seconds']:.0f} s")
    print(f"wrote {args.out}")
    return 0


def cmd_eval_ppl(args: argparse.Namespace) -> int:
    device = require_device(args.device)
    from qat.perplexity import perplexity
    from qat.sources import load_any_model
    from qat.text import evaluation_text

    text = evaluation_text(args.text)
    model, tokenizer = load_any_model(args.model, device)
    import torch

    if args.head == "int8":  # the values `trellis serve --head int8` multiplies by
        from trellis_runtime.backend_cpu import int8_rows, widened_rows

        head = model.get_output_embeddings()
        head.weight = torch.nn.Parameter(widened_rows(*int8_rows(head.weight.detach())),
                                         requires_grad=False)  # untied: the embeddings keep theirs

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


def quantize_arguments(parser: argparse.ArgumentParser) -> None:
    from qat.ptq import QuantizeOptions

    parser.add_argument("src", help="model directory, .gguf file, or built-in name smollm2-135m")
    parser.add_argument("--out", required=True, help="checkpoint directory to create")
    add_spec_flags(parser, device_state_bits_help(), device_code_help())
    add_option_flags(parser, QuantizeOptions)
    parser.add_argument("--ray", action="store_true",
                        help="quantize groups of layers in parallel as Ray tasks (a local Ray "
                             "unless --ray-address); the checkpoint is the same")
    parser.add_argument("--ray-address", default=None,
                        help="with --ray: join this Ray cluster (e.g. auto or HOST:PORT)")
    parser.add_argument("--ray-task-cpus", type=int, default=None,
                        help="with --ray on CPU: CPUs (threads) of each task (default 1)")


def qat_arguments(parser: argparse.ArgumentParser) -> None:
    from qat.train_options import QatOptions

    parser.add_argument("checkpoint", help="packed PTQ checkpoint (from trellis quantize)")
    parser.add_argument("--out", required=True, help="checkpoint directory to create")
    add_option_flags(parser, QatOptions)


def add_commands(commands: argparse._SubParsersAction) -> None:
    commands.add_parser("quantize", help="quantize a float model to a packed checkpoint",
                        arguments=quantize_arguments).set_defaults(run=cmd_quantize)
    commands.add_parser("qat", help="train a PTQ checkpoint against its float model: BCJR-QAT "
                        "of the codes, then end-to-end fine-tuning of the rest",
                        arguments=qat_arguments).set_defaults(run=cmd_qat)

    evaluate = commands.add_parser("eval", help="evaluate a model")
    eval_kinds = evaluate.add_subparsers(dest="kind", required=True)
    ppl = eval_kinds.add_parser("ppl", help="perplexity on text")
    ppl.add_argument("model", help="packed checkpoint, model directory, .gguf, or smollm2-135m")
    ppl.add_argument("--text", default=None,
                     help="UTF-8 text file (default: the evaluation part of the built-in text)")
    ppl.add_argument("--ctx", type=int, default=512, help="window length in tokens")
    add_head_flag(ppl)
    ppl.add_argument("--max-tokens", type=int, default=None, help="use at most this many tokens")
    ppl.add_argument("--json", action="store_true",
                     help='print one line {"ppl": ..., "tokens": ...}')
    add_device_flag(ppl)
    ppl.set_defaults(run=cmd_eval_ppl)
