"""Streamed Hessians against transformers' on the built-in model, and what the difference does to PTQ.

Quantization collects each layer's Hessians by pushing the calibration windows through the runtime's own
float decoder layer, one layer at a time (qat/float_layers.py), where it used to hook transformers' whole
model. The weights it reads and the rounding are unchanged (a --no-hessian layer is bit-identical), so
the Hessians are the only input that moved. This script measures, on SmolLM2-135M with the default
calibration (32 windows of 512 tokens):
  - the largest difference between the two Hessians of every input group, relative to the largest entry;
  - for the first `--layers` layers, BlockLDLQ with each: the fraction of identical codes and the proxy
    loss tr(dW H dW^T) / tr(W H W^T) of each, under transformers' Hessian.
Writes benchmarks/results/stream_hessians.json.

    .venv/bin/python benchmarks/stream_hessians.py [--layers 1]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tqdm import tqdm

from qat.float_layers import FloatStream
from qat.hessian import hessian_key
from qat.ptq import QuantizeOptions, _calibration_windows, GroupQuantizer
from qat.sources import (load_float_lm, load_tokenizer, resolve_source, source_config,
                         source_weights)
from qat.text import calibration_text
from trellis_cli.flags import default_spec
from trellis_runtime.architecture import ModelShape
from trellis_runtime.codes import initial_table
from trellis_runtime.quantized import quantized_from_tensors

RESULTS = Path(__file__).parent / "results" / "stream_hessians.json"


def transformers_hessians(model, shape: ModelShape, windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """E[x x^T] of each input group's first linear, hooked on transformers' model run whole."""
    sums: dict[str, torch.Tensor] = {}
    for layer, block in enumerate(model.model.layers):
        for group, members in shape.input_groups().items():
            def hook(module, inputs, key=hessian_key(layer, group)):
                x = inputs[0].reshape(-1, inputs[0].shape[-1])
                partial = (x.t() @ x).to(torch.float64)
                sums[key] = partial if key not in sums else sums[key].add_(partial)
            block.get_submodule(members[0]).register_forward_pre_hook(hook)
    with torch.inference_mode():
        for batch in windows.split(4):
            model.model(batch)
    return {key: total / windows.numel() for key, total in sums.items()}


def proxy_loss(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr(dW H dW^T) / tr(W H W^T): the output error the quantized weight adds on calibration inputs."""
    h = hessian.to(torch.float64)
    error = (quantized - weight).to(torch.float64)
    return float(torch.einsum("ij,jk,ik->", error, h, error)
                 / torch.einsum("ij,jk,ik->", weight.double(), h, weight.double()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=1)
    args = parser.parse_args()
    source = resolve_source("smollm2-135m")
    config = source_config(source)
    shape = ModelShape.from_config(config)
    options = QuantizeOptions(spec=default_spec("cpu"))
    windows = _calibration_windows(load_tokenizer(source), calibration_text(None),
                                   options.calib_windows, options.calib_ctx, options.seed)
    weights = source_weights(source)
    stream = FloatStream(shape, config, weights, windows)
    streamed: dict[str, torch.Tensor] = {}
    for _ in tqdm(range(shape.layers), desc="streamed hessians", unit="layer"):
        streamed.update(stream.advance())
    reference = transformers_hessians(load_float_lm(source), shape, windows)
    relative = {key: float((streamed[key] - h).abs().max() / h.abs().max())
                for key, h in reference.items()}

    layers = list(range(args.layers))
    quantizer = GroupQuantizer(weights, shape, options,
                               initial_table(options.spec, seed=options.seed))
    packed = {name: quantizer(layers, {k: h.clone() for k, h in hessians.items()}, tqdm(disable=True))
              for name, hessians in (("streamed", streamed), ("transformers", reference))}
    linears = {}
    for name in (n for n in shape.all_linear_shapes() if int(n.split(".")[2]) in layers):
        group = next(g for g, members in shape.input_groups().items()
                     if name.split(".", 3)[3] in members)
        hessian = reference[hessian_key(int(name.split(".")[2]), group)]
        weight = weights.get(f"{name}.weight")
        quantized = {kind: quantized_from_tensors(tensors, name, options.spec)
                     for kind, tensors in packed.items()}
        linears[name] = {
            "identical_codes": float((quantized["streamed"].codes == quantized["transformers"].codes)
                                     .float().mean()),
            **{f"proxy_loss_{kind}": proxy_loss(weight, q.dequantize(), hessian)
               for kind, q in quantized.items()}}
    result = {"windows": list(windows.shape), "spec": options.spec.to_dict(),
              "hessian_max_relative_difference": max(relative.values()), "linears": linears}
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"hessian_max_relative_difference": result["hessian_max_relative_difference"],
                      **{n: v for n, v in linears.items()}}, indent=1))


if __name__ == "__main__":
    main()
