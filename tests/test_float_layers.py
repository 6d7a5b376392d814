"""The quantizer's streaming inputs: float tensors read lazily from safetensors (sharded or not, any float
dtype), and Hessians accumulated layer by layer that equal those of transformers' own model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qat.float_layers import FloatStream
from qat.hessian import hessian_key
from qat.sources import resolve_source, source_config
from qat.weights import SafetensorsWeights
from test_architectures import FAMILIES, random_source_model
from trellis_runtime.architecture import ModelShape
from trellis_runtime.errors import SourceError


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sharded_weights_read_lazily_equal_the_files(tiny_model_dir: Path, tmp_path: Path,
                                                     dtype: torch.dtype) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=dtype)
    model.save_pretrained(str(tmp_path), safe_serialization=True, max_shard_size="1MB")
    shards = sorted(tmp_path.glob("*.safetensors"))
    assert len(shards) >= 2 and (tmp_path / "model.safetensors.index.json").is_file()
    weights = SafetensorsWeights(tmp_path)
    expected = {name: t for shard in shards for name, t in load_file(str(shard)).items()}
    for name, tensor in expected.items():
        read = weights.get(name)
        assert read.dtype == torch.float32 and torch.equal(read, tensor.to(torch.float32)), name
    with pytest.raises(SourceError, match="no tensor 'model.nothing'"):
        weights.get("model.nothing")


@pytest.mark.parametrize("family", ["llama-biases", "gemma2", "phi3"])
def test_streamed_hessians_equal_transformers(family: str, builtin_tokenizer_dir: Path,
                                              tmp_path: Path) -> None:
    """Every input group of every layer, from activations pushed one layer at a time, against hooks
    on transformers' model run whole on the same windows (two batches, the second one short)."""
    from transformers import AutoModelForCausalLM

    model_type, extra = FAMILIES[family]
    directory = random_source_model(model_type, extra, tmp_path / "source", builtin_tokenizer_dir)
    source = resolve_source(str(directory))
    config = source_config(source)
    shape = ModelShape.from_config(config)
    windows = torch.randint(0, 1000, (3, 16), generator=torch.Generator().manual_seed(0))

    stream = FloatStream(shape, config, SafetensorsWeights(directory), windows, batch_size=2)
    streamed = {}
    for _ in range(shape.layers):
        streamed.update(stream.advance())

    reference = AutoModelForCausalLM.from_pretrained(
        str(directory), dtype=torch.float32,
        attn_implementation="eager" if shape.attention_softcap else "sdpa").eval()
    seen: dict[str, list[torch.Tensor]] = {}
    for layer in range(shape.layers):
        for group, members in shape.input_groups().items():
            key = hessian_key(layer, group)
            module = reference.model.layers[layer].get_submodule(members[0])
            module.register_forward_pre_hook(
                lambda m, inputs, key=key: seen.setdefault(key, []).append(
                    inputs[0].reshape(-1, inputs[0].shape[-1])))
    with torch.inference_mode():
        reference(windows)
    assert set(streamed) == set(seen)
    for key, inputs in seen.items():
        x = torch.cat(inputs).to(torch.float64)
        expected = x.t() @ x / x.shape[0]
        scale = expected.abs().max().item()
        assert (streamed[key] - expected).abs().max().item() <= 1e-5 * scale, key


def test_builtin_source_config_reads_no_weights() -> None:
    config = source_config(resolve_source("smollm2-135m"))
    assert ModelShape.from_config(config).layers == 30
