"""The checkpoint validator names the file and tensor for every missing or inconsistent piece."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from trellis_runtime.checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_checkpoint
from trellis_runtime.errors import CheckpointError


@pytest.fixture
def packed(tiny_checkpoint_dir: Path) -> Path:
    return tiny_checkpoint_dir


@pytest.fixture
def copy(packed: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(packed, target)
    return target


def rewrite_weights(directory: Path, change) -> None:
    tensors = load_file(str(directory / WEIGHTS_FILE))
    change(tensors)
    save_file(tensors, str(directory / WEIGHTS_FILE))


def expect_error(directory: Path, *words: str) -> None:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(directory)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


def test_loads_and_matches_spec(packed: Path) -> None:
    checkpoint = load_checkpoint(packed)
    assert checkpoint.spec.code == "1mad" and checkpoint.trellis["hessian"] is False
    assert all(t.dtype == torch.bfloat16 for t in checkpoint.dense.values())


def test_missing_tensor(copy: Path) -> None:
    name = "model.layers.1.mlp.down_proj.codes"
    rewrite_weights(copy, lambda t: t.pop(name))
    expect_error(copy, WEIGHTS_FILE, name, "missing")


def test_wrong_shape_and_dtype(copy: Path) -> None:
    name = "model.layers.0.self_attn.q_proj.codes"
    rewrite_weights(copy, lambda t: t.__setitem__(name, t[name][:, :-1].contiguous()))
    expect_error(copy, name, "expected")


def test_bad_signs(copy: Path) -> None:
    name = "model.layers.0.mlp.up_proj.input_signs"
    rewrite_weights(copy, lambda t: t[name].__setitem__(0, 3))
    expect_error(copy, name, "+-1")


def test_bad_scale(copy: Path) -> None:
    name = "model.layers.1.self_attn.v_proj.scale"
    rewrite_weights(copy, lambda t: t[name].fill_(-1.0))
    expect_error(copy, name, "positive")


def test_truncated_weights(copy: Path) -> None:
    path = copy / WEIGHTS_FILE
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    expect_error(copy, WEIGHTS_FILE)


def test_missing_files(copy: Path) -> None:
    (copy / "tokenizer.json").unlink()
    expect_error(copy, "tokenizer.json")
    (copy / WEIGHTS_FILE).unlink()
    (copy / CONFIG_FILE).unlink()
    expect_error(copy, CONFIG_FILE, "missing")


def test_config_mismatch(copy: Path) -> None:
    config = json.loads((copy / CONFIG_FILE).read_text())
    config["intermediate_size"] = 256
    (copy / CONFIG_FILE).write_text(json.dumps(config))
    expect_error(copy, "mlp", "expected")
    config["trellis"]["format_version"] = 99
    (copy / CONFIG_FILE).write_text(json.dumps(config))
    expect_error(copy, "format_version")
    config["trellis"]["format_version"] = 1
    config["trellis"]["spec"]["bits"] = 7
    (copy / CONFIG_FILE).write_text(json.dumps(config))
    expect_error(copy, CONFIG_FILE, "K=7")


@pytest.mark.parametrize("name", ["model.embed_tokens.weight", "model.norm.weight",
                                  "model.layers.1.post_attention_layernorm.weight"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_dense_tensor(copy: Path, name: str, bad: float) -> None:
    rewrite_weights(copy, lambda t: t[name].view(-1).__setitem__(7, bad))
    expect_error(copy, WEIGHTS_FILE, name, "NaN or infinite")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_scale(copy: Path, bad: float) -> None:
    name = "model.layers.0.mlp.down_proj.scale"
    rewrite_weights(copy, lambda t: t[name].fill_(bad))
    expect_error(copy, WEIGHTS_FILE, name, "finite positive")


@pytest.mark.parametrize("field, value, tensor", [
    ("hidden_size", 128, "model.embed_tokens.weight"),
    ("intermediate_size", 256, "model.layers.0.mlp.gate_proj.output_signs"),
    ("vocab_size", 50000, "model.embed_tokens.weight")])
def test_config_disagreeing_with_tensors_is_blamed_on_config(copy: Path, field: str, value: int,
                                                             tensor: str) -> None:
    config = json.loads((copy / CONFIG_FILE).read_text())
    config[field] = value
    (copy / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(copy)
    message = str(info.value)
    assert message.startswith(f"{CONFIG_FILE} says {field}={value}, but {WEIGHTS_FILE} holds "), \
        message
    assert repr(tensor) in message and "\n" not in message
