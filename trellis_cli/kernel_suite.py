"""The kernels' correctness suite: each Triton kernel against its torch reference, fresh random inputs.

`trellis bench kernels` runs it where there is no GPU (in Triton's interpreter) and prints each
case's error; the tests assert the same cases against their tolerances, and on a GPU the same cases
run compiled. Every case poisons its output with NaN first, so an element a kernel never wrote
turns the error into NaN, which fails every tolerance.

The error is max |got - reference| / max |reference| with the reference in float64: relative to
the output's scale, so outputs that happen to be near zero do not blow it up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F

from trellis_runtime.backend_triton import TritonBackend, kernel_code
from trellis_runtime.codes import state_values, table_shape
from trellis_runtime.hadamard import random_signs, rotate, rotation_plan, small_factor, unrotate
from trellis_runtime.quantized import QuantizedWeight
from trellis_runtime.trellis import TILE_COLS, TILE_ROWS, TrellisSpec
from trellis_runtime.viterbi import path_error, viterbi


@dataclass(frozen=True)
class Case:
    kernel: str
    name: str
    tolerance: float  # the largest error the tests accept
    check: Callable[[torch.device], float]  # runs kernel and reference on a device: the error

    def run(self, device: str | torch.device = "cpu") -> float:
        return self.check(torch.device(device))


def random_weight(spec: TrellisSpec, out_features: int, in_features: int, seed: int,
                  scale: float | None = None, device: str | torch.device = "cpu"
                  ) -> QuantizedWeight:
    """A QuantizedWeight with uniformly random codes (every bitstream is a valid trellis code),
    random signs, a random float16 table where the code has one, and a random scale unless given."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(-2**31, 2**31, (out_features // TILE_ROWS, in_features // TILE_COLS,
                                          spec.words_per_tile), dtype=torch.int64, generator=gen)
    shape = table_shape(spec)
    table = None if shape is None else torch.randn(*shape, generator=gen).to(torch.float16)
    if scale is None:
        scale = float(torch.rand(1, generator=gen)) * 0.1 + 0.01
    signs = lambda n, k: random_signs(n, seed * 7919 + k)  # noqa: E731
    return QuantizedWeight(
        spec=spec, codes=codes.to(torch.int32).to(device),
        input_signs=signs(in_features, 1).to(device), output_signs=signs(out_features, 2).to(device),
        scale=torch.tensor([scale], dtype=torch.float32, device=device),
        table=None if table is None else table.to(device))


def with_real_vectors(weight: QuantizedWeight, seed: int) -> QuantizedWeight:
    """The weight with its ±1 signs scaled by random magnitudes in [0.5, 1.5) and stored in float16:
    the real input/output vectors of a fine-tuned (format 2) checkpoint."""
    gen = torch.Generator().manual_seed(seed)

    def real(signs: torch.Tensor) -> torch.Tensor:
        magnitude = 0.5 + torch.rand(signs.shape, generator=gen)
        return (signs.float().cpu() * magnitude).to(torch.float16).to(signs.device)

    return replace(weight, input_signs=real(weight.input_signs),
                   output_signs=real(weight.output_signs))


def random_checkpoint(config: dict, spec: TrellisSpec, device: torch.device, seed: int = 0):
    """An in-memory Checkpoint of the config's shape with random codes, signs and dense tensors,
    generated on `device` (an 8B model's codes would take minutes to draw on a CPU)."""
    from trellis_runtime.architecture import ModelShape
    from trellis_runtime.checkpoint import DENSE_DTYPE, Checkpoint

    shape = ModelShape.from_config(config)
    gen = torch.Generator(device).manual_seed(seed)
    table_dims = table_shape(spec)
    table = (None if table_dims is None
             else torch.randn(table_dims, device=device, generator=gen).half())

    def signs(n: int) -> torch.Tensor:
        return (1 - 2 * torch.randint(0, 2, (n,), device=device, generator=gen)).to(torch.int8)

    quantized = {}
    for name, (out, inp) in shape.all_linear_shapes().items():
        codes = torch.randint(-2**31, 2**31 - 1, (out // TILE_ROWS, inp // TILE_COLS, spec.words_per_tile),
                              dtype=torch.int32, device=device, generator=gen)
        scale = torch.tensor([1.0 / math.sqrt(inp)], device=device)  # keeps activations bounded
        quantized[name] = QuantizedWeight(spec, codes, signs(inp), signs(out), scale, table)
    dense = {name: (torch.ones(dims, device=device, dtype=DENSE_DTYPE) if len(dims) == 1 else
                    torch.randn(dims, device=device, generator=gen).to(DENSE_DTYPE) * 0.02)
             for name, dims in shape.dense_shapes().items()}
    return Checkpoint(config=config, trellis={}, spec=spec, quantized=quantized, dense=dense)


def max_rel_err(got: torch.Tensor, reference: torch.Tensor) -> float:
    """max |got - reference| / max |reference|, NaN if got holds a NaN."""
    got, reference = got.double().cpu(), reference.double().cpu()
    if torch.isnan(got).any():
        return float("nan")
    return float((got - reference).abs().max() / reference.abs().max())


def _spec(text: str) -> TrellisSpec:
    L, K, V, code = text.split(",")
    return TrellisSpec(int(L), int(K), int(V), code)


def _decode_case(spec: str, shape: tuple[int, int], seed: int, device: torch.device) -> float:
    from trellis_kernels.decode import decode_matrix

    weight = random_weight(_spec(spec), *shape, seed=seed, device=device)
    out = torch.full(shape, float("nan"), device=device)
    decode_matrix(weight.codes, kernel_code(weight), weight.scale, out=out, block_rows=32,
                  block_cols=32)
    return max_rel_err(out, weight.decode_rotated())


def _matmul_case(kernel: str, spec: str, shape: tuple[int, int], rows: int, dtype: torch.dtype,
                 seed: int, device: torch.device, **blocks: int) -> float:
    """x @ C^T for C the weight's unscaled code values; x exact in `dtype`."""
    from trellis_kernels.matmul import gemm, gemv_partials

    weight = random_weight(_spec(spec), *shape, seed=seed, scale=1.0, device=device)
    x = torch.randn(rows, shape[1], generator=torch.Generator().manual_seed(seed))
    x = x.to(device=device, dtype=dtype)
    if kernel == "gemv":
        got = gemv_partials(x, weight.codes, kernel_code(weight), **blocks)
        got = got.sum(0)  # the partials' sum is what the output rotation reads
    else:
        got = gemm(x, weight.codes, kernel_code(weight),
                   out=torch.full((rows, shape[0]), float("nan"), device=device), **blocks)
    return max_rel_err(got, x.double() @ weight.decode_rotated().double().T)


def _hadamard_case(direction: str, n: int, rows: int, seed: int, device: torch.device,
                   partials: int = 3) -> float:
    from trellis_kernels.hadamard import rotate_rows, unrotate_rows

    gen = torch.Generator().manual_seed(seed)
    small, norm = small_factor(n, device), rotation_plan(n).norm
    signs = random_signs(n, seed).to(device)
    out = torch.full((rows, n), float("nan"), device=device)
    if direction == "rotate":
        x = torch.randn(rows, n, generator=gen).to(device)
        return max_rel_err(rotate_rows(x, signs, small, out=out, norm=norm),
                           rotate(x.double(), signs))
    # split-K partials, summed on the way (several per iteration, the last group ragged)
    parts = torch.randn(partials, rows, n, generator=gen).to(device)
    scale = torch.tensor([0.75], device=device)
    got = unrotate_rows(parts, signs, small, scale, out=out, norm=norm)
    return max_rel_err(got, unrotate(parts.double().sum(0), signs) * 0.75)


def _linear_case(spec: str, shape: tuple[int, int], rows: int, dense_min_rows: int,
                 seed: int, device: torch.device) -> float:
    """The kernel backend of TrellisLinear, end to end, against x @ W^T for the dequantized W."""
    weight = random_weight(_spec(spec), *shape, seed=seed, device=device)
    x = torch.randn(rows, shape[1], generator=torch.Generator().manual_seed(seed)).to(device)
    backend = TritonBackend(weight, device, torch.float32, dense_min_rows=dense_min_rows)
    return max_rel_err(backend(x), x.double() @ weight.dequantize().double().T)


def _viterbi_case(spec: str, length: int, constrained: bool, seed: int,
                  device: torch.device) -> float:
    """Error of the kernel's path relative to the torch encoder's (both optimal: they differ only by
    float rounding), or NaN if the kernel's path breaks the trellis or the overlap."""
    from trellis_kernels.viterbi import viterbi_paths

    spec_ = _spec(spec)
    gen = torch.Generator().manual_seed(seed)
    shape = table_shape(spec_)
    table = None if shape is None else torch.randn(*shape, generator=gen).to(torch.float16)
    values = state_values(spec_, table).to(device)
    x = torch.randn(4, length, generator=gen).to(device)
    overlap = (torch.randint(0, spec_.num_groups, (4,), generator=gen).to(device)
               if constrained else None)
    path = viterbi_paths(x, values, spec_.state_bits, spec_.bits, spec_.vec, overlap=overlap)
    low, kv = spec_.num_groups - 1, spec_.step_bits
    valid = torch.equal(path[:, :-1] & low, path[:, 1:] >> kv)  # consecutive states overlap
    if constrained:  # and the ends go through the overlap
        valid = valid and torch.equal(path[:, 0] >> kv, overlap) \
            and torch.equal(path[:, -1] & low, overlap)
    if not valid:
        return float("nan")
    reference = viterbi(x, values, spec_, overlap=overlap)
    return max_rel_err(path_error(x, path, values), path_error(x, reference, values))


SMALL_LLAMA_CONFIG = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 768,
                      "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                      "vocab_size": 512, "max_position_embeddings": 1024, "rope_theta": 10000.0,
                      "rms_norm_eps": 1e-5, "tie_word_embeddings": False}


def _graphs_case(device: torch.device) -> float:
    """A decode step of three sequences (padded to a batch of 4, one past the first context
    bucket) through DecodeGraphs against the model's ordinary forward: replayed CUDA graphs on a
    GPU, the same static step run eagerly elsewhere."""
    from trellis_runtime.cuda_graphs import DecodeGraphs
    from trellis_runtime.model import TrellisModel

    spec = TrellisSpec(16, 2, 2, "hyb")
    model = TrellisModel.from_checkpoint(random_checkpoint(SMALL_LLAMA_CONFIG, spec, device), device)
    cache = model.new_cache(max_slots=4, max_seq_len=256)
    gen = torch.Generator().manual_seed(0)
    slots, lengths = [cache.allocate() for _ in range(3)], [5, 130, 9]
    for slot, length in zip(slots, lengths):
        prompt = torch.randint(0, 512, (length,), generator=gen).to(device)
        model(prompt, torch.arange(length, device=device),
              torch.full((length,), slot, device=device), cache)
    tokens = [7, 300, 11]
    got = DecodeGraphs(model, cache, max_batch=4).run(tokens, lengths, slots).clone()
    expected = model(*(torch.tensor(v, device=device) for v in (tokens, lengths, slots)), cache)
    return max_rel_err(got, expected)


ATTENTION_CACHE = (5, 2, 200)  # slots, kv heads, positions


def random_attention_inputs(group: int, head_dim: int, dtype: torch.dtype, seed: int,
                            device: str | torch.device = "cpu") -> tuple[torch.Tensor, ...]:
    """queries, keys, values, slots, positions of a decode step over a random cache: slot 3 twice
    (a padding row repeats the last sequence), positions on either side of the kernel's blocks."""
    generator = torch.Generator().manual_seed(seed)
    slots_total, kv_heads, length = ATTENTION_CACHE
    keys, values = (torch.randn(slots_total, kv_heads, length, head_dim, generator=generator)
                    for _ in range(2))
    slots, positions = torch.tensor([4, 0, 3, 3]), torch.tensor([0, 63, 64, 199])
    queries = torch.randn(len(slots), kv_heads, group, head_dim, generator=generator)
    return tuple(t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)
                 for t in (queries, keys, values, slots, positions))


def attention_reference(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                        slots: torch.Tensor, positions: torch.Tensor, scale: float,
                        window: int | None, softcap: float | None) -> torch.Tensor:
    """The model's own attention (trellis_runtime/attention.py) over the gathered rows, float64."""
    from trellis_runtime.attention import additive_mask, softcapped_attention, window_visibility

    context = int(positions.max()) + 1
    keys, values = keys.double()[slots, :, :context], values.double()[slots, :, :context]
    batch, _, group, _ = queries.shape
    mask = additive_mask(window_visibility(positions, context, window)[:, None, None, :]
                         .expand(batch, 1, group, context), torch.float64)
    if softcap is None:
        return F.scaled_dot_product_attention(queries.double(), keys, values, attn_mask=mask,
                                              scale=scale)
    return softcapped_attention(queries.double(), keys, values, mask, scale, softcap)


def _attention_case(group: int, head_dim: int, window: int | None, softcap: float | None,
                    seed: int, device: torch.device) -> float:
    from trellis_kernels.attention import decode_attention

    inputs = random_attention_inputs(group, head_dim, torch.float32, seed, device)
    scale = 3 * head_dim ** -0.5  # sharper than usual, so the softmax is not near-uniform
    got = decode_attention(*inputs, scale, window, softcap)
    return max_rel_err(got, attention_reference(*inputs, scale, window, softcap))


def _cases() -> list[Case]:
    cases: list[Case] = []
    for i, (spec, shape) in enumerate([("16,2,2,hyb", (48, 80)), ("16,3,1,3inst", (32, 48)),
                                       ("12,4,1,1mad", (32, 48)), ("10,2,2,lut", (48, 32)),
                                       ("11,1,1,lut", (32, 32)), ("8,3,2,hyb", (16, 48))]):
        cases.append(Case("decode", f"{spec} {shape[0]}x{shape[1]} float32", 0.0,
                          lambda dev, s=spec, sh=shape, i=i: _decode_case(s, sh, i, dev)))
    # (spec, shape, rows, dtype, blocks): one row runs the float32 FMA path, 2-16 rows tl.dot.
    # Shapes alternate between whole blocks everywhere (no masks) and ragged edges. Tables up to
    # trellis_kernels.matmul.SHARED_TABLE_ROWS are looked up in shared memory (HYB, LUT up to L=10),
    # larger ones (11,1,1,lut) from global memory.
    gemv = [
        ("16,2,2,hyb", (48, 80), 1, torch.float32, dict(splits=2, block_rows=32, block_tiles=2)),
        ("16,2,2,hyb", (64, 128), 1, torch.bfloat16, dict(splits=2, block_rows=32, block_tiles=2)),
        ("12,4,1,1mad", (48, 80), 1, torch.float32, dict(splits=3, block_rows=16, block_tiles=1)),
        ("16,3,1,3inst", (64, 128), 1, torch.float16, dict(splits=2, block_rows=64, block_tiles=4)),
        ("11,1,1,lut", (32, 80), 1, torch.float32, dict(splits=1, block_rows=64, block_tiles=8)),
        ("8,3,2,hyb", (48, 80), 1, torch.float32, dict(splits=2, block_rows=32, block_tiles=2)),
        ("10,2,2,lut", (64, 128), 1, torch.float32, dict(splits=2, block_rows=32, block_tiles=2)),
        ("9,1,1,lut", (48, 80), 1, torch.float16, dict(splits=2, block_rows=32, block_tiles=2)),
        ("10,2,2,lut", (48, 80), 5, torch.float16, dict(splits=2, block_rows=32, block_tiles=2)),
        ("16,2,2,hyb", (64, 128), 16, torch.float16, dict(splits=2, block_rows=32, block_tiles=4)),
        ("16,3,1,3inst", (48, 80), 3, torch.float16, dict(splits=1, block_rows=64, block_tiles=8)),
    ]
    gemm = [
        ("16,2,2,hyb", (48, 80), 40, torch.float16, dict(block_m=32, block_rows=32, block_tiles=8)),
        ("12,4,1,1mad", (64, 64), 32, torch.float16, dict(block_m=16, block_rows=32, block_tiles=4)),
        ("10,2,2,lut", (32, 48), 20, torch.float16, dict(block_m=32, block_rows=32, block_tiles=4)),
    ]
    for kernel, table in (("gemv", gemv), ("gemm", gemm)):
        for i, (spec, shape, rows, dtype, blocks) in enumerate(table):
            # float16 code values are exact; computed codes round to float16 for tl.dot.
            tolerance = 2e-3 if rows > 1 and spec.endswith(("mad", "inst")) else 1e-5
            name = f"{spec} {shape[0]}x{shape[1]} rows={rows} {str(dtype)[6:]}"
            cases.append(Case(kernel, name, tolerance,
                              lambda dev, k=kernel, s=spec, sh=shape, r=rows, d=dtype, b=blocks,
                              i=i: _matmul_case(k, s, sh, r, d, 10 + i, dev, **b)))
    for direction in ("rotate", "unrotate"):
        # 688 = 43 * 16 has no Kronecker construction: its rotation is block-diagonal.
        for i, (n, rows) in enumerate([(64, 3), (192, 2), (576, 2), (4096, 2), (1536, 1), (688, 2)]):
            partials = 3 if i % 2 == 0 else 6
            name = f"{direction} n={n} rows={rows}" + (f" partials={partials}"
                                                        if direction == "unrotate" else "")
            cases.append(Case("hadamard", name, 1e-5,
                              lambda dev, d=direction, n=n, r=rows, i=i, p=partials:
                              _hadamard_case(d, n, r, i, dev, p)))
    # The backend's four paths: float32 GEMV, float16 GEMV, GEMM, decode + dense matmul. Inside,
    # the 2+ row paths round the rotated input to float16.
    for i, (rows, dense_min_rows, path) in enumerate([(1, 128, "gemv float32"),
                                                      (5, 128, "gemv float16"),
                                                      (40, 128, "gemm float16"),
                                                      (40, 32, "decode+matmul float16")]):
        cases.append(Case("linear", f"16,2,2,hyb 64x192 rows={rows} {path}",
                          1e-5 if rows == 1 else 2e-3,
                          lambda dev, r=rows, d=dense_min_rows, i=i:
                          _linear_case("16,2,2,hyb", (64, 192), r, d, 30 + i, dev)))
    # Block-diagonal rotations (688 = 43 * 16) on either side, one row and several.
    for i, (shape, rows) in enumerate([((688, 64), 1), ((64, 688), 5)]):
        cases.append(Case("linear", f"16,2,2,hyb {shape[0]}x{shape[1]} rows={rows} block-diagonal",
                          1e-5 if rows == 1 else 2e-3,
                          lambda dev, sh=shape, r=rows, i=i:
                          _linear_case("16,2,2,hyb", sh, r, 128, 35 + i, dev)))
    for i, (spec, length, constrained) in enumerate([("8,2,1,1mad", 32, False),
                                                     ("8,2,2,hyb", 64, True),
                                                     ("9,3,1,3inst", 24, True),
                                                     ("10,1,2,lut", 32, False)]):
        cases.append(Case("viterbi", f"{spec} T={length} {'tail-biting' if constrained else 'free'}",
                          1e-5, lambda dev, s=spec, n=length, c=constrained, i=i:
                          _viterbi_case(s, n, c, 40 + i, dev)))
    for i, (group, head_dim, window, softcap) in enumerate([
            (1, 64, None, None), (3, 48, 50, None), (4, 128, None, 30.0), (2, 64, 70, 20.0)]):
        name = (f"group={group} head_dim={head_dim}" + (f" window={window}" if window else "")
                + (f" softcap={softcap:g}" if softcap else ""))
        cases.append(Case("attention", name, 1e-5,
                          lambda dev, g=group, d=head_dim, w=window, c=softcap, i=i:
                          _attention_case(g, d, w, c, 60 + i, dev)))
    cases.append(Case("cuda_graphs", "2-layer hyb model, decode step of 3 sequences", 1e-2,
                      _graphs_case))
    return cases


def _gpu_cases() -> list[Case]:
    """bfloat16 tl.dot: Triton's interpreter computes it wrongly, so only the GPU checks it."""
    return [Case(kernel, f"{spec} {shape[0]}x{shape[1]} rows={rows} bfloat16", 1e-2,
                 lambda dev, k=kernel, s=spec, sh=shape, r=rows, b=blocks:
                 _matmul_case(k, s, sh, r, torch.bfloat16, 50, dev, **b))
            for kernel, spec, shape, rows, blocks in [
                ("gemv", "16,2,2,hyb", (64, 128), 16, dict(splits=2, block_rows=32, block_tiles=4)),
                ("gemv", "16,3,1,3inst", (48, 80), 4, dict(splits=1, block_rows=64, block_tiles=8)),
                ("gemm", "16,2,2,hyb", (48, 80), 40, dict(block_m=32, block_rows=32, block_tiles=8)),
            ]]


CASES = _cases()
GPU_CASES = _gpu_cases()


def run_suite(device: str | torch.device = "cpu") -> list[dict]:
    """Run every case on `device` (on CUDA also GPU_CASES): rows of kernel, case and max_rel_err."""
    cases = CASES + (GPU_CASES if torch.device(device).type == "cuda" else [])
    return [{"kernel": c.kernel, "case": c.name, "max_rel_err": c.run(device)} for c in cases]
