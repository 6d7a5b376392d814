"""Shared fixtures: a small real Llama model on disk, built from the built-in model's tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Triton has no CPU backend: without a GPU its kernels run in the interpreter, which must be chosen
# before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def builtin_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The SmolLM2 tokenizer, read from the built-in GGUF and saved as ordinary tokenizer files."""
    from transformers import AutoTokenizer

    from qat.sources import resolve_source

    source = resolve_source("smollm2-135m")
    directory = tmp_path_factory.mktemp("tokenizer")
    AutoTokenizer.from_pretrained(source.directory, gguf_file=source.gguf_file).save_pretrained(
        str(directory))
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, builtin_tokenizer_dir: Path) -> Path:
    """A 2-layer Llama with random weights in a Hugging Face directory (safetensors + tokenizer).

    Its dimensions exercise the non-power-of-two Hadamard sizes (192 = 12*16) and GQA.
    """
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=192,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, tie_word_embeddings=True,
                         rope_theta=10000.0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    directory = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(str(directory), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(builtin_tokenizer_dir)).save_pretrained(str(directory))
    return directory


def pack_tiny_model(model_dir: Path, out: Path, code: str) -> Path:
    """The tiny model packed at 2 bits, L=8, with `code`, without a Hessian (seconds)."""
    from qat.ptq import QuantizeOptions, quantize_model
    from trellis_runtime.trellis import spec_for

    options = QuantizeOptions(spec=spec_for(code, state_bits=8), hessian=False)
    quantize_model(str(model_dir), out, options)
    return out


@pytest.fixture(scope="session")
def tiny_checkpoint_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model packed with 1MAD, for tests of the runtime."""
    return pack_tiny_model(tiny_model_dir, tmp_path_factory.mktemp("tiny-checkpoint") / "tiny", "1mad")


@pytest.fixture(scope="session")
def hyb_checkpoint_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model packed with HYB (a per-matrix table that QAT can train)."""
    return pack_tiny_model(tiny_model_dir, tmp_path_factory.mktemp("qat") / "tiny-hyb", "hyb")

