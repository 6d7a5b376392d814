"""End-to-end fine-tuning with frozen codes on the tiny model: the student, the run, format 2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qat.distill import dense_student
from qat.finetune import FinetuneOptions, finetune
from qat.finetune_model import embedding_modules, make_tuned
from qat.frozen_codes import FrozenCodesLinear
from trellis_runtime.bitstream import unpack_states
from trellis_runtime.checkpoint import WEIGHTS_FILE, load_checkpoint
from trellis_runtime.codes import code_values
from trellis_runtime.errors import CheckpointError
from trellis_runtime.quantized import tiles_to_matrix


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from qat.text import evaluation_text

    path = tmp_path_factory.mktemp("text") / "calib.txt"
    path.write_text(evaluation_text(None)[:60_000])
    return path


def small_options(calib_file: Path, **overrides) -> FinetuneOptions:
    values = dict(steps=4, lr=3e-2, calib_text=str(calib_file), ctx=64, eval_every=2,
                  validation_tokens=1024)
    values.update(overrides)
    return FinetuneOptions(**values)


@pytest.fixture(scope="module")
def tuned_dir(hyb_checkpoint_dir: Path, calib_file: Path, tmp_path_factory: pytest.TempPathFactory
              ) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("finetune") / "tuned"
    return out, finetune(hyb_checkpoint_dir, out, small_options(calib_file, train_table=True,
                                                            train_embeddings=True))


def test_a_trained_table_gets_the_gradient_of_the_per_weight_decode(hyb_checkpoint_dir: Path):
    """Tiles gathered from every state's values: the table's gradient equals the float64 one of
    decoding each weight from its own state (the checkpoint's decode)."""
    weight = next(iter(load_checkpoint(hyb_checkpoint_dir).quantized.values()))
    linear = FrozenCodesLinear(weight, torch.nn.Parameter(torch.ones(weight.shape[1])),
                               train_table=True)
    upstream = torch.randn(weight.shape, generator=torch.Generator().manual_seed(0))
    (linear.rotated_tiles() * upstream).sum().backward()
    table = weight.table.double().requires_grad_()
    values = code_values(weight.spec, unpack_states(weight.codes, weight.spec), table)
    reference = tiles_to_matrix(values.flatten(2)) * weight.scale.double()
    (reference * upstream.double()).sum().backward()
    torch.testing.assert_close(linear.rotated_tiles().double(), reference, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(linear.table.grad.double(), table.grad, rtol=1e-5, atol=1e-5)


def test_the_untrained_student_computes_the_dequantized_model(hyb_checkpoint_dir: Path):
    """Before any step, frozen-codes linears (activations rotated, as the runtime does) give the
    logits of the dense dequantized model."""
    checkpoint = load_checkpoint(hyb_checkpoint_dir)
    dense = dense_student(checkpoint, "cpu").double()
    student = dense_student(checkpoint, "cpu")
    tuned = make_tuned(student, checkpoint, train_table=True)
    student.double()
    ids = torch.arange(40)[None] * 7
    assert len(tuned) == len(checkpoint.quantized)
    expected = dense(ids).logits
    # Both hold float32 decodings of the same codes, multiplied in float64: only float32 rounding
    # of the weights differs (~1e-7 of the logit scale), where a wrong vector or rotation moves
    # logits by a sizeable part of it.
    error = (student(ids).logits - expected).abs().max().item()
    assert error <= 1e-5 * expected.abs().max().item()
    first = tuned["model.layers.0.self_attn.q_proj"].input_vector
    assert tuned["model.layers.0.self_attn.v_proj"].input_vector is first  # one per input group
    assert tuned["model.layers.0.self_attn.o_proj"].input_vector is not first
    tied = checkpoint.shape.tied_embeddings
    assert list(embedding_modules(student)) == (
        ["model.embed_tokens"] if tied else ["model.embed_tokens", "lm_head"])


def test_finetuning_writes_a_format_2_checkpoint_the_runtime_serves(
        hyb_checkpoint_dir: Path, tuned_dir: tuple[Path, dict]):
    out, summary = tuned_dir
    tuned, ptq = load_checkpoint(out), load_checkpoint(hyb_checkpoint_dir)
    assert ptq.trellis["format_version"] == 1 and tuned.trellis["format_version"] == 2
    assert summary["validation_ppl"]["best"] <= summary["validation_ppl"]["start"]
    changed_vectors = changed_tables = 0
    for name, weight in tuned.quantized.items():
        before = ptq.quantized[name]
        assert torch.equal(weight.codes, before.codes), name  # codes frozen
        assert weight.input_signs.dtype == torch.float16
        changed_vectors += not torch.equal(weight.output_signs.float(), before.output_signs.float())
        changed_tables += not torch.equal(weight.table, before.table)
    assert changed_vectors and changed_tables
    assert not torch.equal(tuned.dense["model.norm.weight"], ptq.dense["model.norm.weight"])
    embedding = "model.embed_tokens.weight"
    assert not torch.equal(tuned.dense[embedding], ptq.dense[embedding])
    assert tuned.dense.keys() == ptq.dense.keys()  # a tied head stays tied: one matrix
    lines = [json.loads(x) for x in (out / "finetune_record.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [0, 1, 2, 3, 4]

    # The runtime reads the real vectors: its prefill and decode steps give the logits of the
    # dequantized fine-tuned model.
    from qat.sources import dense_model_from_checkpoint
    from test_model import assert_close, random_tokens, reference_logits, run
    from trellis_runtime.model import load_model

    model, _ = load_model(out, "cpu")
    tokens = random_tokens(12, seed=3)
    expected = reference_logits(dense_model_from_checkpoint(tuned), tokens)
    cache = model.new_cache(max_slots=1, max_seq_len=16)
    slot = cache.allocate()
    assert_close(run(model, cache, tokens[:8], list(range(8)), [slot] * 8), expected[:8])
    for position in range(8, 12):
        assert_close(run(model, cache, [tokens[position]], [position], [slot]),
                     expected[position:position + 1])


def _rewrite(source: Path, target: Path, change) -> Path:
    """A copy of checkpoint `source` with its weights passed through `change`."""
    target.mkdir()
    for item in source.iterdir():
        if item.is_file() and item.name != WEIGHTS_FILE:
            (target / item.name).write_bytes(item.read_bytes())
    tensors = load_file(str(source / WEIGHTS_FILE))
    change(tensors)
    save_file(tensors, str(target / WEIGHTS_FILE))
    return target


def test_loading_checks_the_vectors_of_each_format(hyb_checkpoint_dir: Path,
                                                    tuned_dir: tuple[Path, dict], tmp_path: Path):
    out, _ = tuned_dir
    name = "model.layers.1.mlp.down_proj.output_signs"

    def to_half(tensors):
        tensors[name] = tensors[name].to(torch.float16)

    def poison(tensors):
        tensors[name][3] = float("nan")

    def not_a_sign(tensors):
        tensors[name][3] = 2

    with pytest.raises(CheckpointError, match=f"'{name}' is torch.float16 .* expected torch.int8"):
        load_checkpoint(_rewrite(hyb_checkpoint_dir, tmp_path / "half-in-v1", to_half))
    with pytest.raises(CheckpointError, match=f"'{name}' holds NaN"):
        load_checkpoint(_rewrite(out, tmp_path / "nan", poison))
    with pytest.raises(CheckpointError, match=f"'{name}' holds values other than"):
        load_checkpoint(_rewrite(hyb_checkpoint_dir, tmp_path / "two", not_a_sign))


def _recipe_command(checkpoint: Path, out: Path, calib: Path) -> list[str]:
    """Both stages, small: BCJR-QAT of layer 0 for 4 steps, then 6 fine-tuning steps."""
    return [sys.executable, "-m", "trellis_cli", "qat", str(checkpoint), "--out", str(out),
            "--stages", "bcjr,finetune", "--layers", "0", "--steps", "4", "--eval-every", "2", "--lr", "0.1", "--ctx", "64",
            "--finetune-steps", "6", "--finetune-ctx", "64", "--finetune-lr", "0.03",
            "--calib-text", str(calib)]


@pytest.fixture(scope="module")
def recipe_dir(hyb_checkpoint_dir: Path, calib_file: Path,
               tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("recipe") / "straight"
    subprocess.run(_recipe_command(hyb_checkpoint_dir, out, calib_file), check=True,
                   capture_output=True, timeout=900)
    return out


def test_the_recipe_trains_codes_then_the_rest(hyb_checkpoint_dir: Path, recipe_dir: Path):
    trained, ptq = load_checkpoint(recipe_dir), load_checkpoint(hyb_checkpoint_dir)
    assert trained.trellis["format_version"] == 2
    assert trained.trellis["qat"]["layers"] == [0] and trained.trellis["finetune"]["steps"] == 6
    # Codes move only in the layer BCJR-QAT trained (whether its best snapshot beat PTQ's is the
    # validation text's call); fine-tuning changed vectors and norms around them.
    assert all(torch.equal(trained.quantized[n].codes, ptq.quantized[n].codes)
               for n in ptq.quantized if not n.startswith("model.layers.0."))
    assert any(w.output_signs.dtype == torch.float16 for w in trained.quantized.values())
    for name in ("qat_record.jsonl", "finetune_record.jsonl", "finetune_summary.json"):
        assert (recipe_dir / name).is_file(), name
    assert not (recipe_dir.parent / ".straight.partial").exists()


@pytest.mark.parametrize("stage,record", [("bcjr", ".bcjr.partial/record.jsonl"),
                                          ("finetune", ".finetune.partial/finetune_record.jsonl")])
def test_a_recipe_killed_in_each_stage_resumes_to_the_same_result(
        hyb_checkpoint_dir: Path, calib_file: Path, recipe_dir: Path, tmp_path: Path,
        stage: str, record: str):
    out = tmp_path / "resumed"
    command = _recipe_command(hyb_checkpoint_dir, out, calib_file)
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lines = tmp_path / ".resumed.partial" / record
    deadline = time.time() + 600
    while time.time() < deadline:  # kill it after the stage's snapshot of step 2 is written
        if lines.is_file() and any(json.loads(x)["step"] >= 3 for x in lines.read_text().splitlines()):
            break
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not out.exists()
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    assert "resuming" in result.stdout
    a, b = load_checkpoint(recipe_dir), load_checkpoint(out)
    for name, weight in a.quantized.items():
        other = b.quantized[name]
        assert torch.equal(weight.codes, other.codes), name
        assert torch.equal(weight.input_signs, other.input_signs), name
        assert torch.equal(weight.output_signs, other.output_signs), name
        assert torch.equal(weight.table, other.table), name  # hyb: fine-tuning trains it
        assert torch.equal(weight.scale, other.scale), name
    for name, tensor in a.dense.items():
        assert torch.equal(tensor, b.dense[name]), name
