"""What a supported model looks like: its families, their tensors and shapes, and the features read
from a config.

One decoder implementation (trellis_runtime/model.py) serves every family; a `Family` names only
what differs from Llama (weight names, norm variant, activation, extras), and `ModelShape` reads one
model's dimensions and features from its config. Everything that needs names or shapes of a model's
tensors asks this module, so the quantizer, the checkpoint validator and the runtime agree.

A config feature the runtime does not implement is refused here, from the config alone, before any
weight is read: a quantization never runs for hours to produce a model that cannot serve.
"""

from __future__ import annotations

from dataclasses import dataclass

from trellis_runtime.errors import SourceError


@dataclass(frozen=True)
class Family:
    """How one architecture differs from Llama. Linear names are relative to a decoder layer."""

    name: str  # for people: the models it covers
    fused_qkv: bool = False  # one `self_attn.qkv_proj` (Phi-3) instead of q/k/v_proj
    fused_gate_up: bool = False  # one `mlp.gate_up_proj` (Phi-3), gate rows first
    qkv_bias: bool = False  # q/k/v always carry a bias (Qwen2), whatever the config says
    qk_norm: bool = False  # per-head RMSNorm of queries and keys before the rotation (Qwen3, Gemma 3)
    norm_offset: float = 0.0  # Gemma's RMSNorm multiplies by (1 + w)
    embed_scale: bool = False  # Gemma multiplies the embeddings by sqrt(hidden)
    sandwich_norms: bool = False  # Gemma 2/3 also normalise the attention and MLP outputs
    activation_key: str = "hidden_act"  # the config attribute naming the MLP activation


_LLAMA = Family("Llama 1-3.3, SmolLM, TinyLlama")
FAMILIES: dict[str, Family] = {
    "llama": _LLAMA,
    "mistral": Family("Mistral"),
    "qwen2": Family("Qwen2, Qwen2.5", qkv_bias=True),
    "qwen3": Family("Qwen3", qk_norm=True),
    "gemma": Family("Gemma", norm_offset=1.0, embed_scale=True),
    "gemma2": Family("Gemma 2", norm_offset=1.0, embed_scale=True, sandwich_norms=True,
                     activation_key="hidden_activation"),
    "gemma3_text": Family("Gemma 3 (text)", norm_offset=1.0, embed_scale=True, sandwich_norms=True,
                          qk_norm=True, activation_key="hidden_activation"),
    "phi3": Family("Phi-3", fused_qkv=True, fused_gate_up=True),
}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)
ACTIVATIONS = ("silu", "gelu_pytorch_tanh", "gelu")
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")
LAYER_TYPES = ("full_attention", "sliding_attention")

# Linears that read the same input share one Hessian and one input rotation.
_SPLIT_GROUPS = {"qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                 "o": ("self_attn.o_proj",),
                 "gate_up": ("mlp.gate_proj", "mlp.up_proj"),
                 "down": ("mlp.down_proj",)}


def transformers_config(config: dict):
    """The transformers config object of a config dict: it fills in each family's defaults and
    derived fields (layer_types, rope_parameters in their current spelling) the way the models
    themselves read them."""
    from transformers import AutoConfig

    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise SourceError(f"unsupported architecture {model_type!r}: supported model types are "
                          f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    fields = {k: v for k, v in config.items() if k != "model_type"}
    try:
        return AutoConfig.for_model(model_type, **fields)
    except (TypeError, ValueError, KeyError) as err:
        message = " ".join(str(err).split())
        raise SourceError(f"{model_type} config is not valid: {message}") from None


def rope_parameters(config, layer_type: str) -> dict:
    """The rope parameters one kind of layer uses: Gemma 3 keeps one set per layer type."""
    params = dict(config.rope_parameters or {})
    if layer_type in params and isinstance(params[layer_type], dict):
        params = dict(params[layer_type])
    return params


def rope_type(params: dict) -> str:
    """The scaling type a rope parameter dict names (older configs spell its key `type`)."""
    return params.get("rope_type", params.get("type", "default"))


@dataclass(frozen=True)
class ModelShape:
    """The dimensions and features of one model, read from its config."""

    model_type: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool
    max_positions: int  # the context length the model was trained for
    attention_bias: bool  # q/k/v/o carry biases (o only when the config says so)
    mlp_bias: bool
    sliding_window: int | None
    layer_types: tuple[str, ...]  # "full_attention" or "sliding_attention", per layer
    activation: str
    rms_norm_eps: float
    attention_scale: float  # multiplies q.k: head_dim^-0.5, or query_pre_attn_scalar^-0.5
    attention_softcap: float | None  # Gemma 2: scores become cap * tanh(scores / cap)
    final_softcap: float | None

    @property
    def family(self) -> Family:
        return FAMILIES[self.model_type]

    @classmethod
    def from_config(cls, config: dict) -> "ModelShape":
        """Read and check a config dict; any feature the runtime lacks is a SourceError."""
        parsed = transformers_config(config)
        family = FAMILIES[config["model_type"]]
        try:
            heads = int(parsed.num_attention_heads)
            hidden = int(parsed.hidden_size)
            layers = int(parsed.num_hidden_layers)
            head_dim = int(getattr(parsed, "head_dim", None) or hidden // heads)
            shape = cls(
                model_type=config["model_type"], layers=layers, hidden=hidden,
                intermediate=int(parsed.intermediate_size), heads=heads,
                kv_heads=int(getattr(parsed, "num_key_value_heads", None) or heads),
                head_dim=head_dim, vocab=int(parsed.vocab_size),
                tied_embeddings=bool(parsed.tie_word_embeddings),
                max_positions=int(getattr(parsed, "max_position_embeddings", None) or 2048),
                attention_bias=bool(getattr(parsed, "attention_bias", False)),
                mlp_bias=bool(getattr(parsed, "mlp_bias", False)),
                sliding_window=getattr(parsed, "sliding_window", None),
                layer_types=_layer_types(parsed, layers),
                activation=str(getattr(parsed, family.activation_key, None) or "silu"),
                rms_norm_eps=float(getattr(parsed, "rms_norm_eps", None) or 1e-6),
                attention_scale=float(getattr(parsed, "query_pre_attn_scalar", None)
                                      or head_dim) ** -0.5,
                attention_softcap=getattr(parsed, "attn_logit_softcapping", None),
                final_softcap=getattr(parsed, "final_logit_softcapping", None))
        except (AttributeError, TypeError) as err:
            raise SourceError(f"{config['model_type']} config lacks a field: {err}") from None
        shape._check_features(parsed)
        return shape

    def _check_features(self, parsed) -> None:
        """Refuse what the runtime would otherwise compute differently from the model."""
        where = f"{self.model_type} config"
        if self.activation not in ACTIVATIONS:
            raise SourceError(f"{where}: activation {self.activation!r} is not supported: supported "
                              f"are {', '.join(ACTIVATIONS)}")
        if self.heads % self.kv_heads or self.head_dim % 2:
            raise SourceError(f"{where}: {self.heads} query heads do not share {self.kv_heads} kv "
                              f"heads evenly, or head_dim {self.head_dim} is odd")
        if getattr(parsed, "use_bidirectional_attention", False):
            raise SourceError(f"{where}: bidirectional attention is not supported")
        for kind in sorted(set(self.layer_types)):
            if kind not in LAYER_TYPES:
                raise SourceError(f"{where}: layer type {kind!r} is not supported: supported are "
                                  f"{', '.join(LAYER_TYPES)}")
            params = rope_parameters(parsed, kind)
            kind_rope = rope_type(params)
            if params.get("partial_rotary_factor", 1.0) != 1.0 and not self.family.fused_qkv:
                raise SourceError(f"{where}: partial_rotary_factor is supported for phi3 only")
            if kind_rope not in ROPE_TYPES:
                raise SourceError(f"{where}: rope type {kind_rope!r} is not supported: supported "
                                  f"types are {', '.join(ROPE_TYPES)}")
        if "sliding_attention" in self.layer_types and not self.sliding_window:
            raise SourceError(f"{where}: sliding-attention layers but no sliding_window size")

    def window(self, layer: int) -> int | None:
        """The number of most recent positions layer `layer` attends to (None: all)."""
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None

    def windows(self) -> frozenset[int | None]:
        """The attention windows of all layers: each needs its own mask."""
        return frozenset(self.window(layer) for layer in range(self.layers))

    def llama_layer(self, layer: int) -> bool:
        """Whether layer `layer` computes exactly a Llama layer, with nothing a family adds: the CPU
        decode kernels, which fuse a whole layer, implement only that."""
        family = self.family
        extras = (family.fused_qkv, family.fused_gate_up, family.qkv_bias, family.qk_norm,
                  family.sandwich_norms, family.norm_offset != 0, self.attention_bias, self.mlp_bias,
                  self.activation != "silu", self.window(layer) is not None,
                  self.attention_scale != self.head_dim ** -0.5, self.attention_softcap is not None)
        return not any(extras)

    def input_groups(self) -> dict[str, tuple[str, ...]]:
        """The linears of a layer by shared input (relative names), in the order they are stored."""
        groups = dict(_SPLIT_GROUPS)
        if self.family.fused_qkv:
            groups["qkv"] = ("self_attn.qkv_proj",)
        if self.family.fused_gate_up:
            groups["gate_up"] = ("mlp.gate_up_proj",)
        return groups

    def linear_shapes(self, layer: int) -> dict[str, tuple[int, int]]:
        """(out_features, in_features) of each linear in one decoder layer, by module name."""
        q_out, kv_out = self.heads * self.head_dim, self.kv_heads * self.head_dim
        local = {"self_attn.q_proj": (q_out, self.hidden),
                 "self_attn.k_proj": (kv_out, self.hidden),
                 "self_attn.v_proj": (kv_out, self.hidden),
                 "self_attn.qkv_proj": (q_out + 2 * kv_out, self.hidden),
                 "self_attn.o_proj": (self.hidden, q_out),
                 "mlp.gate_proj": (self.intermediate, self.hidden),
                 "mlp.up_proj": (self.intermediate, self.hidden),
                 "mlp.gate_up_proj": (2 * self.intermediate, self.hidden),
                 "mlp.down_proj": (self.hidden, self.intermediate)}
        names = [name for group in self.input_groups().values() for name in group]
        return {f"model.layers.{layer}.{name}": local[name] for name in names}

    def all_linear_shapes(self) -> dict[str, tuple[int, int]]:
        shapes: dict[str, tuple[int, int]] = {}
        for layer in range(self.layers):
            shapes.update(self.linear_shapes(layer))
        return shapes

    def biased(self, name: str) -> bool:
        """Whether the linear `name` (relative to its layer, e.g. self_attn.q_proj) has a bias."""
        if name.startswith("mlp."):
            return self.mlp_bias
        if name == "self_attn.o_proj":
            return self.attention_bias
        return self.attention_bias or self.family.qkv_bias

    def layer_norm_names(self) -> tuple[str, ...]:
        """The RMSNorms of a decoder layer, relative to it."""
        names = ("input_layernorm", "post_attention_layernorm")
        if self.family.sandwich_norms:
            names += ("pre_feedforward_layernorm", "post_feedforward_layernorm")
        if self.family.qk_norm:
            names += ("self_attn.q_norm", "self_attn.k_norm")
        return names

    def dense_shapes(self) -> dict[str, tuple[int, ...]]:
        """Tensors kept unquantized: embeddings, norms, biases and an untied lm_head."""
        shapes: dict[str, tuple[int, ...]] = {
            "model.embed_tokens.weight": (self.vocab, self.hidden),
            "model.norm.weight": (self.hidden,),
        }
        for layer in range(self.layers):
            prefix = f"model.layers.{layer}"
            for norm in self.layer_norm_names():
                size = self.head_dim if norm.startswith("self_attn.") else self.hidden
                shapes[f"{prefix}.{norm}.weight"] = (size,)
            for name, (out_features, _) in self.linear_shapes(layer).items():
                if self.biased(name[len(prefix) + 1:]):
                    shapes[f"{name}.bias"] = (out_features,)
        if not self.tied_embeddings:
            shapes["lm_head.weight"] = (self.vocab, self.hidden)
        return shapes


def _layer_types(parsed, layers: int) -> tuple[str, ...]:
    """Each layer's attention kind. Families without `layer_types` (Llama, Mistral, Phi-3) use one
    kind everywhere: sliding when the config sets a window, full otherwise."""
    kinds = getattr(parsed, "layer_types", None)
    if kinds:
        if len(kinds) != layers:
            raise SourceError(f"config layer_types names {len(kinds)} layers, not {layers}")
        return tuple(kinds)
    sliding = getattr(parsed, "sliding_window", None)
    return ("sliding_attention" if sliding else "full_attention",) * layers
