"""Rotary position embeddings, with every scaling type transformers' Llama-family models use.

The inverse frequencies come from transformers' own rope functions (`ROPE_INIT_FUNCTIONS`), so a
scaling type (linear, dynamic NTK, llama3, yarn, longrope) means exactly what it means to the model
it was trained with. Two types depend on the sequence's length: dynamic NTK stretches its base once a
sequence grows past the original context, and longrope switches to its long factors there. In a
batch each sequence has its own length, so those frequencies are chosen per token, by the length of
the token's sequence in this forward (its largest position + 1), as transformers chooses them for a
forward of that one sequence.
"""

from __future__ import annotations

import torch
from torch import nn

from trellis_runtime.architecture import rope_parameters, rope_type

LENGTH_DEPENDENT = ("dynamic", "longrope")


def default_frequencies(theta: float, dim: int) -> torch.Tensor:
    """The unscaled inverse frequencies (dim / 2,) of a rotation over `dim` entries of a head."""
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim
    return 1.0 / (theta ** exponents)


def rotation_factors(positions: torch.Tensor, frequencies: torch.Tensor, scaling: float,
                     dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors `apply_rotary` needs at each token's position, (N, 1, rotary_dim) each, shared by
    all heads; frequencies: (rotary_dim / 2,) or one row per token. Angles are computed in float32,
    as transformers does, then cast."""
    angles = positions[:, None].to(torch.float32) * frequencies
    cos, sin = angles.cos() * scaling, angles.sin() * scaling
    return (torch.cat((cos, cos), dim=-1)[:, None].to(dtype),
            torch.cat((-sin, sin), dim=-1)[:, None].to(dtype))


def rope_frequencies(config, layer_type: str, seq_len: int | None = None
                     ) -> tuple[torch.Tensor, float]:
    """(inverse frequencies, cos/sin scaling) of one kind of layer, for a sequence of `seq_len`
    tokens where the type depends on it (None: the frequencies for short sequences)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = rope_parameters(config, layer_type)
    kind = rope_type(params)
    if kind == "default":  # over the whole head unless partial_rotary_factor says less (Phi-3)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
        return default_frequencies(float(params["rope_theta"]), dim), 1.0
    has_layer_types = isinstance((config.rope_parameters or {}).get(layer_type), dict)
    kwargs = {"layer_type": layer_type} if has_layer_types else {}
    if seq_len is not None:
        kwargs["seq_len"] = seq_len
    frequencies, scaling = ROPE_INIT_FUNCTIONS[kind](config, None, **kwargs)
    return frequencies.to(torch.float32), float(scaling)


class RotaryEmbedding(nn.Module):
    """The rotation factors of one kind of layer (Gemma 3's local and global layers differ)."""

    def __init__(self, config, layer_type: str) -> None:
        super().__init__()
        self.config, self.layer_type = config, layer_type
        params = rope_parameters(config, layer_type)
        self.rope_type = rope_type(params)
        frequencies, self.scaling = rope_frequencies(config, layer_type)
        self.register_buffer("frequencies", frequencies, persistent=False)
        # Where the length-dependent types change: longrope's own original context, and for dynamic
        # NTK the context transformers compares with (max_position_embeddings).
        self.original_context = int((params.get("original_max_position_embeddings")
                                     if self.rope_type == "longrope" else None)
                                    or getattr(config, "max_position_embeddings", 0) or 0)
        self.rotary_dim = 2 * frequencies.numel()

    def forward(self, positions: torch.Tensor, slots: torch.Tensor, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """rotation_factors at each token's position. slots: the (N,) cache slot of each token, which
        tells its sequence (length-dependent types)."""
        return rotation_factors(positions, self._frequencies_per_token(positions, slots), self.scaling,
                                dtype)

    def _frequencies_per_token(self, positions: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        if self.rope_type not in LENGTH_DEPENDENT or int(positions.max()) < self.original_context:
            return self.frequencies
        # Each sequence's length in this forward: its largest position + 1.
        lengths = torch.zeros(int(slots.max()) + 1, dtype=positions.dtype, device=positions.device)
        lengths = lengths.scatter_reduce(0, slots, positions + 1, reduce="amax")[slots]
        table = self.frequencies.expand(positions.shape[0], -1).clone()
        for length in lengths.unique().tolist():
            if length > self.original_context:
                scaled, _ = rope_frequencies(self.config, self.layer_type, seq_len=length)
                table[lengths == length] = scaled.to(table.device)
        return table


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x_i, x_{i + d/2}) of the first d = rotary_dim entries of (N, heads, head_dim)
    by its angle, as Llama does; entries past d (partial rotary) pass unchanged.

    Swapping the halves and multiplying by [-sin, sin] gives the same floats as the textbook
    [x1 cos - x2 sin, x2 cos + x1 sin] in four operations instead of eight; a decode step is short
    enough for the difference to show.
    """
    rotary_dim = cos.shape[-1]
    if rotary_dim == x.shape[-1]:
        return x * cos + x.roll(rotary_dim // 2, dims=-1) * signed_sin
    rotated, passed = x[..., :rotary_dim], x[..., rotary_dim:]
    rotated = rotated * cos + rotated.roll(rotary_dim // 2, dims=-1) * signed_sin
    return torch.cat((rotated, passed), dim=-1)
