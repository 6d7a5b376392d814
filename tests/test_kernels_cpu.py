"""The C++ CPU kernels against float64 references, the backend that uses them, and their fallbacks.

The kernels compile on first use (about 15 s, once per source version); on a CPU without AVX-512 or
without a compiler the kernel tests skip and the fallback tests still run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from trellis_cli.kernel_suite import random_weight, with_real_vectors
from safetensors.torch import load_file

from trellis_kernels import cpu_build
from trellis_kernels.cpu_build import BASE_FLAGS, PORTABLE_ENV, CppLibrary, cpu_features
from trellis_kernels.cpu import (CODE_TABLE, COMPUTED_CODES, LIBRARY, KernelsUnavailable, MAX_TOKENS,
                                 dense_linear)
from trellis_runtime.backend_cpu import (DENSE_KERNEL_MAX_ROWS, KERNEL_MAX_ROWS, PROBE_SEQUENCES,
                                         CpuBackend, choose_code_rows, cpu_kernels_loaded, dense_product,
                                         fused_decoder_layer, int8_rows, kernels_unavailable_reason,
                                         state_lut, widened_rows)
from trellis_runtime.backend_dense import DenseBackend
from trellis_runtime.checkpoint import load_checkpoint
from trellis_runtime.linear import TrellisLinear, select_backend
from trellis_runtime.model import TrellisModel, load_model
from trellis_runtime.rope import apply_rotary, default_frequencies, rotation_factors
from trellis_runtime.quantized import QuantizedWeight
from trellis_runtime.trellis import TrellisSpec

needs_kernels = pytest.mark.skipif(not cpu_kernels_loaded(),
                                   reason=f"CPU kernels unavailable: {kernels_unavailable_reason()}")

# Every code, both V, every word count 8K (K = 1..4: masked and two-register tile loads) and window
# offsets that cross words; shapes with Paley factors (192 = 12 * 16, 48 = 12 * 4) and without (64).
SPECS = [TrellisSpec(8, 2, 1, "1mad"), TrellisSpec(12, 2, 1, "3inst"), TrellisSpec(12, 2, 2, "hyb"),
         TrellisSpec(16, 1, 2, "hyb"),
         TrellisSpec(10, 3, 2, "lut"), TrellisSpec(16, 4, 1, "3inst"), TrellisSpec(9, 4, 1, "lut")]


def relative_error(y: torch.Tensor, reference: torch.Tensor) -> float:
    return ((y.double() - reference).abs().max() / reference.abs().max()).item()


@needs_kernels
@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("shape", [(192, 64), (48, 192)])
def test_kernel_matches_dequantized_product(spec: TrellisSpec, shape: tuple[int, int]) -> None:
    weight = random_weight(spec, *shape, seed=3)
    backend = CpuBackend(weight, max_rows=MAX_TOKENS)
    dense = weight.dequantize().double()
    assert backend(torch.zeros(0, shape[1])).shape == (0, shape[0])
    for tokens in (1, 2, 3, 8, 9, MAX_TOKENS, 37):  # direct; a partial block of 4, two, more, many
        x = torch.randn(tokens, shape[1], generator=torch.Generator().manual_seed(tokens))
        # float32 throughout, as the dense float32 product: only the summation order differs.
        assert relative_error(backend(x), x.double() @ dense.T) < 1e-5


@needs_kernels
@pytest.mark.parametrize("spec", [TrellisSpec(12, 2, 2, "hyb"), TrellisSpec(16, 2, 1, "1mad")], ids=str)
def test_kernel_multiplies_the_real_vectors_of_format_2(spec: TrellisSpec) -> None:
    """A fine-tuned checkpoint's float16 vectors go where the signs went, in both directions."""
    weight = with_real_vectors(random_weight(spec, 48, 192, seed=5), seed=6)
    backend = CpuBackend(weight, max_rows=MAX_TOKENS)
    for tokens in (1, 9):
        x = torch.randn(tokens, 192, generator=torch.Generator().manual_seed(tokens))
        assert relative_error(backend(x), x.double() @ weight.dequantize().double().T) < 1e-5


@needs_kernels
@pytest.mark.parametrize("spec", [TrellisSpec(12, 2, 1, "1mad"), TrellisSpec(12, 2, 1, "3inst"),
                                  TrellisSpec(10, 3, 1, "3inst"), TrellisSpec(16, 4, 1, "1mad")], ids=str)
def test_computed_codes_equal_their_state_table(spec: TrellisSpec) -> None:
    """The kernel's vector arithmetic for 1MAD and 3INST gives every state exactly the value of
    trellis_runtime.codes: products through it equal, bit for bit, those through the state table."""
    weight = random_weight(spec, 48, 192, seed=8)
    backend = CpuBackend(weight, max_rows=MAX_TOKENS)
    codes, _, *rest = backend.kernel_args[:-1]
    assert backend.kernel_args[-1] == COMPUTED_CODES[spec.code] and backend.lut.numel() == 0
    for tokens in (1, 2, 5):
        x = torch.randn(tokens, 192, generator=torch.Generator().manual_seed(tokens))
        table = torch.ops.trellis_cpu.trellis_linear(x, codes, state_lut(weight), *rest, CODE_TABLE)
        assert torch.equal(backend(x), table)


@needs_kernels
def test_backend_keeps_leading_dims_and_switches_to_the_dense_copy() -> None:
    weight = random_weight(TrellisSpec(12, 2, 2, "hyb"), 64, 192, seed=4)
    backend = CpuBackend(weight, max_rows=4)
    x = torch.randn(2, 3, 192)
    reference = x.double() @ weight.dequantize().double().T
    assert backend(x).shape == (2, 3, 64) and relative_error(backend(x), reference) < 1e-5
    many = torch.randn(5, 192)  # beyond max_rows: F.linear on the dense copy
    assert relative_error(backend(many), many.double() @ weight.dequantize().double().T) < 1e-5
    assert backend.decoded_bytes == 64 * 192 * 4


@needs_kernels
def test_select_backend_uses_the_kernel_and_refuses_inexact_tables() -> None:
    spec = TrellisSpec(10, 2, 2, "lut")
    weight = random_weight(spec, 64, 64, seed=5)
    assert isinstance(select_backend(weight, torch.device("cpu")), CpuBackend)
    # A float32 table with values no float16 holds: the kernel's 2 x float16 entries would round them.
    inexact = QuantizedWeight(spec, weight.codes, weight.input_signs, weight.output_signs, weight.scale,
                              weight.table.float() * (1 + 2**-15))
    with pytest.raises(ValueError, match="not exact float16"):
        state_lut(inexact)
    assert isinstance(select_backend(inexact, torch.device("cpu")), DenseBackend)


@needs_kernels
@pytest.mark.parametrize("features", [576, 100])  # a whole number of 16-lane vectors, and a tail
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dense_linear_matches_the_weights_product(features: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(6)
    weight = torch.randn(302, features, generator=gen).to(dtype)  # blocks of 4 rows + 2
    assert dense_product(torch.zeros(0, features), weight).shape == (0, 302)
    for tokens in (1, 5, 8, 16, 20):
        x = torch.randn(tokens, features, generator=gen)
        reference = x.double() @ weight.double().T
        assert relative_error(dense_product(x, weight), reference) < 1e-5
        if tokens <= MAX_TOKENS:
            assert relative_error(dense_linear(x, weight), reference) < 1e-5


def test_int8_rows_round_each_row_to_its_scale() -> None:
    gen = torch.Generator().manual_seed(10)
    weight = (torch.randn(40, 100, generator=gen) * torch.rand(40, 1, generator=gen) * 5).to(torch.bfloat16)
    weight[7] = 0
    q, scales = int8_rows(weight)
    assert q.dtype == torch.int8 and scales.dtype == torch.float32 and q.shape == weight.shape
    error = (widened_rows(q, scales).double() - weight.double()).abs()
    # Rounded to nearest; the slack covers the float32 arithmetic (|w| <= 127 scales).
    assert (error <= scales.double()[:, None] / 2 * (1 + 1e-4)).all()
    nonzero = torch.arange(40) != 7
    assert (q[nonzero].abs().amax(dim=1) == 127).all() and (q[7] == 0).all()


@needs_kernels
@pytest.mark.parametrize("features", [576, 100])
def test_int8_dense_linear_matches_the_scaled_rows(features: int) -> None:
    """int8 rows times their scales, in the kernel (up to 16 rows) and through F.linear beyond."""
    gen = torch.Generator().manual_seed(11)
    q, scales = int8_rows(torch.randn(302, features, generator=gen))
    reference_weight = q.double() * scales.double()[:, None]
    for tokens in (1, 3, 16, 20):
        x = torch.randn(tokens, features, generator=gen)
        assert relative_error(dense_product(x, q, scales), x.double() @ reference_weight.T) < 1e-5


@needs_kernels
def test_kernels_refuse_bad_inputs() -> None:
    weight = torch.zeros(8, 16, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=f"at most {MAX_TOKENS} tokens"):
        dense_linear(torch.zeros(MAX_TOKENS + 1, 16), weight)
    with pytest.raises(RuntimeError, match="bfloat16, float32 or int8"):
        dense_linear(torch.zeros(1, 16), weight.half())
    with pytest.raises(RuntimeError, match="int8 weights need their row scales"):
        dense_linear(torch.zeros(1, 16), weight.to(torch.int8))
    with pytest.raises(RuntimeError, match="int8 weights need their row scales"):
        dense_linear(torch.zeros(1, 16), weight, torch.ones(8))
    with pytest.raises(RuntimeError, match="one per row of w"):
        dense_linear(torch.zeros(1, 16), weight.to(torch.int8), torch.ones(7))
    backend = CpuBackend(random_weight(TrellisSpec(12, 2, 2, "hyb"), 64, 64, seed=7))
    with pytest.raises(RuntimeError, match="x has 48 features, codes 64"):
        torch.ops.trellis_cpu.trellis_linear(
            torch.zeros(1, 48), backend.codes, backend.lut, backend.input_signs, backend.output_signs,
            backend.small_in, backend.small_out, backend.factor, 12, 2, 2, CODE_TABLE)
    with pytest.raises(RuntimeError, match="computed codes have V = 1"):
        torch.ops.trellis_cpu.trellis_linear(
            torch.zeros(1, 64), backend.codes, backend.lut, backend.input_signs, backend.output_signs,
            backend.small_in, backend.small_out, backend.factor, 12, 2, 2, COMPUTED_CODES["1mad"])


def test_optional_flags_follow_the_cpu_and_the_portable_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    library = CppLibrary("demo", sources=(), flags=("-mavx2",),
                         optional_flags=(("feature_a", "-ma"), ("feature_b", "-mb")))
    monkeypatch.setattr(cpu_build, "cpu_features", lambda: frozenset({"feature_b", "other"}))
    assert library.all_flags() == BASE_FLAGS + ("-mavx2", "-mb")
    monkeypatch.setenv(PORTABLE_ENV, "1")
    assert library.all_flags() == BASE_FLAGS + ("-mavx2",)


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX512" or not Path("/proc/cpuinfo").exists(),
                    reason="needs Linux on an AVX-512 CPU")
def test_cpu_features_reads_this_cpus_flags() -> None:
    assert {"avx512f", "avx512bw"} <= cpu_features()


# (L, K, V, code): each code at the CPU default of 2 bits per step and beyond it.
PORTABLE_SPECS = [(12, 2, 1, "1mad"), (12, 2, 1, "3inst"), (12, 2, 2, "hyb"), (10, 3, 2, "lut")]
# The products of a build without the optional extensions, written for the parent to compare.
PORTABLE_PRODUCTS = """
import sys, torch
from safetensors.torch import save_file
from trellis_cli.kernel_suite import random_weight
from trellis_runtime.backend_cpu import CpuBackend, cpu_kernels_loaded
from trellis_runtime.trellis import TrellisSpec
assert cpu_kernels_loaded()
out = {}
for spec in %r:
    backend = CpuBackend(random_weight(TrellisSpec(*spec), 48, 192, seed=9), max_rows=16)
    for tokens in (1, 2, 5):
        x = torch.randn(tokens, 192, generator=torch.Generator().manual_seed(tokens))
        out[f"{spec[3]}/{tokens}"] = backend(x)
save_file(out, sys.argv[1])
""" % PORTABLE_SPECS


@needs_kernels
@pytest.mark.skipif(not {"avx512_vbmi2", "avx512_vnni"} & cpu_features(),
                    reason="this CPU has none of the optional extensions: its build is the portable one")
def test_portable_build_gives_the_same_products(tmp_path: Path) -> None:
    """The build without the CPU's optional extensions (TRELLIS_CPU_PORTABLE=1: no VBMI2 funnel
    shifts, no VNNI byte sums; in its own cache directory, about 30 s to compile) computes the same
    products, bit for bit, as this process's build with them."""
    result = subprocess.run([sys.executable, "-c", PORTABLE_PRODUCTS, str(tmp_path / "products.safetensors")],
                            capture_output=True, text=True, timeout=600,
                            env={**os.environ, PORTABLE_ENV: "1", "XDG_CACHE_HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    portable = load_file(tmp_path / "products.safetensors")
    assert len(portable) == 3 * len(PORTABLE_SPECS)
    for spec in PORTABLE_SPECS:
        backend = CpuBackend(random_weight(TrellisSpec(*spec), 48, 192, seed=9), max_rows=16)
        for tokens in (1, 2, 5):
            x = torch.randn(tokens, 192, generator=torch.Generator().manual_seed(tokens))
            assert torch.equal(backend(x), portable[f"{spec[3]}/{tokens}"]), (spec, tokens)
    # It was a different build: other flags, so another file name than this process's library.
    built = list((tmp_path / "trellis-runtime" / "kernels").glob(f"{LIBRARY.name}-*.so"))
    assert len(built) == 1 and built[0].name != LIBRARY.path(tmp_path).name


def test_missing_compiler_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(KernelsUnavailable, match="no C\\+\\+ compiler"):
        LIBRARY.build(LIBRARY.path(tmp_path))
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_disabled_kernels_fall_back_to_the_dense_product(tiny_checkpoint_dir: Path) -> None:
    """With TRELLIS_CPU_KERNELS=0 every linear decodes to float32 and the head is float32."""
    script = ("from trellis_runtime.model import load_model\n"
              f"model, _ = load_model({str(tiny_checkpoint_dir)!r})\n"
              "print({type(m.backend).__name__ for m in model.modules() if hasattr(m, 'backend')},"
              " model.lm_head.dtype)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env={**os.environ, "TRELLIS_CPU_KERNELS": "0"}, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "{'DenseBackend'} torch.float32"


@needs_kernels
def test_rms_norm_matches_torch() -> None:
    gen = torch.Generator().manual_seed(8)
    x, weight = torch.randn(3, 2, 100, generator=gen) * 4, torch.randn(100, generator=gen)
    expected = F.rms_norm(x.double(), (100,), weight.double(), 1e-5)
    assert relative_error(torch.ops.trellis_cpu.rms_norm(x, weight, 1e-5), expected) < 1e-6


@needs_kernels
@pytest.mark.parametrize(("positions", "dim"), [([0, 5, 37], 32), ([40, 2, 17], 32), ([40, 16, 15], 40)])
def test_decode_attention_matches_rotary_and_sdpa(positions: list[int], dim: int) -> None:
    """Three sequences, one new token each, in slots 2, 0, 3 of a 4-slot cache: the kernel's output
    and cache writes against the model's own rotary and torch's SDPA over each sequence's prefix
    (whole and partial blocks of 16 keys; a head size that is not a multiple of 16)."""
    heads, kv_heads, length = 6, 2, 48
    gen = torch.Generator().manual_seed(9)
    slots = torch.tensor([2, 0, 3])
    position = torch.tensor(positions)
    q, k, v = (torch.randn(3, h * dim, generator=gen) for h in (heads, kv_heads, kv_heads))
    cache_k, cache_v = (torch.randn(4, kv_heads, length, dim, generator=gen) for _ in range(2))
    cos, signed_sin = rotation_factors(position, default_frequencies(10000.0, dim), 1.0, torch.float32)
    expected_k, expected_v = cache_k.clone(), cache_v.clone()
    expected_k[slots, :, position] = apply_rotary(k.view(3, kv_heads, dim), cos, signed_sin)
    expected_v[slots, :, position] = v.view(3, kv_heads, dim)
    rotated_q = apply_rotary(q.view(3, heads, dim), cos, signed_sin)

    out = torch.ops.trellis_cpu.decode_attention(q, k, v, cos, signed_sin, cache_k, cache_v, slots,
                                                 position)
    assert torch.equal(cache_v, expected_v)
    torch.testing.assert_close(cache_k, expected_k)
    for i in range(3):
        keys = expected_k[slots[i], :, :position[i] + 1].double().repeat_interleave(heads // kv_heads, 0)
        values = expected_v[slots[i], :, :position[i] + 1].double().repeat_interleave(
            heads // kv_heads, 0)
        reference = F.scaled_dot_product_attention(rotated_q[i].double()[:, None], keys, values)
        assert relative_error(out[i], reference.reshape(-1)) < 1e-5

    with pytest.raises(RuntimeError, match="one token per sequence"):
        torch.ops.trellis_cpu.decode_attention(q, k, v, cos, signed_sin, cache_k, cache_v,
                                               torch.tensor([1, 0, 1]), position)


@needs_kernels
def test_int8_head_gives_the_logits_of_its_scaled_rows(tiny_checkpoint_dir: Path) -> None:
    """load_model(head="int8"): the head is int8 with row scales, the tied embeddings keep their
    bf16 values, and a decode step's and a prefill's logits are those of the scaled rows in float32."""
    model, _ = load_model(tiny_checkpoint_dir, head="int8")
    reference, _ = load_model(tiny_checkpoint_dir)
    assert model.lm_head.dtype == torch.int8 and model.embed_tokens.dtype == torch.bfloat16
    assert torch.equal(model.embed_tokens, reference.embed_tokens)
    reference.lm_head = widened_rows(model.lm_head, model.lm_head_scales)  # F.linear in float32
    for length in (1, 20):  # the kernel's rows, and beyond them
        logits = []
        for m in (model, reference):
            cache = m.new_cache(1, 32)
            slots = torch.full((length,), cache.allocate())
            logits.append(m(torch.arange(3, 3 + length), torch.arange(length), slots, cache,
                            logits_for=torch.tensor([length - 1])))
        assert relative_error(logits[0], logits[1].double()) < 1e-5
    with pytest.raises(ValueError, match="head must be one of bf16, int8, not 'fp8'"):
        load_model(tiny_checkpoint_dir, head="fp8")


@needs_kernels
def test_dropping_the_float_copies_keeps_the_logits(tiny_checkpoint_dir: Path) -> None:
    """After drop_float_copies every product comes from the codes: a 20-token prefill (beyond the
    decode kernels' rows) and a decode step of 3 sequences give the logits they gave with the
    copies, the copies' memory is gone, and the row limit can no longer send products to them."""
    model = TrellisModel.from_checkpoint(load_checkpoint(tiny_checkpoint_dir), "cpu", choose_paths=False)

    def logits() -> list[torch.Tensor]:
        cache = model.new_cache(3, 32)
        slots = [cache.allocate() for _ in range(3)]
        prefill = model(torch.arange(3, 23), torch.arange(20), torch.full((20,), slots[0]), cache)
        step = model(torch.tensor([5, 6, 7]), torch.tensor([20, 0, 0]), torch.tensor(slots), cache)
        return [prefill, step]

    with torch.inference_mode():
        model.use_codes_up_to(0)
        before = logits()
        model.drop_float_copies()
        after = logits()
    for a, b in zip(after, before):
        assert relative_error(a, b.double()) < 1e-5
    assert all(backend.dense is None for backend in model.cpu_backends())
    assert sum(m.decoded_bytes for m in model.modules() if isinstance(m, TrellisLinear)) == 0
    with pytest.raises(ValueError, match="float32 copies were dropped"):
        model.use_codes_up_to(2)


@needs_kernels
def test_fused_decoder_layer_matches_the_per_op_layer(tiny_checkpoint_dir: Path) -> None:
    """A decode step through the C++ decoder layer gives the per-op path's output and cache writes
    (the same kernels in the same order, float32 rounding apart), for 1 sequence (products from the
    codes) and 3 (beyond KERNEL_MAX_ROWS: from the dense copies)."""
    assert KERNEL_MAX_ROWS < 3
    model = TrellisModel.from_checkpoint(load_checkpoint(tiny_checkpoint_dir), "cpu", choose_paths=False)
    model.use_codes_up_to(KERNEL_MAX_ROWS)
    layer = model.layers[0]
    assert layer.fused_decode is not None and layer.fused_max_rows == DENSE_KERNEL_MAX_ROWS
    hidden, gen = model.shape.hidden, torch.Generator().manual_seed(10)
    for slots, positions in (([1], [7]), ([2, 0, 3], [5, 0, 11])):
        n = len(slots)
        cache = model.new_cache(max_slots=4, max_seq_len=16)
        for _ in range(4):
            cache.allocate()
        for keys, values in zip(cache.keys, cache.values):
            keys.copy_(torch.randn(keys.shape, generator=gen))
            values.copy_(torch.randn(values.shape, generator=gen))
        x = torch.randn(n, hidden, generator=gen)
        slot_t, position_t = torch.tensor(slots), torch.tensor(positions)
        layout = model.plan_layout(positions, slots, position_t, cache)
        rope = model.rotary["full_attention"](position_t, slot_t, torch.float32)
        outputs, caches, fused = [], [], layer.fused_decode
        try:
            for layer.fused_decode in (fused, None):
                keys, values = cache.keys[0].clone(), cache.values[0].clone()
                with torch.inference_mode():
                    outputs.append(layer(x, rope, layout, slot_t, position_t, keys, values))
                caches.append((keys, values))
        finally:
            layer.fused_decode = fused
        assert relative_error(outputs[0], outputs[1].double()) < 1e-6
        assert torch.equal(caches[0][1], caches[1][1])
        torch.testing.assert_close(caches[0][0], caches[1][0])


def test_choose_code_rows_takes_the_faster_path_by_median() -> None:
    """One slow outlier round does not decide; the path with the lower median does: one sequence's
    steps decide codes or copy, then PROBE_SEQUENCES sequences' steps how many rows the codes take."""
    many = DENSE_KERNEL_MAX_ROWS
    steps = {(KERNEL_MAX_ROWS, 1): iter([0.010, 0.500, 0.011]), (0, 1): iter([0.020, 0.019, 0.021]),
             (many, PROBE_SEQUENCES): iter([0.030, 0.031, 0.900]),
             (KERNEL_MAX_ROWS, PROBE_SEQUENCES): iter([0.040, 0.041, 0.039])}
    assert choose_code_rows(lambda rows, sequences: next(steps[rows, sequences])) == (many, {
        (KERNEL_MAX_ROWS, 1): 0.011, (0, 1): 0.020, (many, PROBE_SEQUENCES): 0.031,
        (KERNEL_MAX_ROWS, PROBE_SEQUENCES): 0.040})
    steps = {(KERNEL_MAX_ROWS, 1): iter([0.010, 0.011, 0.012]), (0, 1): iter([0.020, 0.019, 0.021]),
             (many, PROBE_SEQUENCES): iter([0.050, 0.051, 0.049]),
             (KERNEL_MAX_ROWS, PROBE_SEQUENCES): iter([0.040, 0.500, 0.039])}
    assert choose_code_rows(lambda rows, sequences: next(steps[rows, sequences]))[0] == KERNEL_MAX_ROWS
    steps = {(KERNEL_MAX_ROWS, 1): iter([0.030, 0.029, 0.031]), (0, 1): iter([0.020, 0.500, 0.019])}
    assert choose_code_rows(lambda rows, sequences: next(steps[rows, sequences])) == (0, {
        (KERNEL_MAX_ROWS, 1): 0.030, (0, 1): 0.020})


@needs_kernels
def test_fused_decoder_layer_refuses_parts_that_are_not_a_layer() -> None:
    backends = [CpuBackend(random_weight(TrellisSpec(12, 2, 2, "hyb"), out, inp, seed=i))
                for i, (out, inp) in enumerate([(64, 64)] * 4 + [(128, 64)] * 2 + [(64, 128)])]
    norm = torch.ones(64)
    assert fused_decoder_layer(backends, norm, norm, 1e-5) is not None
    with pytest.raises(RuntimeError, match="do not form a decoder layer"):
        fused_decoder_layer(backends[:6] + backends[:1], norm, norm, 1e-5)  # a 64 x 64 down
    with pytest.raises(RuntimeError, match="expected 7 linears"):
        fused_decoder_layer(backends[:6], norm, norm, 1e-5)
    with pytest.raises(RuntimeError, match="norm weights"):
        fused_decoder_layer(backends, norm, torch.ones(32), 1e-5)
