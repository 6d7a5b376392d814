"""Every supported family, end to end: a small random model built by transformers is quantized, and the
runtime model computes what transformers' own model computes on the same dequantized weights (prefill,
decode through the cache, and a mixed batch), decodes the same greedy tokens, and serves a chat request
over a real socket.

Each source model has what its family adds, at values that matter: random biases and norm weights
(transformers initialises them to constants), sliding windows shorter than the prompts, soft caps low
enough to bite, and queries and keys scaled up so attention is sharp and a wrong position, window or
mask moves the logits far more than the tolerance.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch

from conftest import pack_tiny_model
from live_server import live_server
from qat.sources import dense_model_from_checkpoint
from trellis_runtime.checkpoint import load_checkpoint
from trellis_runtime.model import TrellisModel

BASE = {"vocab_size": 49152, "hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "max_position_embeddings": 256, "tie_word_embeddings": True}
WINDOW = 6  # shorter than the prompts below, so sliding layers see less than full ones
FAMILIES = {
    "llama-biases": ("llama", {"attention_bias": True, "mlp_bias": True, "tie_word_embeddings": False}),
    "mistral": ("mistral", {"sliding_window": WINDOW}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    "gemma": ("gemma", {"hidden_act": "gelu_pytorch_tanh"}),
    "gemma2": ("gemma2", {"sliding_window": WINDOW, "query_pre_attn_scalar": 24,
                          "attn_logit_softcapping": 4.0, "final_logit_softcapping": 2.0}),
    "gemma3": ("gemma3_text", {"sliding_window": WINDOW, "query_pre_attn_scalar": 24,
                               "layer_types": ["sliding_attention", "full_attention"]}),
    "phi3": ("phi3", {"pad_token_id": 0}),
    # Widths real models have, scaled down: Llama-2-7B's intermediate 11008 = 43 * 256 has no Kronecker
    # Hadamard (688 = 43 * 16 rotates block-diagonally); Qwen2.5-0.5B's 896 = 14 * 64 heads of 64 with 2
    # kv heads and its 4864 = 19 * 256 (here 112 and 304 = 19 * 16); Gemma's 256-wide heads over a
    # 9 * 2^p hidden size and 27 * 2^p intermediate (here 144 and 432).
    "llama2-dims": ("llama", {"intermediate_size": 688}),
    "qwen2.5-dims": ("qwen2", {"hidden_size": 112, "intermediate_size": 304, "num_attention_heads": 7,
                               "num_key_value_heads": 1}),
    "gemma-dims": ("gemma", {"hidden_size": 144, "intermediate_size": 432, "head_dim": 32,
                             "num_key_value_heads": 1, "hidden_act": "gelu_pytorch_tanh"}),
}


def random_source_model(model_type: str, extra: dict, directory: Path, tokenizer_dir: Path) -> Path:
    """A random transformers model of this family saved as safetensors with the built-in tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.for_model(model_type, **{**BASE, **extra})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if name.endswith("bias"):
                parameter.copy_(noise * 0.5)
            elif "norm" in name:  # around each family's identity: 1, or 0 for Gemma's (1 + w)
                parameter.copy_(parameter + 0.3 * noise)
            elif name.endswith(("q_proj.weight", "k_proj.weight", "qkv_proj.weight")):
                parameter.mul_(8)
    model.save_pretrained(str(directory), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module", params=list(FAMILIES))
def packed(request, builtin_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model_type, extra = FAMILIES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    source = random_source_model(model_type, extra, root / "source", builtin_tokenizer_dir)
    return pack_tiny_model(source, root / "packed", "1mad")


@pytest.fixture(scope="module")
def models(packed: Path):
    checkpoint = load_checkpoint(packed)
    return TrellisModel.from_checkpoint(checkpoint, "cpu"), dense_model_from_checkpoint(checkpoint)


def reference_logits(reference, tokens: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return reference(torch.tensor([tokens])).logits[0].float()


def run(model: TrellisModel, cache, tokens: list[int], positions: list[int], slots: list[int]
        ) -> torch.Tensor:
    as_tensor = lambda values: torch.tensor(values, dtype=torch.int64)  # noqa: E731
    with torch.inference_mode():
        return model(as_tensor(tokens), as_tensor(positions), as_tensor(slots), cache)


def assert_close(ours: torch.Tensor, expected: torch.Tensor) -> None:
    """Within 1e-4 of the logit scale: float32 on identical weights differs only in summation order."""
    error = (ours - expected).abs().max().item()
    assert error <= 1e-4 * expected.abs().max().item(), f"max abs diff {error}"


def random_tokens(count: int, seed: int) -> list[int]:
    return torch.randint(0, 49152, (count,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_prefill_and_cached_decode_match_transformers(models) -> None:
    model, reference = models
    tokens = random_tokens(20, seed=2)
    expected = reference_logits(reference, tokens)
    cache = model.new_cache(max_slots=1, max_seq_len=20)
    slot = cache.allocate()
    assert_close(run(model, cache, tokens[:12], list(range(12)), [slot] * 12), expected[:12])
    for position in range(12, 20):
        assert_close(run(model, cache, [tokens[position]], [position], [slot]),
                     expected[position:position + 1])


def test_mixed_batch_matches_transformers(models) -> None:
    """Three sequences interleaved in one prefill forward, then a decode step of all three."""
    model, reference = models
    lengths = (5, 9, 13)
    sequences = [random_tokens(n + 1, seed=10 + n) for n in lengths]
    expected = [reference_logits(reference, tokens) for tokens in sequences]
    cache = model.new_cache(max_slots=3, max_seq_len=16)
    slots = [cache.allocate() for _ in range(3)]
    order = [(s, p) for p in range(max(lengths)) for s in range(3) if p < lengths[s]]
    logits = run(model, cache, [sequences[s][p] for s, p in order], [p for _, p in order],
                 [slots[s] for s, _ in order])
    for row, (s, p) in enumerate(order):
        assert_close(logits[row:row + 1], expected[s][p:p + 1])
    logits = run(model, cache, [sequences[s][n] for s, n in enumerate(lengths)], list(lengths), slots)
    for s, n in enumerate(lengths):
        assert_close(logits[s:s + 1], expected[s][n:n + 1])


def test_greedy_tokens_equal_transformers(models) -> None:
    model, reference = models
    prompt = random_tokens(8, seed=3)
    with torch.inference_mode():
        expected = reference.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                                      pad_token_id=0)[0, len(prompt):].tolist()
    cache = model.new_cache(max_slots=1, max_seq_len=16)
    slot = cache.allocate()
    tokens = list(prompt)
    logits = run(model, cache, tokens, list(range(len(tokens))), [slot] * len(tokens))[-1]
    for _ in range(8):
        tokens.append(int(logits.argmax()))
        logits = run(model, cache, tokens[-1:], [len(tokens) - 1], [slot])[-1]
    assert tokens[len(prompt):] == expected


def test_serves_a_chat_request(packed: Path) -> None:
    from server.app import create_app
    from trellis_runtime.engine import Engine
    from trellis_runtime.model import load_model

    model, tokenizer = load_model(packed, "cpu")
    engine = Engine(model, tokenizer, max_batch=2, max_seq_len=128)
    with live_server(create_app(engine, tokenizer, "tiny")) as url:
        response = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
            "model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["choices"][0]["message"]["role"] == "assistant"
    assert answer["usage"]["completion_tokens"] >= 1


def test_every_activation_a_config_may_name_is_implemented() -> None:
    from trellis_runtime.architecture import ACTIVATIONS
    from trellis_runtime.model import ACTIVATION_FUNCTIONS

    assert set(ACTIVATION_FUNCTIONS) == set(ACTIVATIONS)


@pytest.mark.parametrize(("model_type", "extra", "message"), [
    ("gpt2", {}, "unsupported architecture 'gpt2': supported model types are llama, mistral, qwen2"),
    ("llama", {"hidden_act": "relu"}, "activation 'relu' is not supported"),
    ("llama", {"rope_parameters": {"rope_type": "proportional", "rope_theta": 1e4, "factor": 2.0}},
     "rope type 'proportional' is not supported"),
    ("gemma3_text", {"use_bidirectional_attention": True}, "bidirectional attention is not supported"),
    ("qwen2", {"layer_types": ["chunked_attention", "full_attention"]},
     "layer type 'chunked_attention' is not supported"),
    ("llama", {"num_key_value_heads": 3}, "do not share 3 kv heads evenly"),
])
def test_config_features_the_runtime_lacks_are_refused(model_type: str, extra: dict,
                                                       message: str) -> None:
    from trellis_runtime.architecture import ModelShape
    from trellis_runtime.errors import SourceError

    with pytest.raises(SourceError, match=message):
        ModelShape.from_config({"model_type": model_type, **BASE, **extra})
