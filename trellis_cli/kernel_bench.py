"""`trellis bench kernels`: correctness off the GPU, speed on it.

Without CUDA the correctness suite (trellis_cli/kernel_suite.py) runs in Triton's interpreter
and reports each case's max relative error. On a GPU the same suite runs compiled, then the timings:

- the fused GEMV (and the whole quantized linear: rotate, GEMV, unrotate) on Llama-3-8B-shaped
  matrices at K = 2, 3, 4, batch 1 and 16, against torch float16 matmul of the same shape;
- the GEMV's bandwidth on the packed bytes against a device-to-device copy measured in the same run;
- large batches: fused GEMM against decode + cuBLAS, to place the crossover (DENSE_MIN_ROWS);
- the Hadamard kernel against the torch rotation;
- the Viterbi kernel's tiles per second against the torch encoder;
- end to end: batch-1 decode tokens/s of a Llama-3-8B-shaped model at 2 bits against the same
  model with 16-bit weights.

Timing uses CUDA events around CUDA-graph replays of many calls (so that Python's launch overhead
is not what is measured), after a warm-up, taking the median of repeats. Each call reads another
copy of the weights, cycling through copies that together exceed the L2 cache several times, so
every call streams its weights from device memory as a decode step does.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from trellis_cli.kernel_suite import random_checkpoint, random_weight
from trellis_runtime.backend_triton import TritonBackend
from trellis_runtime.trellis import TrellisSpec

# Llama-3-8B's linear shapes (out, in): q/o, k/v, gate/up, down.
LLAMA3_8B_SHAPES = ((4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336))
L2_MULTIPLE = 4  # rotated copies of an operand span this many L2 caches
REPEATS = 15


@dataclass
class GraphTimer:
    """Median seconds per call of step(i), i cycling over `count` operand copies, from CUDA-graph
    replays of one pass over all copies."""

    repeats: int = REPEATS

    def __call__(self, step: Callable[[int], object], count: int) -> float:
        for i in range(count):  # warm-up: compiles kernels, sizes allocator pools
            step(i)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(count):
                step(i)
        graph.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(self.repeats):
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000 / count)
        return statistics.median(times)


def copies_for(nbytes: int, device: torch.device) -> int:
    """How many copies of an nbytes operand to cycle through so they exceed the L2 cache."""
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    return max(2, math.ceil(L2_MULTIPLE * l2 / max(nbytes, 1)))


def copy_bandwidth(device: torch.device, timer: GraphTimer, nbytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    source = torch.randn(nbytes // 4, device=device)
    target = torch.empty_like(source)
    seconds = timer(lambda i: target.copy_(source), 4)
    return 2 * nbytes / seconds


def weight_copies(spec: TrellisSpec, shape: tuple[int, int], device: torch.device, seed: int
             ) -> list:
    """Kernel backends over enough copies of one random weight to exceed the L2 cache."""
    weight = random_weight(spec, *shape, seed=seed, device=device)
    count = copies_for(weight.codes.numel() * 4, device)
    backends = []
    for _ in range(count):
        weight.codes = weight.codes.clone()
        backends.append(TritonBackend(weight, device, torch.bfloat16))
    return backends


def gemv_rows(device: torch.device, timer: GraphTimer, copy_bytes_per_s: float,
              shapes=LLAMA3_8B_SHAPES, bits=(2, 3, 4), batches=(1, 16)) -> list[dict]:
    """GEMV kernel and whole quantized linear against float16 F.linear, per shape, K and batch."""
    from trellis_kernels.hadamard import rotate_rows
    from trellis_kernels.matmul import gemv_partials

    rows = []
    for shape in shapes:
        dense = [torch.randn(shape, device=device, dtype=torch.float16)
                 for _ in range(copies_for(shape[0] * shape[1] * 2, device))]
        for k in bits:
            spec = TrellisSpec(16, k, 2, "hyb")
            backends = weight_copies(spec, shape, device, seed=k)
            packed = backends[0].codes.numel() * 4
            for batch in batches:
                x = torch.randn(batch, shape[1], device=device, dtype=torch.bfloat16)
                x16 = x.to(torch.float16)
                inner = torch.float32 if batch == 1 else torch.float16
                rotated = rotate_rows(x, backends[0].input_signs, backends[0].small_in, inner,
                                      norm=backends[0].rotation.norm)
                kernel = timer(lambda i: gemv_partials(rotated, backends[i].codes,
                                                       backends[i].code), len(backends))
                inputs = [x.clone() for _ in backends]  # distinct inputs: no shared rotation
                linear = timer(lambda i: backends[i](inputs[i]), len(backends))
                fp16 = timer(lambda i: F.linear(x16, dense[i % len(dense)]), len(dense))
                rows.append({
                    "kernel": "gemv", "case": f"{shape[0]}x{shape[1]} K={k} rows={batch}",
                    "kernel_us": kernel * 1e6, "linear_us": linear * 1e6, "fp16_us": fp16 * 1e6,
                    "kernel_speedup": fp16 / kernel, "linear_speedup": fp16 / linear,
                    "packed_GBps": packed / kernel / 1e9,
                    "copy_fraction": packed / kernel / copy_bytes_per_s,
                })
        del dense
    return rows


def large_batch_rows(device: torch.device, timer: GraphTimer, shape=(4096, 4096),
                     batches=(32, 64, 128, 256, 512, 1024)) -> list[dict]:
    """Fused GEMM against decode + cuBLAS (and float16 F.linear) as the batch grows."""
    from trellis_kernels.decode import decode_matrix
    from trellis_kernels.matmul import gemm

    spec = TrellisSpec(16, 2, 2, "hyb")
    backends = weight_copies(spec, shape, device, seed=7)
    dense = [torch.randn(shape, device=device, dtype=torch.float16)
             for _ in range(copies_for(shape[0] * shape[1] * 2, device))]
    rows = []
    for batch in batches:
        x = torch.randn(batch, shape[1], device=device, dtype=torch.float16)
        fused = timer(lambda i: gemm(x, backends[i].codes, backends[i].code), len(backends))
        decoded = timer(lambda i: F.linear(x, decode_matrix(
            backends[i].codes, backends[i].code, backends[i].unit_scale, dtype=torch.float16)),
            len(backends))
        fp16 = timer(lambda i: F.linear(x, dense[i % len(dense)]), len(dense))
        rows.append({"kernel": "gemm", "case": f"{shape[0]}x{shape[1]} K=2 rows={batch}",
                     "gemm_us": fused * 1e6, "decode_cublas_us": decoded * 1e6,
                     "fp16_us": fp16 * 1e6, "faster": "gemm" if fused < decoded else "decode"})
    return rows


def hadamard_rows(device: torch.device, timer: GraphTimer, sizes=(4096, 14336),
                  batches=(1, 16)) -> list[dict]:
    """The rotation kernel against trellis_runtime.hadamard.rotate (torch), per size and batch."""
    from trellis_kernels.hadamard import rotate_rows
    from trellis_runtime.hadamard import random_signs, rotate, rotation_plan, small_factor

    rows = []
    for n in sizes:
        small, norm = small_factor(n, device), rotation_plan(n).norm
        signs = random_signs(n, 0).to(device)
        for batch in batches:
            x = torch.randn(batch, n, device=device)
            kernel = timer(lambda i: rotate_rows(x, signs, small, norm=norm), 32)
            reference = timer(lambda i: rotate(x, signs), 32)
            rows.append({"kernel": "hadamard", "case": f"n={n} rows={batch}",
                         "kernel_us": kernel * 1e6, "torch_us": reference * 1e6,
                         "speedup": reference / kernel})
    return rows


def event_time(call: Callable[[], object], repeats: int = 3) -> float:
    """Median seconds of call() after one warm-up call, timed with CUDA events (for calls long
    enough that launch overhead does not matter)."""
    call()
    times = []
    for _ in range(repeats):
        start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        start.record()
        call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def viterbi_rows(device: torch.device, batches=(512, 2048)) -> list[dict]:
    """Tiles per second of one Viterbi pass (tail-biting costs two) at the CUDA quantization default
    L=16 hyb K=2, kernel against trellis_runtime.viterbi.viterbi on the same GPU."""
    from trellis_kernels.viterbi import viterbi_paths
    from trellis_runtime.codes import initial_table, state_values
    from trellis_runtime.viterbi import viterbi

    spec = TrellisSpec(16, 2, 2, "hyb")
    values = state_values(spec, initial_table(spec)).to(device)
    rows = []
    for batch in batches:
        x = torch.randn(batch, 256, device=device)
        kernel = event_time(lambda: viterbi_paths(x, values, 16, 2, 2))
        reference = event_time(lambda: viterbi(x, values, spec))
        rows.append({"kernel": "viterbi", "case": f"L=16 K=2 V=2 hyb, {batch} tiles, one pass",
                     "kernel_tiles_per_s": batch / kernel, "torch_tiles_per_s": batch / reference,
                     "speedup": reference / kernel})
    return rows


# Llama-3-8B's shape; the weights are random (any bitstream is a valid trellis code).
LLAMA3_8B_CONFIG = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
                    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                    "vocab_size": 128256, "max_position_embeddings": 8192, "rope_theta": 500000.0,
                    "rms_norm_eps": 1e-5, "tie_word_embeddings": False}


class _Dense(torch.nn.Module):
    """A 16-bit dense weight in place of a TrellisLinear backend: the unquantized baseline."""

    def __init__(self, out_features: int, in_features: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = torch.randn(out_features, in_features, device=device, dtype=dtype) * 0.02
        self.decoded_bytes = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


def decode_tokens_per_second(model, steps: int, graphs: bool, prompt: int = 16,
                             max_seq_len: int = 512) -> float:
    """Greedy batch-1 decode speed after a `prompt`-token prefill: each token is sampled on the
    device and read back to feed the next step, as the engine does. The first pass warms up
    (compiles, captures the graphs); the second, over the same positions, is timed."""
    import time

    from trellis_runtime.cuda_graphs import DecodeGraphs

    device = model.embed_tokens.device
    cache = model.new_cache(1, max_seq_len)
    slot = cache.allocate()
    steps_runner = DecodeGraphs(model, cache, max_batch=1) if graphs else None
    prompt_ids = torch.randint(0, model.shape.vocab, (prompt,), device=device)
    positions = torch.arange(prompt, device=device)
    elapsed = 0.0
    for _ in range(2):
        logits = model(prompt_ids, positions, torch.full((prompt,), slot, device=device), cache,
                       logits_for=torch.tensor([prompt - 1], device=device))
        token = int(logits[0].argmax())
        torch.cuda.synchronize()
        start = time.perf_counter()
        for position in range(prompt, prompt + steps):
            if steps_runner is not None:
                logits = steps_runner.run([token], [position], [slot])
            else:
                logits = model(torch.tensor([token], device=device),
                               torch.tensor([position], device=device),
                               torch.tensor([slot], device=device), cache)
            token = int(logits[0].argmax())
        elapsed = time.perf_counter() - start
    return steps / elapsed


def e2e_rows(device: torch.device, steps: int = 128) -> list[dict]:
    """Batch-1 decode tokens/s of a Llama-3-8B-shaped model at 2 bits (L=16 hyb, random codes)
    against the same model with 16-bit dense linears (bfloat16, the runtime's CUDA dtype), both
    replaying CUDA graphs; plus both without graphs, to show what the graphs buy."""
    from trellis_runtime.linear import TrellisLinear
    from trellis_runtime.model import TrellisModel

    spec = TrellisSpec(16, 2, 2, "hyb")
    model = TrellisModel.from_checkpoint(random_checkpoint(LLAMA3_8B_CONFIG, spec, device), device)
    linears = [m for m in model.modules() if isinstance(m, TrellisLinear)]
    backends = {type(m.backend).__name__ for m in linears}
    quantized = decode_tokens_per_second(model, steps, graphs=True)
    quantized_eager = decode_tokens_per_second(model, 16, graphs=False)
    for m in linears:  # the same model, every projection a dense 16-bit matrix
        m.backend = _Dense(m.out_features, m.in_features, device, model.embed_tokens.dtype)
    torch.cuda.empty_cache()
    dense = decode_tokens_per_second(model, steps, graphs=True)
    dense_eager = decode_tokens_per_second(model, 16, graphs=False)
    case = "Llama-3-8B shape, batch 1, 16-token prompt"
    return [{"kernel": "e2e", "case": f"{case}, CUDA graphs, {steps} tokens",
             "quantized_tokens_per_s": quantized, "bf16_tokens_per_s": dense,
             "speedup": quantized / dense, "backend": ",".join(sorted(backends))},
            {"kernel": "e2e", "case": f"{case}, eager, 16 tokens",
             "quantized_tokens_per_s": quantized_eager, "bf16_tokens_per_s": dense_eager,
             "speedup": quantized_eager / dense_eager}]


def gpu_rows(device: torch.device) -> list[dict]:
    """Every timing of this module, with the copy bandwidth they are compared to."""
    timer = GraphTimer()
    bandwidth = copy_bandwidth(device, timer)
    rows = [{"kernel": "copy", "case": "device-to-device 2 GiB", "GBps": bandwidth / 1e9}]
    rows += gemv_rows(device, timer, bandwidth)
    rows += large_batch_rows(device, timer)
    rows += hadamard_rows(device, timer)
    rows += viterbi_rows(device)
    rows += e2e_rows(device)
    return rows


def format_row(row: dict) -> str:
    values = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                       for k, v in row.items() if k not in ("kernel", "case"))
    return f"{row['kernel']:9s} {row['case']:40s} {values}"


def bench_kernels(json_output: bool) -> int:
    """The `trellis bench kernels` command: the suite, plus the timings when CUDA is available."""
    import json
    import os

    on_gpu = torch.cuda.is_available()
    if not on_gpu:  # Triton has no CPU backend; its interpreter must be chosen before kernels load
        os.environ["TRITON_INTERPRET"] = "1"
    from trellis_cli.kernel_suite import run_suite

    device = torch.device("cuda" if on_gpu else "cpu")
    rows = run_suite(device)
    if on_gpu:
        rows += gpu_rows(device)
    if json_output:
        print(json.dumps(rows))
    else:
        for row in rows:
            print(format_row(row))
    return 0
