"""TrellisModel computes what transformers' LlamaForCausalLM computes on the same dequantized weights:
for a prefill, token by token through the KV cache, and for several sequences mixed in one forward."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import torch

from qat.sources import dense_model_from_checkpoint
from trellis_runtime.backend_cpu import cpu_kernels_loaded
from trellis_runtime.checkpoint import Checkpoint, load_checkpoint
from trellis_runtime.errors import SourceError
from trellis_runtime.model import TrellisModel, load_model

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint_dir: Path) -> Checkpoint:
    """The tiny checkpoint with q and k scaled up 8x (both models see the same weights).

    At its random initialisation (std 0.02) the tiny model attends almost uniformly, so a wrong rotary
    angle or a wrong mask would barely move its logits; sharp attention makes such errors show.
    """
    checkpoint = load_checkpoint(tiny_checkpoint_dir)
    for name, weight in checkpoint.quantized.items():
        if name.endswith(("q_proj", "k_proj")):
            checkpoint.quantized[name] = dataclasses.replace(weight, scale=weight.scale * 8)
    return checkpoint


@pytest.fixture(scope="module")
def model(checkpoint: Checkpoint) -> TrellisModel:
    return TrellisModel.from_checkpoint(checkpoint, "cpu")


@pytest.fixture(scope="module")
def reference(checkpoint: Checkpoint):
    return dense_model_from_checkpoint(checkpoint)


def reference_logits(reference, tokens: list[int]) -> torch.Tensor:
    """transformers' logits (len(tokens), vocab) for one sequence, computed without a cache."""
    with torch.inference_mode():
        return reference(torch.tensor([tokens])).logits[0].float()


def assert_close(ours: torch.Tensor, expected: torch.Tensor) -> None:
    # Both models run in float32 on identical weights and differ only in summation order (the RMSNorm
    # reduction, the SDPA kernel, the grouped-query layout): under 1e-6 of the logit scale, as measured.
    # A bound of 1e-4 of the scale leaves room for that, while a wrong position, mask or slot moves logits
    # far more (5% off in the rotary frequencies alone moves them by 0.2 of the scale, with sharpened
    # attention).
    assert ours.shape == expected.shape
    error = (ours - expected).abs().max().item()
    assert error <= 1e-4 * expected.abs().max().item(), f"max abs diff {error}"


def random_tokens(count: int, seed: int) -> list[int]:
    return torch.randint(0, 49152, (count,), generator=torch.Generator().manual_seed(seed)).tolist()


def run(model: TrellisModel, cache, tokens: list[int], positions: list[int], slots: list[int],
        logits_for: list[int] | None = None) -> torch.Tensor:
    as_tensor = lambda values: torch.tensor(values, dtype=torch.int64)  # noqa: E731
    with torch.inference_mode():
        return model(as_tensor(tokens), as_tensor(positions), as_tensor(slots), cache,
                     None if logits_for is None else as_tensor(logits_for))


def test_prefill_matches_transformers(model: TrellisModel, reference) -> None:
    tokens = random_tokens(24, seed=1)
    expected = reference_logits(reference, tokens)
    cache = model.new_cache(max_slots=2, max_seq_len=32)
    slot = cache.allocate()
    assert_close(run(model, cache, tokens, list(range(24)), [slot] * 24), expected)
    last = run(model, cache, tokens, list(range(24)), [slot] * 24, logits_for=[23])
    assert_close(last, expected[-1:])


def test_decode_through_cache_matches_transformers(model: TrellisModel, reference) -> None:
    tokens = random_tokens(20, seed=2)
    expected = reference_logits(reference, tokens)
    cache = model.new_cache(max_slots=1, max_seq_len=20)
    slot = cache.allocate()
    prompt = 6
    logits = run(model, cache, tokens[:prompt], list(range(prompt)), [slot] * prompt,
                 logits_for=[prompt - 1])
    assert_close(logits, expected[prompt - 1:prompt])
    for position in range(prompt, len(tokens)):
        logits = run(model, cache, [tokens[position]], [position], [slot])
        assert_close(logits, expected[position:position + 1])


@pytest.mark.parametrize("consecutive_slots", [True, False])
def test_sequences_interleaved_in_one_forward(model: TrellisModel, reference,
                                              consecutive_slots: bool) -> None:
    """Three sequences of different lengths: one mixed prefill with their tokens interleaved, then
    decode steps that run all three in one forward, in shuffled order."""
    lengths, decode_steps = (5, 9, 13), 3
    sequences = [random_tokens(n + decode_steps, seed=10 + n) for n in lengths]
    expected = [reference_logits(reference, tokens) for tokens in sequences]
    cache = model.new_cache(max_slots=4, max_seq_len=16)
    slots = [cache.allocate() for _ in range(4)]
    if not consecutive_slots:  # slots 0, 2, 3: the model gathers them instead of viewing a range
        cache.free(slots.pop(1))

    order = [(s, p) for p in range(max(lengths)) for s in range(3) if p < lengths[s]]  # round robin
    logits = run(model, cache, [sequences[s][p] for s, p in order], [p for _, p in order],
                 [slots[s] for s, _ in order])
    for row, (s, p) in enumerate(order):
        assert_close(logits[row:row + 1], expected[s][p:p + 1])

    for step in range(decode_steps):
        batch = [2, 0, 1] if step % 2 else [0, 1, 2]
        positions = [lengths[s] + step for s in batch]
        logits = run(model, cache, [sequences[s][p] for s, p in zip(batch, positions)], positions,
                     [slots[s] for s in batch])
        for row, (s, p) in enumerate(zip(batch, positions)):
            assert_close(logits[row:row + 1], expected[s][p:p + 1])


def test_untied_lm_head(checkpoint: Checkpoint) -> None:
    lm_head = torch.randn(checkpoint.shape.vocab, checkpoint.shape.hidden,
                          generator=torch.Generator().manual_seed(3)).to(torch.bfloat16) * 0.05
    untied = dataclasses.replace(checkpoint, config={**checkpoint.config, "tie_word_embeddings": False},
                                 dense={**checkpoint.dense, "lm_head.weight": lm_head})
    model = TrellisModel.from_checkpoint(untied)
    assert model.lm_head.data_ptr() != model.embed_tokens.data_ptr()
    tokens = random_tokens(10, seed=4)
    cache = model.new_cache(max_slots=1, max_seq_len=10)
    logits = run(model, cache, tokens, list(range(10)), [cache.allocate()] * 10)
    assert_close(logits, reference_logits(dense_model_from_checkpoint(untied), tokens))


ROPE_SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0},
    "llama3": LLAMA3_ROPE,
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    "longrope": {"rope_type": "longrope", "original_max_position_embeddings": 32,
                 "short_factor": [1.0 + i / 16 for i in range(8)],
                 "long_factor": [2.0 + i / 4 for i in range(8)]},
}


@pytest.mark.parametrize("rope_type", list(ROPE_SCALINGS))
def test_rope_scalings_match_transformers(checkpoint: Checkpoint, rope_type: str) -> None:
    """Every scaling type, over a prompt longer than the original context (where dynamic NTK and
    longrope change their frequencies), and through the cache within it."""
    scaling = {**ROPE_SCALINGS[rope_type], "rope_theta": 10000.0}
    scaled = dataclasses.replace(checkpoint, config={**checkpoint.config, "max_position_embeddings": 32,
                                                     "rope_parameters": scaling})
    model = TrellisModel.from_checkpoint(scaled)
    reference = dense_model_from_checkpoint(scaled)
    tokens = random_tokens(40, seed=5)
    cache = model.new_cache(max_slots=2, max_seq_len=40)
    logits = run(model, cache, tokens, list(range(40)), [cache.allocate()] * 40)
    assert_close(logits, reference_logits(reference, tokens))
    short = tokens[:24]
    slot = cache.allocate()
    run(model, cache, short[:8], list(range(8)), [slot] * 8)
    for position in range(8, 24):
        logits = run(model, cache, [short[position]], [position], [slot])
        assert_close(logits, reference_logits(reference, short[:position + 1])[-1:])


def test_legacy_rope_scaling_spelling(checkpoint: Checkpoint) -> None:
    """Configs written before transformers 5 spell the type `type` under `rope_scaling`, with the
    theta at the top level: the same model."""
    legacy = {"type": "llama3", **{k: v for k, v in LLAMA3_ROPE.items() if k != "rope_type"}}
    configs = [{**checkpoint.config, "rope_parameters": {**LLAMA3_ROPE, "rope_theta": 10000.0}},
               {**{k: v for k, v in checkpoint.config.items() if k != "rope_parameters"},
                "rope_theta": 10000.0, "rope_scaling": legacy}]
    tokens = random_tokens(40, seed=6)
    outputs = []
    for config in configs:
        model = TrellisModel.from_checkpoint(dataclasses.replace(checkpoint, config=config))
        cache = model.new_cache(max_slots=1, max_seq_len=40)
        outputs.append(run(model, cache, tokens, list(range(40)), [cache.allocate()] * 40))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)


def test_unsupported_rope_refused(checkpoint: Checkpoint) -> None:
    proportional = {"rope_type": "proportional", "rope_theta": 10000.0, "factor": 4.0}
    with pytest.raises(SourceError, match="rope type 'proportional' is not supported.*default, linear"):
        TrellisModel.from_checkpoint(
            dataclasses.replace(checkpoint, config={**checkpoint.config, "rope_parameters": proportional}))


def test_forward_refuses_bad_slots_and_positions(model: TrellisModel) -> None:
    cache = model.new_cache(max_slots=2, max_seq_len=8)
    slot = cache.allocate()
    with pytest.raises(ValueError, match="not allocated"):
        run(model, cache, [1], [0], [slot + 1])
    with pytest.raises(ValueError, match="positions must lie in"):
        run(model, cache, [1], [8], [slot])


def test_load_model_logs_decoded_memory(tiny_checkpoint_dir: Path,
                                        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="trellis_runtime"):
        model, tokenizer = load_model(tiny_checkpoint_dir, "cpu")
    weights = 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 192 * 64)  # layers x (q, o; k, v; gate, up, down)
    assert f"14 quantized linears decoded for cpu: {weights * 4 / 2**20:.1f} MiB" in caplog.text
    assert tokenizer("hello")["input_ids"]
    assert model.dtype == torch.float32
    # The bf16 embeddings are kept as stored where the CPU kernel multiplies by them, else widened.
    assert model.embed_tokens.dtype == (torch.bfloat16 if cpu_kernels_loaded() else torch.float32)
