"""The compact Llama-family decoder that serves trellis checkpoints, in one file.

The layers are the ones transformers' LlamaForCausalLM computes (RMSNorm, rotary embeddings, grouped-query
attention, SwiGLU MLP), with every projection a TrellisLinear. Module names mirror the checkpoint's
tensor names, so `model.layers.3.mlp.up_proj` here is `model.layers.3.mlp.up_proj` there.

One forward runs any mix of sequences ("varlen", as in nano-vllm): the N tokens are a flat list, each
naming its KV cache slot and its absolute position. That lets an engine put prefills of new requests and
decode steps of running ones in a single call.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from trellis_runtime.architecture import LlamaShape
from trellis_runtime.backend_cpu import (DENSE_KERNEL_MAX_ROWS, cpu_kernels_loaded, dense_product,
                                         fused_decoder_layer)
from trellis_runtime.checkpoint import Checkpoint, load_checkpoint
from trellis_runtime.errors import SourceError
from trellis_runtime.kv_cache import KVCache
from trellis_runtime.linear import TrellisLinear, compute_dtype

logger = logging.getLogger("trellis_runtime")

DEFAULT_ROPE_THETA = 10000.0  # what transformers assumes when a config names none
SUPPORTED_ROPE_TYPES = ("default", "llama3")


def rope_frequencies(config: dict, head_dim: int) -> torch.Tensor:
    """The rotary inverse frequencies (head_dim / 2,) a model config asks for, as transformers computes them.

    transformers 5 writes `rope_parameters` (holding rope_theta); older configs have a top-level
    `rope_theta` and an optional `rope_scaling` dict whose type key may be spelled `type`.
    """
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise SourceError(f"rope type {rope_type!r} is not supported: supported types are "
                          f"{', '.join(SUPPORTED_ROPE_TYPES)}")
    theta = float(params.get("rope_theta") or config.get("rope_theta") or DEFAULT_ROPE_THETA)
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    frequencies = 1.0 / (theta ** exponents)
    if rope_type == "llama3":
        frequencies = _llama3_scaled(frequencies, params, config)
    return frequencies


def _llama3_scaled(frequencies: torch.Tensor, params: dict, config: dict) -> torch.Tensor:
    """Llama 3.1's context extension: slow rotations (wavelength above the original context / low_freq_factor)
    are slowed down `factor` times, fast ones (below context / high_freq_factor) are kept, and the band in
    between is interpolated smoothly, so local word order is untouched while long range stretches."""
    try:
        factor = float(params["factor"])
        low = float(params["low_freq_factor"])
        high = float(params["high_freq_factor"])
        context = float(params.get("original_max_position_embeddings")
                        or config["max_position_embeddings"])
    except KeyError as missing:
        raise SourceError(f"llama3 rope scaling lacks {missing.args[0]!r}") from None
    wavelengths = 2 * math.pi / frequencies
    smooth = (context / wavelengths - low) / (high - low)
    interpolated = (1 - smooth) * frequencies / factor + smooth * frequencies
    scaled = torch.where(wavelengths > context / low, frequencies / factor, interpolated)
    return torch.where(wavelengths < context / high, frequencies, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(self, frequencies: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("frequencies", frequencies, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The factors `apply_rotary` needs at each token's position, (N, 1, head_dim) each, shared by
        all heads and layers. Angles are computed in float32, as transformers does, then cast."""
        angles = positions[:, None].to(torch.float32) * self.frequencies
        cos, sin = angles.cos(), angles.sin()
        return (torch.cat((cos, cos), dim=-1)[:, None].to(dtype),
                torch.cat((-sin, sin), dim=-1)[:, None].to(dtype))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x_i, x_{i + head_dim/2}) of (N, heads, head_dim) by its angle, as Llama does.

    Swapping the halves and multiplying by [-sin, sin] gives the same floats as the textbook
    [x1 cos - x2 sin, x2 cos + x1 sin] in four operations instead of eight; a decode step is short
    enough for the difference to show.
    """
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float, fused: bool = False) -> None:
        """fused: use the CPU kernel, one call where F.rms_norm runs several ops (CPU float32 only)."""
        super().__init__()
        self.register_buffer("weight", weight, persistent=False)
        self.eps = eps
        self.fused = fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return torch.ops.trellis_cpu.rms_norm(x, self.weight, self.eps)
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


@dataclass
class AttentionLayout:
    """How one forward's flat tokens map onto the padded (sequences, tokens) grid attention runs on.

    Built once per forward and shared by every layer. Sequences are numbered in order of first appearance,
    so in the two common cases the grid is a plain view of the flat tokens: a decode step (one token per
    sequence) and a prefill (one sequence). Mixed batches scatter tokens into the grid instead.

    The bookkeeping runs on the host over python lists, which an engine has anyway (it assembles its
    batch as lists): planning from them never reads a device tensor back, which on CUDA would wait for
    the device at every step.
    """

    sequences: int
    tokens_per_sequence: int  # the grid's width, the longest sequence in this forward
    key_length: int  # cache positions read: the largest position + 1
    cache_rows: slice | torch.Tensor  # the sequences' slots: a slice (a view) when consecutive
    mask: torch.Tensor  # additive (sequences, 1, tokens_per_sequence * group, key_length): 0 or -inf
    sequence_of_token: torch.Tensor | None  # (N,) grid coordinates for mixed batches, else None
    row_of_token: torch.Tensor | None
    # Padded decode batches (CUDA-graph buckets) repeat a slot in their padding rows and rely on
    # the mask, so the fused CPU decode kernel, which takes one token per sequence, cannot run them.
    padded: bool = False

    @classmethod
    def plan(cls, position_list: list[int], slot_list: list[int], positions: torch.Tensor,
             cache: KVCache, group: int) -> "AttentionLayout":
        """The layout of a forward whose token i is at position_list[i] of the sequence in slot_list[i].

        positions: the same positions as the forward's (N,) tensor; the mask is computed from it on its
        device, and index tensors are made there. group: query heads per kv head.
        """
        cache.check(slot_list, position_list)
        sequence_of_slot: dict[int, int] = {}
        sequence_of_token, row_of_token, lengths = [], [], []
        for slot in slot_list:
            sequence = sequence_of_slot.setdefault(slot, len(sequence_of_slot))
            if sequence == len(lengths):
                lengths.append(0)
            sequence_of_token.append(sequence)
            row_of_token.append(lengths[sequence])
            lengths[sequence] += 1
        sequences, width = len(lengths), max(lengths)
        key_length = max(position_list) + 1

        first = slot_list[0]
        consecutive = list(sequence_of_slot) == list(range(first, first + sequences))
        rows = (slice(first, first + sequences) if consecutive
                else torch.tensor(list(sequence_of_slot), device=positions.device))

        # A token sees every cached position of its own sequence up to and including its own.
        visible = torch.arange(key_length, device=positions.device) <= positions[:, None]
        if sequences == 1 or width == 1:  # the flat tokens, viewed, already are the grid
            scatter = None
            mask = visible.view(sequences, width, key_length)
        else:
            scatter = (torch.tensor(sequence_of_token, device=positions.device),
                       torch.tensor(row_of_token, device=positions.device))
            # Padding rows see everything so their softmax stays finite; their output is dropped.
            mask = visible.new_ones(sequences, width, key_length)
            mask[scatter] = visible
        mask = mask[:, None, :, None, :].expand(sequences, 1, width, group, key_length)
        mask = mask.reshape(sequences, 1, width * group, key_length)
        # Additive and in the cache's dtype, so attention does not convert a boolean mask in every layer.
        additive = torch.zeros(mask.shape, dtype=cache.keys[0].dtype, device=mask.device)
        return cls(sequences=sequences, tokens_per_sequence=width, key_length=key_length,
                   cache_rows=rows, mask=additive.masked_fill_(~mask, float("-inf")),
                   sequence_of_token=None if scatter is None else scatter[0],
                   row_of_token=None if scatter is None else scatter[1])

    def to_grid(self, x: torch.Tensor) -> torch.Tensor:
        """(N, ...) -> (sequences, tokens_per_sequence, ...)."""
        if self.sequence_of_token is None:
            return x.view(self.sequences, self.tokens_per_sequence, *x.shape[1:])
        grid = x.new_zeros(self.sequences, self.tokens_per_sequence, *x.shape[1:])
        grid[self.sequence_of_token, self.row_of_token] = x
        return grid

    def from_grid(self, grid: torch.Tensor) -> torch.Tensor:
        """(sequences, tokens_per_sequence, ...) -> (N, ...)."""
        if self.sequence_of_token is None:
            return grid.reshape(-1, *grid.shape[2:])
        return grid[self.sequence_of_token, self.row_of_token]


class Attention(nn.Module):
    def __init__(self, q_proj: TrellisLinear, k_proj: TrellisLinear, v_proj: TrellisLinear,
                 o_proj: TrellisLinear, heads: int, kv_heads: int, head_dim: int,
                 fused_decode: bool = False) -> None:
        """fused_decode: decode steps (one token per sequence) run rotary, the cache write and
        attention as one CPU kernel call instead of ~20 small ops (CPU float32 only)."""
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = q_proj, k_proj, v_proj, o_proj
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.group = heads // kv_heads
        self.fused_decode = fused_decode

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], layout: AttentionLayout,
                slots: torch.Tensor, positions: torch.Tensor, cached_keys: torch.Tensor,
                cached_values: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if self.fused_decode and layout.tokens_per_sequence == 1 and not layout.padded:
            out = torch.ops.trellis_cpu.decode_attention(
                self.q_proj(x), self.k_proj(x), self.v_proj(x), *rope, cached_keys, cached_values,
                slots, positions)
            return self.o_proj(out)
        q = apply_rotary(self.q_proj(x).view(n, self.heads, self.head_dim), *rope)
        k = apply_rotary(self.k_proj(x).view(n, self.kv_heads, self.head_dim), *rope)
        v = self.v_proj(x).view(n, self.kv_heads, self.head_dim)
        # Write first, then read: a prefill's tokens see each other through the cache.
        cached_keys[slots, :, positions] = k
        cached_values[slots, :, positions] = v
        keys = cached_keys[layout.cache_rows, :, :layout.key_length]
        values = cached_values[layout.cache_rows, :, :layout.key_length]

        # Grouped-query attention without copying keys: the `group` query heads sharing a kv head are
        # laid out as extra query rows of that kv head, (sequences, kv_heads, tokens * group, head_dim).
        grid = layout.to_grid(q.view(n, self.kv_heads, self.group, self.head_dim))
        s, t = grid.shape[:2]
        queries = grid.permute(0, 2, 1, 3, 4).reshape(s, self.kv_heads, t * self.group, self.head_dim)
        out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=layout.mask)
        out = out.view(s, self.kv_heads, t, self.group, self.head_dim).permute(0, 2, 1, 3, 4)
        return self.o_proj(layout.from_grid(out).reshape(n, self.heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, gate_proj: TrellisLinear, up_proj: TrellisLinear,
                 down_proj: TrellisLinear) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, self_attn: Attention, mlp: MLP, input_layernorm: RMSNorm,
                 post_attention_layernorm: RMSNorm) -> None:
        super().__init__()
        self.self_attn, self.mlp = self_attn, mlp
        self.input_layernorm, self.post_attention_layernorm = input_layernorm, post_attention_layernorm
        # On CPU with the kernels, decode steps of up to fused_max_rows sequences run the whole layer
        # as one C++ call (trellis_runtime/backend_cpu.py: fused_decoder_layer).
        self.fused_decode: torch.ScriptObject | None = None
        self.fused_max_rows = 0
        if self_attn.fused_decode:
            self.fused_decode = fused_decoder_layer(
                [linear.backend for linear in (self_attn.q_proj, self_attn.k_proj, self_attn.v_proj,
                                               self_attn.o_proj, mlp.gate_proj, mlp.up_proj,
                                               mlp.down_proj)],
                input_layernorm.weight, post_attention_layernorm.weight, input_layernorm.eps)
            self.fused_max_rows = DENSE_KERNEL_MAX_ROWS

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], layout: AttentionLayout,
                slots: torch.Tensor, positions: torch.Tensor, cached_keys: torch.Tensor,
                cached_values: torch.Tensor) -> torch.Tensor:
        if (self.fused_decode is not None and layout.tokens_per_sequence == 1 and not layout.padded
                and x.shape[0] <= self.fused_max_rows):
            return self.fused_decode.decode(x, *rope, cached_keys, cached_values, slots, positions)
        x = x + self.self_attn(self.input_layernorm(x), rope, layout, slots, positions,
                               cached_keys, cached_values)
        return x + self.mlp(self.post_attention_layernorm(x))


class TrellisLlama(nn.Module):
    def __init__(self, shape: LlamaShape, embed_tokens: torch.Tensor, layers: list[DecoderLayer],
                 norm: RMSNorm, lm_head: torch.Tensor, rotary: RotaryEmbedding,
                 dtype: torch.dtype) -> None:
        """dtype: the activations' (and KV cache's) dtype; embed_tokens and lm_head may be stored
        narrower (bf16 on CPU, exactly as the checkpoint holds them) and are widened as they are read."""
        super().__init__()
        self.shape = shape
        self.dtype = dtype
        self.register_buffer("embed_tokens", embed_tokens, persistent=False)
        self.layers = nn.ModuleList(layers)
        self.norm = norm
        self.register_buffer("lm_head", lm_head, persistent=False)  # the same tensor when tied
        self.rotary = rotary

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint, device: str | torch.device = "cpu"
                        ) -> "TrellisLlama":
        """Build the model on `device`, decoding the quantized linears as their backend requires."""
        device = torch.device(device)
        dtype = compute_dtype(device)
        shape, config = checkpoint.shape, checkpoint.config
        eps = float(config.get("rms_norm_eps", 1e-6))
        # The CPU kernels also fuse the small ops of a decode step (norms, attention).
        fused = device.type == "cpu" and dtype == torch.float32 and cpu_kernels_loaded()

        def dense(name: str) -> torch.Tensor:
            return checkpoint.dense[name].to(device=device, dtype=dtype).contiguous()

        def linear(name: str) -> TrellisLinear:
            return TrellisLinear(checkpoint.quantized[name], device)

        layers = []
        for index in range(shape.layers):
            prefix = f"model.layers.{index}"
            attention = Attention(*(linear(f"{prefix}.self_attn.{p}_proj") for p in "qkvo"),
                                  heads=shape.heads, kv_heads=shape.kv_heads, head_dim=shape.head_dim,
                                  fused_decode=fused)
            mlp = MLP(*(linear(f"{prefix}.mlp.{p}_proj") for p in ("gate", "up", "down")))
            layers.append(DecoderLayer(
                attention, mlp, RMSNorm(dense(f"{prefix}.input_layernorm.weight"), eps, fused),
                RMSNorm(dense(f"{prefix}.post_attention_layernorm.weight"), eps, fused)))
        def head(name: str) -> torch.Tensor:
            """Embeddings and output head: bf16 kept as is where the CPU kernel multiplies by it
            (half the bytes a decode step reads, the same values), else in the compute dtype."""
            tensor = checkpoint.dense[name]
            if device.type == "cpu" and tensor.dtype == torch.bfloat16 and cpu_kernels_loaded():
                return tensor.contiguous()
            return dense(name)

        embed = head("model.embed_tokens.weight")
        lm_head = embed if shape.tied_embeddings else head("lm_head.weight")
        rotary = RotaryEmbedding(rope_frequencies(config, shape.head_dim).to(device))
        model = cls(shape, embed, layers, RMSNorm(dense("model.norm.weight"), eps, fused), lm_head,
                    rotary, dtype)
        model.eval()
        linears = [m for m in model.modules() if isinstance(m, TrellisLinear)]
        packed = sum(m.quantized.codes.numel() * m.quantized.codes.element_size() for m in linears)
        logger.info("%d quantized linears decoded for %s: %.1f MiB held in %s (packed codes: %.1f MiB)",
                    len(linears), device, sum(m.decoded_bytes for m in linears) / 2**20, dtype,
                    packed / 2**20)
        return model

    def new_cache(self, max_slots: int, max_seq_len: int) -> KVCache:
        """A KV cache shaped for this model, on its device and in its dtype."""
        return KVCache(layers=self.shape.layers, max_slots=max_slots, kv_heads=self.shape.kv_heads,
                       max_seq_len=max_seq_len, head_dim=self.shape.head_dim,
                       dtype=self.dtype, device=self.embed_tokens.device)

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
            layout = AttentionLayout.plan(positions.tolist(), slots.tolist(), positions, cache,
                                          self.shape.heads // self.shape.kv_heads)
        rope = self.rotary(positions, self.dtype)
        x = F.embedding(tokens, self.embed_tokens).to(self.dtype)
        for layer, cached_keys, cached_values in zip(self.layers, cache.keys, cache.values):
            x = layer(x, rope, layout, slots, positions, cached_keys, cached_values)
        if logits_for is not None:
            x = x.index_select(0, logits_for)
        x = self.norm(x)
        if self.lm_head.dtype != self.dtype:  # bf16 on CPU: the kernel widens it on the fly
            return dense_product(x, self.lm_head)
        return F.linear(x, self.lm_head).float()


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """(TrellisLlama, tokenizer) for the packed checkpoint directory at `path`."""
    from transformers import AutoTokenizer  # here, so that importing trellis_runtime stays light

    model = TrellisLlama.from_checkpoint(load_checkpoint(path), device)
    return model, AutoTokenizer.from_pretrained(str(path))
