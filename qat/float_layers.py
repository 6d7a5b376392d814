"""Calibration activations pushed through the float model one decoder layer at a time.

BlockLDLQ needs, for each linear, H = E[x x^T] over its inputs on calibration text, computed from the float
model (not the partly quantized one), so every layer can be quantized independently. Only one layer's
float weights and the activations between two layers are held: the windows are embedded once, and each
`advance` builds the next float layer (the runtime's own decoder layer with float nn.Linears, the same
computation transformers' model performs, as tests/test_architectures.py checks), hooks the first linear of
each input group to accumulate its Hessian, and replaces the activations by the layer's output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qat.hessian import hessian_key
from qat.weights import Weights
from trellis_runtime.architecture import ModelShape, transformers_config
from trellis_runtime.attention import AttentionLayout
from trellis_runtime.kv_cache import KVCache
from trellis_runtime.model import DecoderLayer, decoder_layer, embedding_scale, rms_norm
from trellis_runtime.rope import RotaryEmbedding

DEVICE = torch.device("cpu")


def float_layer(shape: ModelShape, index: int, weights: Weights) -> DecoderLayer:
    """Decoder layer `index` in float32 with its weights read from `weights`."""
    def linear(name: str) -> nn.Linear:
        weight = weights.get(f"{name}.weight")
        module = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        module.weight = nn.Parameter(weight, requires_grad=False)
        if shape.biased(name.split(".", 3)[3]):
            module.bias = nn.Parameter(weights.get(f"{name}.bias"), requires_grad=False)
        return module

    def norm(name: str, fused: bool) -> nn.Module:
        return rms_norm(weights.get(name), shape, DEVICE, torch.float32)

    return decoder_layer(shape, index, linear, norm, kernels=False).eval()


class FloatStream:
    """The activations of `windows` (count, ctx) token ids between two float layers, in batches."""

    def __init__(self, shape: ModelShape, config: dict, weights: Weights, windows: torch.Tensor,
                 batch_size: int = 4) -> None:
        self.shape, self.weights = shape, weights
        self.tokens = windows.numel()
        embed = weights.get("model.embed_tokens.weight")
        scale = embedding_scale(shape, torch.float32)
        self.hidden = [F.embedding(batch.reshape(-1), embed) * (scale or 1.0)
                       for batch in windows.split(batch_size)]
        del embed
        parsed = transformers_config(config)
        self.rotary = {kind: RotaryEmbedding(parsed, kind) for kind in set(shape.layer_types)}
        ctx = windows.shape[1]
        self.cache = KVCache(layers=1, max_slots=batch_size, kv_heads=shape.kv_heads, max_seq_len=ctx,
                             head_dim=shape.head_dim)
        for _ in range(batch_size):  # slot i holds window i of a batch
            self.cache.allocate()
        self.ctx = ctx
        self.layouts: dict[int, AttentionLayout] = {}  # by windows per batch (the last may be short)
        self.next_layer = 0

    def advance(self, collect: bool = True) -> dict[str, torch.Tensor]:
        """Run the next layer over every batch; {hessian_key: (n, n) float64} of its input groups,
        averaged over all tokens, or {} when not `collect`ing (a resumed run catching up)."""
        index = self.next_layer
        layer = float_layer(self.shape, index, self.weights)
        sums: dict[str, torch.Tensor] = {}
        handles = []
        if collect:
            for group, members in self.shape.input_groups().items():
                key = hessian_key(index, group)

                def hook(module, inputs, key=key):
                    x = inputs[0].reshape(-1, inputs[0].shape[-1])
                    partial = (x.t() @ x).to(torch.float64)  # fp32 within a batch, fp64 across
                    sums[key] = partial if key not in sums else sums[key].add_(partial)

                handles.append(layer.get_submodule(members[0]).register_forward_pre_hook(hook))
        try:
            with torch.inference_mode():
                self.hidden = [self._layer_forward(layer, index, x) for x in self.hidden]
        finally:
            for handle in handles:
                handle.remove()
        self.next_layer += 1
        return {key: total / self.tokens for key, total in sums.items()}

    def _layer_forward(self, layer: DecoderLayer, index: int, x: torch.Tensor) -> torch.Tensor:
        """One batch of windows, each a sequence of its own cache slot starting at position 0."""
        windows = x.shape[0] // self.ctx
        positions = torch.arange(self.ctx).repeat(windows)
        slots = torch.arange(windows).repeat_interleave(self.ctx)
        if windows not in self.layouts:
            self.layouts[windows] = AttentionLayout.plan(
                positions.tolist(), slots.tolist(), positions, self.cache,
                self.shape.heads // self.shape.kv_heads, self.shape.windows())
        rope = self.rotary[self.shape.layer_types[index]](positions, slots, torch.float32)
        return layer(x, rope, self.layouts[windows], slots, positions, self.cache.keys[0],
                     self.cache.values[0])
