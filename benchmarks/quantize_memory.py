"""Peak host memory of `trellis quantize` on a synthetic model with 8B-shaped layers.

Writes a random Llama with Llama-3-8B's dimensions (hidden 4096, intermediate 14336, 32 heads, 8 kv heads,
vocabulary 128256, untied head) but only a few layers, as sharded bf16 safetensors with the built-in
tokenizer, then quantizes it with Hessians through the real CLI in a child process and reads the
child's peak resident memory. Quantization streams (qat/ptq.py), so the peak is set by one group of
layers and the calibration activations, not by the layer count: the measured peak is what a whole
8B model needs, plus its packed codes (2 bits per weight) held until the checkpoint is written.

The Viterbi rounding is cheaper at small state counts (--state-bits, default 8) and its memory is
bounded by a fixed chunk budget at any state count (trellis_runtime/viterbi.py), so the peak measured
here holds for the default spec too, at far less CPU time.

    .venv/bin/python benchmarks/quantize_memory.py [--layers 2] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

RESULTS = Path(__file__).parent / "results" / "quantize_memory.json"
LLAMA3_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
             "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192,
             "rope_theta": 500000.0, "tie_word_embeddings": False, "rms_norm_eps": 1e-5}


def write_synthetic_model(directory: Path, layers: int) -> int:
    """A random bf16 Llama of LLAMA3_8B's shape with `layers` layers, one shard per layer; the number
    of parameters. Each tensor is drawn and written in turn, so this process holds one layer."""
    from transformers import AutoTokenizer, LlamaConfig

    from qat.sources import resolve_source

    config = LlamaConfig(num_hidden_layers=layers, **LLAMA3_8B)
    config.save_pretrained(str(directory))
    builtin = resolve_source("smollm2-135m")
    AutoTokenizer.from_pretrained(builtin.directory, gguf_file=builtin.gguf_file).save_pretrained(
        str(directory))
    h, i, heads, kv = (config.hidden_size, config.intermediate_size, config.num_attention_heads,
                       config.num_key_value_heads)
    d = h // heads
    generator = torch.Generator().manual_seed(0)

    def random(*shape: int) -> torch.Tensor:
        return (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)

    shards = {"embed": {"model.embed_tokens.weight": random(config.vocab_size, h)},
              "head": {"lm_head.weight": random(config.vocab_size, h),
                       "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}}
    weight_map, parameters = {}, 0
    for name, tensors in shards.items():
        save_file(tensors, str(directory / f"{name}.safetensors"))
        weight_map.update(dict.fromkeys(tensors, f"{name}.safetensors"))
        parameters += sum(t.numel() for t in tensors.values())
    for layer in range(layers):
        prefix = f"model.layers.{layer}"
        shapes = {"self_attn.q_proj": (heads * d, h), "self_attn.k_proj": (kv * d, h),
                  "self_attn.v_proj": (kv * d, h), "self_attn.o_proj": (h, heads * d),
                  "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}
        tensors = {f"{prefix}.{name}.weight": random(*shape) for name, shape in shapes.items()}
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"{prefix}.{norm}.weight"] = torch.ones(h, dtype=torch.bfloat16)
        file = f"layer-{layer:03d}.safetensors"
        save_file(tensors, str(directory / file))
        weight_map.update(dict.fromkeys(tensors, file))
        parameters += sum(t.numel() for t in tensors.values())
        del tensors
    index = {"metadata": {"total_size": parameters * 2}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return parameters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--state-bits", type=int, default=8)
    parser.add_argument("--work", default=None, help="directory for the model (default: temp)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="quantize-memory-"))
    source, out = work / "source", work / "packed"
    shutil.rmtree(work / "source", ignore_errors=True)
    source.mkdir(parents=True)
    parameters = write_synthetic_model(source, args.layers)
    command = [sys.executable, "-m", "trellis_cli", "quantize", str(source), "--out", str(out),
               "--state-bits", str(args.state_bits)]
    started = time.time()
    subprocess.run(command, check=True)
    seconds = time.time() - started
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # kB on Linux
    layer_parameters = (parameters - 2 * 128256 * 4096 - 4096) // args.layers
    result = {
        "what": "peak RSS of `trellis quantize` (Hessians, default calibration) on a random Llama with "
                "Llama-3-8B-shaped layers",
        "layers": args.layers, "state_bits": args.state_bits, "parameters": parameters,
        "parameters_per_layer": layer_parameters, "seconds": round(seconds, 1),
        "peak_rss_bytes": peak, "peak_rss_gib": round(peak / 2**30, 2),
        # What the other 30 layers of a real 8B model add: their packed codes (2 bits per weight).
        "packed_codes_per_layer_gib": round(layer_parameters * 2 / 8 / 2**30, 3),
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "cpu": platform.processor() or platform.machine()},
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
