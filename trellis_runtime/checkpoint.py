"""The packed checkpoint: a directory a user can copy, validated completely on load.

Layout:
- config.json: the model's own config plus a versioned "trellis" block (the spec and provenance);
- tokenizer files, as the tokenizer saved them;
- model.safetensors: per quantized linear `<module>.codes` (int32), `.input_signs`, `.output_signs`
  (int8), `.scale` (float32), `.code_table` (float16, table codes only); every other tensor
  (embeddings, norms, biases, untied lm_head) in bfloat16.

Format versions. Version 1 stores the input and output vectors as int8 ±1 signs, as quantization
makes them. Version 2 (written by end-to-end fine-tuning, qat/finetune.py) stores them as float16
real numbers under the same names; every backend multiplies by them the same way, so only loading
differs. A checkpoint is written as version 1 whenever all its vectors are signs, so quantization's
output stays byte-identical and readable by older versions.
No pickle anywhere; nothing absolute.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from trellis_runtime.architecture import ModelShape
from trellis_runtime.codes import table_shape
from trellis_runtime.errors import CheckpointError, SourceError, UnsupportedSpecError
from trellis_runtime.quantized import QuantizedWeight, tiles_to_codes_shape
from trellis_runtime.trellis import TrellisSpec

FORMAT_VERSION = 2  # the newest this version reads and writes
SIGNS_VERSION = 1  # written when every vector is a ±1 sign vector
VECTOR_DTYPES = {1: (torch.int8,), 2: (torch.int8, torch.float16)}  # what each version may hold
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
DENSE_DTYPE = torch.bfloat16


@dataclass
class Checkpoint:
    config: dict  # the model config, without the trellis block
    trellis: dict  # the trellis block: spec, format version, provenance
    spec: TrellisSpec
    quantized: dict[str, QuantizedWeight]  # by module name, e.g. model.layers.0.mlp.up_proj
    dense: dict[str, torch.Tensor]  # by tensor name, bfloat16

    @functools.cached_property
    def shape(self) -> ModelShape:
        return ModelShape.from_config(self.config)


def is_checkpoint(path: str | Path) -> bool:
    """A directory whose config.json carries a trellis block."""
    config = Path(path) / CONFIG_FILE
    if not config.is_file():
        return False
    try:
        return "trellis" in json.loads(config.read_text())
    except (OSError, ValueError):
        return False


def save_checkpoint(directory: Path, config: dict, trellis: dict,
                    quantized: dict[str, QuantizedWeight], dense: dict[str, torch.Tensor]) -> None:
    """Write config.json and model.safetensors into `directory` (the caller adds the tokenizer)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, weight in quantized.items():
        tensors.update(weight.tensors(name))
    for name, tensor in dense.items():
        tensors[name] = tensor.to(DENSE_DTYPE)
    tensors = {name: t.contiguous().clone() for name, t in tensors.items()}  # no shared storage
    weights = directory / WEIGHTS_FILE
    save_file(tensors, str(weights), metadata={"format": "trellis"})
    umask = os.umask(0)
    os.umask(umask)
    weights.chmod(0o666 & ~umask)  # readable like any other file the user writes, for copying
    full = dict(config)
    full["trellis"] = {"format_version": format_version(quantized), **trellis}
    (directory / CONFIG_FILE).write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")


def format_version(quantized: dict[str, QuantizedWeight]) -> int:
    """1 while every input/output vector is an int8 sign vector, else 2 (real float16 vectors)."""
    signs = all(weight.input_signs.dtype == torch.int8 and weight.output_signs.dtype == torch.int8
                for weight in quantized.values())
    return SIGNS_VERSION if signs else FORMAT_VERSION


def _read_config(directory: Path) -> tuple[dict, dict, TrellisSpec]:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory}: {CONFIG_FILE} is missing")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    trellis = config.pop("trellis", None)
    if not isinstance(trellis, dict):
        raise CheckpointError(f"{path}: no 'trellis' block; not a packed trellis checkpoint")
    version = trellis.get("format_version")
    if version not in VECTOR_DTYPES:
        raise CheckpointError(f"{path}: trellis format_version {version!r} is not supported "
                              f"(this version reads {', '.join(map(str, VECTOR_DTYPES))})")
    try:
        spec = TrellisSpec(**trellis["spec"])
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: trellis spec is malformed ({err})") from None
    except UnsupportedSpecError as err:
        raise CheckpointError(f"{path}: {err}") from None
    return config, trellis, spec


def _config_dimensions(shape: ModelShape) -> dict[str, int]:
    """The config.json fields that tensor shapes are made of, to name when a shape disagrees."""
    return {"hidden_size": shape.hidden, "intermediate_size": shape.intermediate,
            "vocab_size": shape.vocab, "head_dim": shape.head_dim}


def _expect(name: str, tensor: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype,
            config_dims: dict[str, int] | None = None) -> None:
    """A tensor of the wrong shape is blamed on config.json when a config field is what the
    expected size comes from (the tensors agree with each other, the config does not), otherwise on
    model.safetensors."""
    if tuple(tensor.shape) == tuple(shape) and tensor.dtype == dtype:
        return
    if tensor.dtype == dtype and tensor.dim() == len(shape):
        wanted = {want for want, held in zip(shape, tensor.shape) if want != held}
        said = [f"{key}={value}" for key, value in (config_dims or {}).items() if value in wanted]
        if said:
            raise CheckpointError(
                f"{CONFIG_FILE} says {', '.join(said)}, but {WEIGHTS_FILE} holds "
                f"{tuple(tensor.shape)} for tensor {name!r} (expected {tuple(shape)}): the config "
                f"does not describe these weights")
    raise CheckpointError(
        f"{WEIGHTS_FILE}: tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)}, "
        f"expected {dtype} {tuple(shape)}")


def _expect_finite(name: str, tensor: torch.Tensor) -> None:
    """Flipped bits in a float tensor show up as NaN or inf, which would silently poison every
    answer; refuse them at load."""
    if not bool(torch.isfinite(tensor).all()):
        raise CheckpointError(f"{WEIGHTS_FILE}: tensor {name!r} holds NaN or infinite values "
                              f"(a corrupt file)")


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Load and validate a packed checkpoint; any missing or inconsistent piece is named."""
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a checkpoint directory")
    config, trellis, spec = _read_config(directory)
    try:
        shape = ModelShape.from_config(config)
    except SourceError as err:
        raise CheckpointError(f"{directory / CONFIG_FILE}: {err}") from None
    for name in TOKENIZER_FILES:
        if not (directory / name).is_file():
            raise CheckpointError(f"{directory}: tokenizer file {name} is missing")
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{directory}: {WEIGHTS_FILE} is missing")
    try:
        with safe_open(str(weights), framework="pt", device=str(device)) as handle:
            available = set(handle.keys())

            def take(name: str) -> torch.Tensor:
                if name not in available:
                    raise CheckpointError(f"{weights}: tensor {name!r} is missing")
                return handle.get_tensor(name)

            dims = _config_dimensions(shape)
            dense = {}
            for name, expected in shape.dense_shapes().items():
                dense[name] = take(name)
                _expect(name, dense[name], expected, DENSE_DTYPE, dims)
                _expect_finite(name, dense[name])
            version = trellis["format_version"]
            quantized = {name: _load_quantized(take, name, out_in, spec, dims, version)
                         for name, out_in in shape.all_linear_shapes().items()}
    except SafetensorError as err:
        raise CheckpointError(f"{weights}: unreadable, truncated or corrupt ({err})") from None
    return Checkpoint(config=config, trellis=trellis, spec=spec, quantized=quantized, dense=dense)


def _load_vector(take, name: str, size: int, config_dims: dict[str, int], version: int
                 ) -> torch.Tensor:
    """An input or output vector: int8 ±1 signs, or (format 2) finite float16 numbers."""
    vector = take(name)
    allowed = VECTOR_DTYPES[version]
    _expect(name, vector, (size,), vector.dtype if vector.dtype in allowed else allowed[0],
            config_dims)
    if vector.dtype == torch.int8 and not bool((vector.abs() == 1).all()):
        raise CheckpointError(f"{WEIGHTS_FILE}: tensor '{name}' holds values other than +-1")
    _expect_finite(name, vector)
    return vector


def _load_quantized(take, name: str, out_in: tuple[int, int], spec: TrellisSpec,
                    config_dims: dict[str, int], version: int) -> QuantizedWeight:
    out_features, in_features = out_in
    signs = {side: _load_vector(take, f"{name}.{side}", size, config_dims, version)
             for side, size in (("input_signs", in_features), ("output_signs", out_features))}
    codes = take(f"{name}.codes")
    _expect(f"{name}.codes", codes, tiles_to_codes_shape(out_features, in_features, spec),
            torch.int32)
    scale = take(f"{name}.scale")
    _expect(f"{name}.scale", scale, (1,), torch.float32)
    if not bool(torch.isfinite(scale).all() and (scale > 0).all()):
        raise CheckpointError(f"{WEIGHTS_FILE}: tensor '{name}.scale' is not a finite positive "
                              f"number")
    table = None
    expected_table = table_shape(spec)
    if expected_table is not None:
        table = take(f"{name}.code_table")
        _expect(f"{name}.code_table", table, expected_table, torch.float16)
        _expect_finite(f"{name}.code_table", table)
    return QuantizedWeight(spec=spec, codes=codes, input_signs=signs["input_signs"],
                           output_signs=signs["output_signs"], scale=scale, table=table)
