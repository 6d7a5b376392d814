"""What a supported model looks like: its linear layers, its dense tensors and their shapes.

Only the Llama family as transformers defines it (`model_type` "llama": Llama 1-3, SmolLM, TinyLlama
and other models with the same layout) is supported. Everything that needs names or shapes of a
model's tensors asks this module, so the quantizer, the checkpoint validator and the runtime agree.
"""

from __future__ import annotations

from dataclasses import dataclass

from trellis_runtime.errors import SourceError

SUPPORTED_MODEL_TYPES = ("llama",)

# Linears that read the same input share one Hessian and one input rotation.
INPUT_GROUPS = {
    "qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "o": ("self_attn.o_proj",),
    "gate_up": ("mlp.gate_proj", "mlp.up_proj"),
    "down": ("mlp.down_proj",),
}


@dataclass(frozen=True)
class LlamaShape:
    """The dimensions of a Llama-family model, read from its config."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool
    max_positions: int  # the context length the model was trained for

    @classmethod
    def from_config(cls, config: dict) -> "LlamaShape":
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise SourceError(f"unsupported architecture {model_type!r}: supported model types are "
                              f"{', '.join(SUPPORTED_MODEL_TYPES)} (Llama family)")
        try:
            heads = int(config["num_attention_heads"])
            hidden = int(config["hidden_size"])
            return cls(
                layers=int(config["num_hidden_layers"]), hidden=hidden,
                intermediate=int(config["intermediate_size"]), heads=heads,
                kv_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or hidden // heads),
                vocab=int(config["vocab_size"]),
                tied_embeddings=bool(config.get("tie_word_embeddings", False)),
                max_positions=int(config.get("max_position_embeddings") or 2048))
        except KeyError as missing:
            raise SourceError(f"model config lacks {missing.args[0]!r}") from None

    def linear_shapes(self, layer: int) -> dict[str, tuple[int, int]]:
        """(out_features, in_features) of each linear in one decoder layer, by module name."""
        q_out, kv_out = self.heads * self.head_dim, self.kv_heads * self.head_dim
        local = {
            "self_attn.q_proj": (q_out, self.hidden),
            "self_attn.k_proj": (kv_out, self.hidden),
            "self_attn.v_proj": (kv_out, self.hidden),
            "self_attn.o_proj": (self.hidden, q_out),
            "mlp.gate_proj": (self.intermediate, self.hidden),
            "mlp.up_proj": (self.intermediate, self.hidden),
            "mlp.down_proj": (self.hidden, self.intermediate),
        }
        return {f"model.layers.{layer}.{name}": shape for name, shape in local.items()}

    def all_linear_shapes(self) -> dict[str, tuple[int, int]]:
        shapes: dict[str, tuple[int, int]] = {}
        for layer in range(self.layers):
            shapes.update(self.linear_shapes(layer))
        return shapes

    def dense_shapes(self) -> dict[str, tuple[int, ...]]:
        """Tensors kept unquantized: embeddings, norms and an untied lm_head."""
        shapes: dict[str, tuple[int, ...]] = {
            "model.embed_tokens.weight": (self.vocab, self.hidden),
            "model.norm.weight": (self.hidden,),
        }
        for layer in range(self.layers):
            shapes[f"model.layers.{layer}.input_layernorm.weight"] = (self.hidden,)
            shapes[f"model.layers.{layer}.post_attention_layernorm.weight"] = (self.hidden,)
        if not self.tied_embeddings:
            shapes["lm_head.weight"] = (self.vocab, self.hidden)
        return shapes
