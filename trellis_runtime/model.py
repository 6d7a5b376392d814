"""The compact decoder that serves trellis checkpoints of every supported family, in one file.

The layers are the ones transformers' Llama-family models compute (RMSNorm, rotary embeddings,
grouped-query attention, a gated MLP), with every projection a TrellisLinear; what a family changes
(biases, per-head q/k norms, Gemma's norms and soft-capping, sliding windows, Phi-3's fused
projections) is read from its `ModelShape` (trellis_runtime/architecture.py). Module names mirror the
checkpoint's tensor names, so `model.layers.3.mlp.up_proj` here is `model.layers.3.mlp.up_proj` there.

One forward runs any mix of sequences (trellis_runtime/attention.py): prefills of new requests and
decode steps of running ones in a single call.
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from trellis_runtime.architecture import ModelShape, transformers_config
from trellis_runtime.attention import Attention, AttentionLayout, AttentionSpec
from trellis_runtime.backend_cpu import (DENSE_KERNEL_MAX_ROWS, CpuBackend,
                                         choose_code_rows, cpu_kernels_loaded, dense_product,
                                         fused_decoder_layer, int8_rows)
from trellis_runtime.checkpoint import Checkpoint, load_checkpoint
from trellis_runtime.devices import DEFAULT_HEAD, HEADS
from trellis_runtime.kv_cache import KVCache
from trellis_runtime.linear import TrellisLinear, compute_dtype
from trellis_runtime.memory import return_freed_memory
from trellis_runtime.rope import LENGTH_DEPENDENT, RotaryEmbedding

logger = logging.getLogger("trellis_runtime")

ACTIVATION_FUNCTIONS = {"silu": F.silu, "gelu": F.gelu,
               "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float, fused: bool = False) -> None:
        """weight: the multiplier as applied, Gemma's (1 + w) already added (see `TrellisModel.norm`).
        fused: use the CPU kernel, one call where F.rms_norm runs several ops (CPU float32 only)."""
        super().__init__()
        self.register_buffer("weight", weight, persistent=False)
        self.eps = eps
        self.fused = fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return torch.ops.trellis_cpu.rms_norm(x, self.weight, self.eps)
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


class MLP(nn.Module):
    def __init__(self, down_proj: nn.Module, activation: str, gate_proj: nn.Module | None = None,
                 up_proj: nn.Module | None = None, gate_up_proj: nn.Module | None = None) -> None:
        """Either gate_proj and up_proj or one fused gate_up_proj (rows: gate, then up)."""
        super().__init__()
        self.gate_proj, self.up_proj, self.gate_up_proj = gate_proj, up_proj, gate_up_proj
        self.down_proj = down_proj
        self.activation = ACTIVATION_FUNCTIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(self.activation(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, self_attn: Attention, mlp: MLP, norms: dict[str, RMSNorm]) -> None:
        """norms: input_layernorm and post_attention_layernorm, and for Gemma 2/3 also
        pre_feedforward_layernorm and post_feedforward_layernorm (see forward)."""
        super().__init__()
        self.self_attn, self.mlp = self_attn, mlp
        self.input_layernorm = norms["input_layernorm"]
        self.post_attention_layernorm = norms["post_attention_layernorm"]
        self.pre_feedforward_layernorm = norms.get("pre_feedforward_layernorm")
        self.post_feedforward_layernorm = norms.get("post_feedforward_layernorm")
        # On CPU with the kernels, decode steps of up to fused_max_rows sequences of a plain Llama
        # layer run as one C++ call (trellis_runtime/backend_cpu.py: fused_decoder_layer).
        self.fused_decode: torch.ScriptObject | None = None
        self.fused_max_rows = 0
        if self_attn.fused_decode and self.pre_feedforward_layernorm is None:
            self.fused_decode = fused_decoder_layer(
                [linear.backend for linear in (self_attn.q_proj, self_attn.k_proj, self_attn.v_proj,
                                               self_attn.o_proj, mlp.gate_proj, mlp.up_proj,
                                               mlp.down_proj)],
                self.input_layernorm.weight, self.post_attention_layernorm.weight,
                self.input_layernorm.eps)
            self.fused_max_rows = DENSE_KERNEL_MAX_ROWS

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], layout: AttentionLayout,
                slots: torch.Tensor, positions: torch.Tensor, cached_keys: torch.Tensor,
                cached_values: torch.Tensor) -> torch.Tensor:
        if (self.fused_decode is not None and layout.tokens_per_sequence == 1 and not layout.padded
                and x.shape[0] <= self.fused_max_rows):
            return self.fused_decode.decode(x, *rope, cached_keys, cached_values, slots, positions)
        attended = self.self_attn(self.input_layernorm(x), rope, layout, slots, positions,
                                  cached_keys, cached_values)
        if self.pre_feedforward_layernorm is None:  # Llama: post_attention_layernorm feeds the MLP
            x = x + attended
            return x + self.mlp(self.post_attention_layernorm(x))
        # Gemma 2/3 normalise each block's output too: post_attention_layernorm is one of those.
        x = x + self.post_attention_layernorm(attended)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class TrellisModel(nn.Module):
    def __init__(self, shape: ModelShape, embed_tokens: torch.Tensor, layers: list[DecoderLayer],
                 norm: RMSNorm, lm_head: torch.Tensor, rotary: dict[str, RotaryEmbedding],
                 dtype: torch.dtype) -> None:
        """dtype: the activations' (and KV cache's) dtype; embed_tokens and lm_head may be stored
        narrower (bf16 on CPU, exactly as the checkpoint holds them) and are widened as they are read.
        rotary: one embedding per layer type (Gemma 3's local layers rotate with another base)."""
        super().__init__()
        self.shape = shape
        self.dtype = dtype
        self.register_buffer("embed_tokens", embed_tokens, persistent=False)
        self.layers = nn.ModuleList(layers)
        self.norm = norm
        self.register_buffer("lm_head", lm_head, persistent=False)  # the same tensor when tied
        self.register_buffer("lm_head_scales", None, persistent=False)  # int8 head's (quantize_head)
        self.rotary = nn.ModuleDict(rotary)
        self.length_dependent_rope = any(r.rope_type in LENGTH_DEPENDENT for r in rotary.values())

        self.embed_scale = embedding_scale(shape, dtype)

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint, device: str | torch.device = "cpu",
                        choose_paths: bool = True) -> "TrellisModel":
        """Build the model on `device`, decoding the quantized linears as their backend requires.
        choose_paths: with the CPU kernels, time decode steps to choose codes or float32 copies
        (choose_code_rows); False keeps the copies and KERNEL_MAX_ROWS, for callers that set the
        paths themselves (use_codes_up_to, drop_float_copies)."""
        device = torch.device(device)
        dtype = compute_dtype(device)
        shape = checkpoint.shape
        # The CPU kernels also fuse the small ops of a decode step (norms, attention), for the layers
        # they implement: plain Llama ones.
        kernels = device.type == "cpu" and dtype == torch.float32 and cpu_kernels_loaded()

        def dense(name: str) -> torch.Tensor:
            return checkpoint.dense[name].to(device=device, dtype=dtype).contiguous()

        def norm(name: str, fused: bool = False) -> RMSNorm:
            return rms_norm(checkpoint.dense[name], shape, device, dtype, fused)

        def linear(name: str) -> TrellisLinear:
            bias = f"{name}.bias"
            return TrellisLinear(checkpoint.quantized[name], device,
                                 dense(bias) if bias in checkpoint.dense else None)

        layers = [decoder_layer(shape, index, linear, norm, kernels) for index in range(shape.layers)]

        def head(name: str) -> torch.Tensor:
            """Embeddings and output head: bf16 kept as is where the CPU kernel multiplies by it
            (half the bytes a decode step reads, the same values), else in the compute dtype."""
            tensor = checkpoint.dense[name]
            if device.type == "cpu" and tensor.dtype == torch.bfloat16 and cpu_kernels_loaded():
                return tensor.contiguous()
            return dense(name)

        embed = head("model.embed_tokens.weight")
        lm_head = embed if shape.tied_embeddings else head("lm_head.weight")
        config = transformers_config(checkpoint.config)
        rotary = {kind: RotaryEmbedding(config, kind).to(device) for kind in set(shape.layer_types)}
        model = cls(shape, embed, layers, norm("model.norm.weight", kernels), lm_head, rotary, dtype)
        model.eval()
        linears = [m for m in model.modules() if isinstance(m, TrellisLinear)]
        if kernels and choose_paths and model.cpu_backends():
            model.choose_code_rows()
        if device.type == "cpu":
            return_freed_memory()  # the load's temporaries, and the float32 copies if dropped
        packed = sum(m.quantized.codes.numel() * m.quantized.codes.element_size() for m in linears)
        logger.info("%d quantized linears decoded for %s: %.1f MiB held in %s (packed codes: %.1f MiB)",
                    len(linears), device, sum(m.decoded_bytes for m in linears) / 2**20, dtype,
                    packed / 2**20)
        return model

    def cpu_backends(self) -> list[CpuBackend]:
        """The quantized linears' CPU kernel backends (none off the CPU or without the kernels)."""
        return [m.backend for m in self.modules()
                if isinstance(m, TrellisLinear) and isinstance(m.backend, CpuBackend)]

    def use_codes_up_to(self, rows: int) -> None:
        """CPU kernels: multiply products of up to `rows` rows (decode steps of up to `rows`
        sequences) from the packed codes, larger ones from the float32 copy."""
        backends = self.cpu_backends()
        if any(backend.dense is None for backend in backends):
            raise ValueError("the float32 copies were dropped: every product is from the codes")
        for backend in backends:
            backend.max_rows = rows
        for layer in self.layers:
            if layer.fused_decode is not None:
                layer.fused_decode.set_trellis_max_tokens(rows)

    def drop_float_copies(self) -> None:
        """CPU kernels: multiply every product from the packed codes, prefills included, and free
        the float32 copies of the quantized linears (405 MiB for SmolLM2-135M)."""
        for backend in self.cpu_backends():
            backend.drop_float_copy()
        for layer in self.layers:
            if layer.fused_decode is not None:
                layer.fused_decode.drop_dense()

    def quantize_head(self) -> None:
        """CPU kernels: multiply the output head in int8 with a scale per row (backend_cpu.int8_rows):
        half the bytes of bf16 read per decode step. The embeddings keep their own values when
        tied. The perplexity this costs is in the README (Measured, CPU decode against llama.cpp)."""
        if self.lm_head.device.type != "cpu" or not cpu_kernels_loaded():
            raise ValueError("an int8 head needs the CPU kernels")
        self.lm_head, self.lm_head_scales = int8_rows(self.lm_head)
        return_freed_memory()  # int8_rows's float32 temporaries

    def choose_code_rows(self) -> None:
        """CPU kernels: make decode steps multiply from the codes or from the float32 copy, whichever
        timed steps of this model say is faster on this machine (backend_cpu.choose_code_rows)."""
        def time_step(rows: int, sequences: int) -> float:
            self.use_codes_up_to(rows)
            return median_decode_step_seconds(self, steps=4, sequences=sequences)

        rows, medians = choose_code_rows(time_step)
        self.use_codes_up_to(rows)
        if rows == DENSE_KERNEL_MAX_ROWS:  # prefills from the codes too (about as fast: README)
            self.drop_float_copies()
        timings = "; ".join(f"{sequences} sequence(s), codes up to {r} rows: {seconds * 1e3:.1f} ms"
                            for (r, sequences), seconds in medians.items())
        logger.info("decode steps: %s; %s", timings,
                    f"1-{rows} sequences from the codes" if rows else "the float32 copy is used")

    def new_cache(self, max_slots: int, max_seq_len: int) -> KVCache:
        """A KV cache shaped for this model, on its device and in its dtype."""
        return KVCache(layers=self.shape.layers, max_slots=max_slots, kv_heads=self.shape.kv_heads,
                       max_seq_len=max_seq_len, head_dim=self.shape.head_dim,
                       dtype=self.dtype, device=self.embed_tokens.device)

    def plan_layout(self, position_list: list[int], slot_list: list[int], positions: torch.Tensor,
                    cache: KVCache) -> AttentionLayout:
        """The AttentionLayout of a forward over these tokens (see AttentionLayout.plan)."""
        return AttentionLayout.plan(position_list, slot_list, positions, cache,
                                    self.shape.heads // self.shape.kv_heads, self.shape.windows())

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                cache: KVCache, logits_for: torch.Tensor | None = None,
                layout: AttentionLayout | None = None) -> torch.Tensor:
        """Logits (M or N, vocab) for N tokens from any mix of sequences.

        tokens, positions, slots: (N,) int64; token i is at absolute `positions[i]` of the sequence that
        owns cache slot `slots[i]`, and attends to that sequence's cached positions up to its own.
        logits_for: (M,) indices of the tokens that need logits (a prefill needs only its last);
        None means all N. layout: the AttentionLayout of these inputs, as the engine's runner plans it
        from the lists it built them from (and CUDA-graph decode steps build theirs on the device, see
        cuda_graphs.py); None plans one here, reading positions and slots back from their device.
        """
        if layout is None:
            layout = self.plan_layout(positions.tolist(), slots.tolist(), positions, cache)
        ropes = {kind: rotary(positions, slots, self.dtype) for kind, rotary in self.rotary.items()}
        x = F.embedding(tokens, self.embed_tokens).to(self.dtype)
        if self.embed_scale is not None:
            x = x * self.embed_scale
        for layer, kind, cached_keys, cached_values in zip(self.layers, self.shape.layer_types,
                                                           cache.keys, cache.values):
            x = layer(x, ropes[kind], layout, slots, positions, cached_keys, cached_values)
        if logits_for is not None:
            x = x.index_select(0, logits_for)
        x = self.norm(x)
        if self.lm_head.dtype != self.dtype:  # bf16 or int8 on CPU: the kernel widens it on the fly
            logits = dense_product(x, self.lm_head, self.lm_head_scales)
        else:
            logits = F.linear(x, self.lm_head).float()
        cap = self.shape.final_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap


def median_decode_step_seconds(model: TrellisModel, steps: int, sequences: int = 1) -> float:
    """The median time of `steps` decode steps of `sequences` new sequences (one token each, their
    contexts growing), after one step that warms the caches up."""
    cache = model.new_cache(sequences, steps + 1)
    slots = torch.tensor([cache.allocate() for _ in range(sequences)])
    tokens = torch.zeros(sequences, dtype=torch.int64)
    times = []
    with torch.inference_mode():
        for position in range(steps + 1):
            started = time.perf_counter()
            model(tokens, torch.full((sequences,), position), slots, cache)
            times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def embedding_scale(shape: ModelShape, dtype: torch.dtype) -> float | None:
    """Gemma scales the embeddings by sqrt(hidden), rounded to the activations' dtype as it does."""
    return torch.tensor(shape.hidden ** 0.5, dtype=dtype).item() if shape.family.embed_scale else None


def rms_norm(weight: torch.Tensor, shape: ModelShape, device: torch.device, dtype: torch.dtype,
             fused: bool = False) -> RMSNorm:
    """The norm of a stored weight; Gemma's (1 + w) is added in float32, as Gemma computes it, then cast."""
    multiplier = weight.to(torch.float32) + shape.family.norm_offset
    return RMSNorm(multiplier.to(device=device, dtype=dtype).contiguous(), shape.rms_norm_eps, fused)


def decoder_layer(shape: ModelShape, index: int, linear: Callable[[str], nn.Module],
                  norm: Callable[[str, bool], RMSNorm], kernels: bool) -> DecoderLayer:
    """Layer `index` of a model of this shape. linear(name) builds a projection by its module name (a
    TrellisLinear to serve; a float nn.Linear where the quantizer runs the float model), norm(name,
    fused) a norm by its weight's name; kernels: the CPU decode kernels may fuse plain Llama layers."""
    prefix = f"model.layers.{index}"
    spec = AttentionSpec(heads=shape.heads, kv_heads=shape.kv_heads, head_dim=shape.head_dim,
                         scale=shape.attention_scale, softcap=shape.attention_softcap,
                         window=shape.window(index))
    names = [name[len(prefix) + 1:] for name in shape.linear_shapes(index)]
    attention_parts = {name[len("self_attn."):]: linear(f"{prefix}.{name}") for name in names
                       if name.startswith("self_attn.")}
    mlp_parts = {name[len("mlp."):]: linear(f"{prefix}.{name}") for name in names
                 if name.startswith("mlp.")}
    plain = kernels and shape.llama_layer(index)  # what the C++ decode kernels compute
    norms = {name: norm(f"{prefix}.{name}.weight", plain) for name in shape.layer_norm_names()}
    attention = Attention(spec, **attention_parts, q_norm=norms.pop("self_attn.q_norm", None),
                          k_norm=norms.pop("self_attn.k_norm", None), fused_decode=plain)
    mlp = MLP(activation=shape.activation, **mlp_parts)
    return DecoderLayer(attention, mlp, norms)


def load_model(path: str | Path, device: str | torch.device = "cpu", head: str = DEFAULT_HEAD):
    """(TrellisModel, tokenizer) for the packed checkpoint directory at `path`; head "int8"
    quantizes the output head at load (CPU kernels only, TrellisModel.quantize_head)."""
    if head not in HEADS:
        raise ValueError(f"head must be one of {', '.join(HEADS)}, not {head!r}")
    model = TrellisModel.from_checkpoint(load_checkpoint(path), device)
    if head == "int8":
        model.quantize_head()
    return model, load_tokenizer(path)


def load_tokenizer(path: str | Path):
    """The HF tokenizer saved in a checkpoint directory, without its weights (a front end that
    tokenizes for remote engines needs no model)."""
    from transformers import AutoTokenizer  # here, so that importing trellis_runtime stays light

    return AutoTokenizer.from_pretrained(str(path))
