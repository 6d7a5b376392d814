"""Post-training quantization: a float model to a packed trellis checkpoint.

Per linear: rotate both sides with random-sign Hadamard transforms (incoherence), divide by one
scale so the entries have the code's preferred spread, then BlockLDLQ with the tail-biting Viterbi
encoder as the rounding step (or plain Viterbi with --no-hessian).

The job streams: float weights are read by name when a group of layers needs them (qat/weights.py),
and the calibration activations pass through the float model one layer at a time, each layer's
Hessians accumulated just before it is quantized (qat/float_layers.py). Peak memory is one group of
layers and the activations between two layers, not the model.

The job is resumable and atomic. Work goes into a hidden `.<out>.partial` directory beside the
output: the arguments and one file per finished group of layers, each written to a temporary name
and renamed (a resumed run passes the activations through the finished layers again, without
quantizing them). The finished checkpoint is assembled there, validated, and renamed to
its final name in one step, so a reader never sees a half-written checkpoint, and a killed run
started again with the same arguments continues where it stopped and gives the same result. A run
that fails before it saved a group of layers removes the directory (qat.workdir).
"""

from __future__ import annotations

import json
import shutil
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file
from tqdm import tqdm

from qat.float_layers import FloatStream
from qat.hessian import damp, hessian_key
from qat.ldlq import LdlqJob, block_feedback, run_ldlq
from qat.sources import Source, load_tokenizer, resolve_source, source_config, source_weights
from qat.text import calibration_text
from qat.weights import Weights
from qat.workdir import atomic_save, prepare, publish, removed_unless_resumable
from trellis_runtime.architecture import ModelShape, transformers_config
from trellis_runtime.bitstream import pack_states
from trellis_runtime.checkpoint import DENSE_DTYPE, TOKENIZER_FILES, is_checkpoint, save_checkpoint
from trellis_runtime.codes import initial_table, state_values
from trellis_runtime.devices import DEFAULT_DEVICE, Device
from trellis_runtime.errors import SourceError, TrellisError
from trellis_runtime.generation_config import GENERATION_CONFIG_FILE
from trellis_runtime.hadamard import hadamard_factors, random_signs, rotate, rotate_weight
from trellis_runtime.quantized import QuantizedWeight, quantized_from_tensors
from trellis_runtime.trellis import TILE_COLS, TILE_ROWS, TrellisSpec
from trellis_runtime.viterbi import encode

if TYPE_CHECKING:
    from qat.ray_quantize import RayGroups

# Config keys that describe how the source was stored, not the model.
_DROPPED_CONFIG_KEYS = ("quantization_config", "_name_or_path", "_model_name_or_path", "dtype",
                        "torch_dtype", "transformers_version")


@dataclass(frozen=True)
class QuantizeOptions:
    """What `trellis quantize` takes: each field is a flag (trellis_cli/options.py) with this help,
    except those marked "flag": False, which only a library caller sets."""

    spec: TrellisSpec = field(metadata={"flag": False})  # the CLI's spec flags build it
    hessian: bool = field(default=True, metadata={
        "help": "plain Viterbi rounding instead of Hessian-aware BlockLDLQ"})
    calib_text: str | None = field(default=None, metadata={
        "help": "UTF-8 text file for calibration (default: built-in Wikipedia text)"})
    calib_ctx: int = field(default=512, metadata={"flag": False})  # tokens per calibration window
    calib_windows: int = field(default=32, metadata={
        "help": f"calibration windows of {calib_ctx.default} tokens"})
    # of mean(diag H), added to H's diagonal
    damping: float = field(default=0.01, metadata={"flag": False})
    # RMS of the scaled weights, relative to the unit-RMS code
    scale_ratio: float = field(default=0.9, metadata={"flag": False})
    layers_per_group: int = field(default=3, metadata={
        "help": "layers quantized together (batch size and resume granularity)"})
    seed: int = field(default=0, metadata={"flag": False})
    device: Device = DEFAULT_DEVICE

    def to_json(self) -> dict:
        data = asdict(self)
        data["spec"] = self.spec.to_dict()
        return data


def _seed(base: int, name: str) -> int:
    return zlib.crc32(f"{base}:{name}".encode())


def _check_shapes(shape: ModelShape) -> None:
    for name, (out_features, in_features) in shape.linear_shapes(0).items():
        for size in (out_features, in_features):
            if size % TILE_ROWS:
                raise SourceError(f"{name}: dimension {size} is not a multiple of {TILE_ROWS}")
            hadamard_factors(size)


def _calibration_windows(tokenizer, text: str, count: int, ctx: int, seed: int) -> torch.Tensor:
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.int64)
    if ids.numel() < count * ctx:
        raise TrellisError(f"calibration text has {ids.numel()} tokens; "
                           f"need at least {count * ctx} ({count} windows of {ctx})")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randperm(ids.numel() - ctx, generator=gen)[:count]
    return torch.stack([ids[s:s + ctx] for s in starts.tolist()])


def _rotated_feedback(hessian: torch.Tensor, signs: torch.Tensor, damping: float) -> torch.Tensor:
    """Feedback matrix of H_rot = R H R^T (R = Hadamard * diag(signs)), damped until it factors."""
    rotated = rotate(rotate(hessian, signs).t().contiguous(), signs)
    rotated = (rotated + rotated.t()) / 2
    for attempt in range(4):
        try:
            return block_feedback(damp(rotated, damping * 10 ** attempt)).to(torch.float32)
        except torch.linalg.LinAlgError:
            continue
    raise TrellisError("a Hessian is not positive definite even with strong damping")


class GroupQuantizer:
    """Quantizes a group of layers in one lockstep BlockLDLQ pass."""

    def __init__(self, weights: Weights, shape: ModelShape, options: QuantizeOptions,
                 table: torch.Tensor | None):
        """`table`: initial_table(options.spec, options.seed), made once per run by the caller
        (a k-means of seconds) and shared by every group, Ray tasks included."""
        self.weights = weights
        self.shape = shape
        self.options = options
        self.table = table
        self.values = state_values(options.spec, self.table, device=options.device)

    def quantize_tiles(self, tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tiles = tiles.to(self.options.device)
        states = encode(tiles, self.values, self.options.spec)
        recon = self.values[states].reshape(tiles.shape)
        return recon.cpu(), states.cpu()

    def __call__(self, layers: list[int], hessians: dict[str, torch.Tensor] | None,
                 progress: tqdm) -> dict[str, torch.Tensor]:
        """The packed tensors of `layers`; hessians: theirs by hessian_key, None for plain Viterbi. Each
        Hessian is taken out of the dict once it became a feedback matrix, and each float weight is
        dropped once rotated, so the group holds one copy of its weights and factors."""
        spec, options = self.options.spec, self.options
        jobs, members = [], []
        for layer in layers:
            for group, names in self.shape.input_groups().items():
                rows, parts, input_signs = [], [], None
                for name in names:
                    full = f"model.layers.{layer}.{name}"
                    weight = self.weights.get(f"{full}.weight")
                    if input_signs is None:  # one per group: its linears share their input rotation
                        input_signs = random_signs(weight.shape[1],
                                                   _seed(options.seed, f"{layer}.{group}.in"))
                    output_signs = random_signs(weight.shape[0], _seed(options.seed, full))
                    rotated = rotate_weight(weight, input_signs, output_signs)
                    # Summed in float64: a float32 sum's last bit depends on how many threads
                    # split it, and a Ray task may run on fewer than this process.
                    scale = (rotated.double().pow(2).mean().sqrt() / options.scale_ratio).float()
                    rows.append(rotated / scale)
                    parts.append((full, weight.shape[0], input_signs, output_signs, scale))
                feedback = None
                if hessians is not None:
                    feedback = _rotated_feedback(hessians.pop(hessian_key(layer, group)),
                                                 input_signs, options.damping)
                jobs.append(LdlqJob(torch.cat(rows), feedback))
                members.append(parts)
        total = sum(job.weight.numel() for job in jobs) // (TILE_ROWS * TILE_COLS)
        with tqdm(total=total, desc=f"layers {layers[0]}-{layers[-1]}", unit="tile",
                  leave=False) as tiles_bar:
            run_ldlq(jobs, self.quantize_tiles, on_block=tiles_bar.update)
        tensors: dict[str, torch.Tensor] = {}
        for job, parts in zip(jobs, members):
            row = 0
            for full, out_features, input_signs, output_signs, scale in parts:
                states = job.states[row // TILE_ROWS:(row + out_features) // TILE_ROWS]
                weight = QuantizedWeight(
                    spec=spec, codes=pack_states(states, spec), input_signs=input_signs,
                    output_signs=output_signs, scale=scale.reshape(1).to(torch.float32),
                    table=self.table)
                tensors.update(weight.tensors(full))
                row += out_features
        progress.update(len(layers))
        return tensors


def _write_generation_config(final: Path, config: dict, source: Source) -> None:
    """The source's generation config (its EOS ids are where generation stops): a model directory's
    file as it is, or for GGUF the one transformers derives from the config it read from the file."""
    from transformers import GenerationConfig

    if source.gguf_file is not None:
        GenerationConfig.from_model_config(transformers_config(config)).save_pretrained(str(final))
    elif (source.directory / GENERATION_CONFIG_FILE).is_file():
        shutil.copyfile(source.directory / GENERATION_CONFIG_FILE, final / GENERATION_CONFIG_FILE)


def _write_checkpoint(final: Path, weights: Weights, config: dict, tokenizer, shape: ModelShape,
                      tensors: dict, options: QuantizeOptions, source: Source) -> None:
    """Write the quantized checkpoint, with the tokenizer's files and the source's generation
    config, into the empty directory `final`."""
    quantized = {name: quantized_from_tensors(tensors, name, options.spec)
                 for name in shape.all_linear_shapes()}
    # In the checkpoint's dtype as they are read: an 8B model's embeddings and head are 2 GB each in
    # float32, half that as stored.
    dense = {name: weights.get(name, DENSE_DTYPE) for name in shape.dense_shapes()}
    config = {k: v for k, v in config.items() if k not in _DROPPED_CONFIG_KEYS}
    trellis = {"spec": options.spec.to_dict(), "hessian": options.hessian,
               "source": source.name, "scale_ratio": options.scale_ratio,
               "damping": options.damping if options.hessian else None, "seed": options.seed,
               "calibration": None if not options.hessian else {
                   "text": options.calib_text or "built-in Wikipedia excerpt",
                   "windows": options.calib_windows, "ctx": options.calib_ctx}}
    save_checkpoint(final, config, trellis, quantized, dense)
    tokenizer.save_pretrained(str(final))
    _write_generation_config(final, config, source)
    missing = [name for name in TOKENIZER_FILES if not (final / name).is_file()]
    if missing:
        raise TrellisError(f"the tokenizer did not write {', '.join(missing)}")


def _refuse_existing_output(out: Path) -> None:
    if out.exists():
        if is_checkpoint(out):
            raise TrellisError(f"{out} already holds a checkpoint; remove it or choose another --out")
        raise TrellisError(f"{out} already exists and is not a checkpoint; choose another --out")


def _resumable(work: Path) -> bool:
    """A failed run is worth resuming once it saved a finished group of layers."""
    return any(work.glob("layers-*.safetensors"))


def _quantize_groups(work: Path, quantizer: GroupQuantizer, stream: FloatStream | None,
                     shape: ModelShape, options: QuantizeOptions,
                     tasks: "RayGroups | None" = None) -> dict[str, torch.Tensor]:
    """Every layer's packed tensors: a group finished by an earlier run is read back, the others are
    quantized and saved, one file per group. The stream (Hessian mode) passes through every layer,
    collecting Hessians only for the groups still to quantize. With `tasks` (qat.ray_quantize) each
    group is quantized by a Ray task as soon as its Hessians are in, and saved when it returns."""
    tensors: dict[str, torch.Tensor] = {}
    groups = [list(range(i, min(i + options.layers_per_group, shape.layers)))
              for i in range(0, shape.layers, options.layers_per_group)]
    with tqdm(total=shape.layers, desc="quantize", unit="layer") as progress:
        for layers in groups:
            path = work / f"layers-{layers[0]:03d}-{layers[-1]:03d}.safetensors"
            done = path.is_file()
            hessians = None
            if stream is not None:
                hessians = {}
                for _ in layers:
                    hessians.update(stream.advance(collect=not done))
            if done:
                tensors.update(load_file(str(path)))
                progress.update(len(layers))
            elif tasks is not None:
                tasks.submit(layers, hessians, path)
            else:
                group_tensors = quantizer(layers, hessians, progress)
                atomic_save(group_tensors, path)
                tensors.update(group_tensors)
        for layers, path, group_tensors in tasks.finished() if tasks is not None else ():
            atomic_save(group_tensors, path)
            tensors.update(group_tensors)
            progress.update(len(layers))
    return tensors


def quantize_model(source_name: str, out: Path, options: QuantizeOptions,
                   ray_task_cpus: int | None = None) -> None:
    """Quantize `source_name` into the checkpoint directory `out` (see module docstring). With
    `ray_task_cpus`, groups of layers run as Ray tasks of that many CPUs each, on the cluster this
    process is connected to (qat.ray_quantize); the checkpoint is the same.

    Everything that needs only the config, the tokenizer and the calibration text is checked
    before any weight is read and before the work directory is created, so bad input fails
    in seconds and leaves nothing behind."""
    started = time.time()
    out = Path(out)
    source = resolve_source(source_name)
    _refuse_existing_output(out)
    config = source_config(source)
    shape = ModelShape.from_config(config)
    _check_shapes(shape)
    tokenizer = load_tokenizer(source)
    windows = None
    if options.hessian:
        windows = _calibration_windows(tokenizer, calibration_text(options.calib_text),
                                       options.calib_windows, options.calib_ctx, options.seed)
    with removed_unless_resumable(out, _resumable) as work:
        if prepare(out, json.dumps(options.to_json(), sort_keys=True)):
            print(f"resuming from {work}")
        weights = source_weights(source)
        stream = None if windows is None else FloatStream(shape, config, weights, windows)
        table = initial_table(options.spec, seed=options.seed)
        tasks = None
        if ray_task_cpus is not None:
            from qat.ray_quantize import RayGroups  # Ray is an optional extra

            tasks = RayGroups(source_name, config, options, table, ray_task_cpus)
        tensors = _quantize_groups(work, GroupQuantizer(weights, shape, options, table), stream,
                                   shape, options, tasks)
        publish(out, lambda final: _write_checkpoint(final, weights, config, tokenizer, shape, tensors,
                                                     options, source))
    print(f"wrote {out} in {time.time() - started:.0f} s ({options.spec})")
