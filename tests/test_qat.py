"""BCJR-QAT end to end on the tiny model: soft linears, drift budget, training, hardening, resume."""

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

from qat.distill import dense_student, kl_to_teacher, load_teacher, make_soft
from qat.drift import budgets, escape_stats, suggested_lr, voronoi_radius
from qat.train import QatOptions, train_qat
from qat.train_setup import parse_layers
from trellis_runtime.bitstream import unpack_states
from trellis_runtime.checkpoint import load_checkpoint
from trellis_runtime.errors import TrellisError
from trellis_runtime.quantized import matrix_to_tiles, tiles_to_matrix

# Relative to each matrix's scale: 4-6 steps of it pass the tiny model's Voronoi radii (~0.2).
LR = 0.1


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from qat.text import evaluation_text

    path = tmp_path_factory.mktemp("text") / "calib.txt"
    path.write_text(evaluation_text(None)[:60_000])
    return path


def small_options(calib_file: Path, **overrides) -> QatOptions:
    values = dict(layers="0", steps=4, lr=LR, calib_text=str(calib_file), ctx=64, eval_every=2,
                  validation_tokens=1024)
    values.update(overrides)
    return QatOptions(**values)


def test_tiles_round_trip():
    matrix = torch.randn(48, 32)
    tiles = matrix_to_tiles(matrix)
    assert tiles.shape == (3, 2, 256)
    assert torch.equal(tiles[1, 0], matrix[16:32, 0:16].reshape(-1))  # row-major inside a tile
    assert torch.equal(tiles_to_matrix(tiles), matrix)


def test_hardening_the_untouched_latent_gives_the_ptq_codes(hyb_checkpoint_dir: Path):
    checkpoint = load_checkpoint(hyb_checkpoint_dir)
    model = dense_student(checkpoint, "cpu")
    soft = make_soft(model, checkpoint, [0, 1], False, False, "cpu")
    for name, module in soft.items():
        assert torch.equal(module.harden().codes, checkpoint.quantized[name].codes), name


def test_soft_weight_tends_to_the_ptq_weight_as_temperature_falls(hyb_checkpoint_dir: Path):
    checkpoint = load_checkpoint(hyb_checkpoint_dir)
    soft = make_soft(dense_student(checkpoint, "cpu"), checkpoint, [0], False, False, "cpu")
    module = soft["model.layers.0.self_attn.q_proj"]
    target = module.ptq.dequantize()
    errors = []
    for temperature in (1.0, 0.1, 0.02):
        module.temperature = temperature
        with torch.no_grad():
            errors.append(float((module.soft_weight() - target).norm() / target.norm()))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-3


def test_voronoi_radius_separates_staying_from_escaping(hyb_checkpoint_dir: Path):
    checkpoint = load_checkpoint(hyb_checkpoint_dir)
    soft = make_soft(dense_student(checkpoint, "cpu"), checkpoint, [0], False, False, "cpu")
    module = soft["model.layers.0.mlp.gate_proj"]
    with torch.no_grad():
        tiles, values = module.unit_tiles(), module.values()
        radius = voronoi_radius(tiles, module.ptq, values, sample_tiles=48)
        assert radius > 0
        reference = unpack_states(module.ptq.codes, module.spec).flatten(0, 1)
        gen = torch.Generator().manual_seed(1)
        from trellis_runtime.viterbi import encode

        def changed_share(size: float) -> float:
            noise = torch.randn(tiles.shape, generator=gen) * size  # radii are in units of the scale
            states = encode(tiles + noise, values, module.spec)
            return float((states != reference).any(dim=1).float().mean())

        assert changed_share(radius / 8) < 0.5 < changed_share(radius * 8)


def test_budget_rules():
    radii = {"a": 1e-3, "b": 4e-3}
    rows = {row.name: row for row in budgets(radii, steps=10, lr=2e-4)}
    assert rows["a"].escapes and not rows["b"].escapes
    assert all(row.escapes for row in budgets(radii, 10, suggested_lr(radii, 10)))


def test_escape_stats_count_changed_tiles(hyb_checkpoint_dir: Path):
    weight = load_checkpoint(hyb_checkpoint_dir).quantized["model.layers.0.mlp.up_proj"]
    assert escape_stats(weight, weight) == {"escape_frac": 0.0, "rel_drift": 0.0}
    codes = weight.codes.clone()
    codes[0, 0, 0] ^= 1 << 7
    changed = type(weight)(weight.spec, codes, weight.input_signs, weight.output_signs,
                           weight.scale, weight.table)
    stats = escape_stats(weight, changed)
    assert stats["escape_frac"] == pytest.approx(1 / (codes.shape[0] * codes.shape[1]))
    assert stats["rel_drift"] > 0


def test_training_through_the_soft_trellis_lowers_the_loss(hyb_checkpoint_dir: Path):
    """Six AdamW steps on one window: the KL to the teacher at a fixed temperature falls."""
    checkpoint = load_checkpoint(hyb_checkpoint_dir)
    teacher, tokenizer = load_teacher(checkpoint, None, "cpu")
    student = dense_student(checkpoint, "cpu")
    soft = make_soft(student, checkpoint, [0], False, False, "cpu")
    window = torch.tensor(tokenizer("The history of the city begins with a small settlement on the "
                                    "river, where traders met to exchange grain and salt.")["input_ids"])[None]
    with torch.no_grad():
        target = teacher(window).logits
    optimizer = torch.optim.AdamW([p for m in soft.values() for p in m.parameters()], lr=1e-3)
    for module in soft.values():
        module.temperature = 0.1
    losses = []
    for _ in range(6):
        loss = kl_to_teacher(student(window).logits, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_parse_layers():
    assert parse_layers("all", 3, "cpu") == [0, 1, 2]
    assert parse_layers("auto", 3, "cuda") == [0, 1, 2]
    assert parse_layers("auto", 3, "cpu") is None
    assert parse_layers("2,0", 3, "cpu") == [0, 2]
    for bad in ("3", "x", ","):
        with pytest.raises(TrellisError):
            parse_layers(bad, 3, "cpu")


def test_qat_writes_a_servable_checkpoint_with_its_record(hyb_checkpoint_dir: Path, calib_file: Path,
                                                         tmp_path: Path):
    out = tmp_path / "qat"
    summary = train_qat(hyb_checkpoint_dir, out, small_options(calib_file))
    assert not (tmp_path / ".qat.partial").exists()
    trained = load_checkpoint(out)
    ptq = load_checkpoint(hyb_checkpoint_dir)
    for name, weight in trained.quantized.items():
        if not name.startswith("model.layers.0."):
            assert torch.equal(weight.codes, ptq.quantized[name].codes), name
    assert trained.trellis["qat"]["layers"] == [0]
    assert summary["validation_ppl"]["best_hardened"] <= summary["validation_ppl"]["ptq"]
    assert set(summary["drift_budget"]["radii"]) == {n for n in ptq.quantized
                                                      if n.startswith("model.layers.0.")}
    lines = [json.loads(x) for x in (out / "qat_record.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [0, 1, 2, 3, 4]
    assert all("kl" in x and "temperature" in x for x in lines[1:])
    assert (out / "qat_record.png").read_bytes()[:4] == b"\x89PNG"
    snapshots = [x for x in lines if x.get("event") == "snapshot"]
    assert [x["step"] for x in snapshots] == [2, 4] and snapshots[-1]["escape_frac"] > 0

    from trellis_runtime.model import load_model

    model, _ = load_model(out, "cpu")  # the runtime serves it unchanged
    assert model is not None


def _qat_command(checkpoint: Path, out: Path, calib: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "trellis_cli", "qat", str(checkpoint), "--out", str(out),
            "--stages", "bcjr", "--layers", "0", "--calib-text", str(calib), "--ctx", "64", *extra]


def test_refuses_what_cannot_be_trained(hyb_checkpoint_dir: Path, tiny_model_dir: Path,
                                        calib_file: Path, tmp_path: Path):
    out = tmp_path / "never"
    for args, message in [
        ((tiny_model_dir, out, calib_file), "not a packed trellis checkpoint"),
        ((hyb_checkpoint_dir, out, calib_file, "--steps", "2", "--lr", "1e-9"), "cannot move any"),
        ((hyb_checkpoint_dir, out, calib_file, "--layers", "5"), "the model has layers 0..1"),
        ((hyb_checkpoint_dir, out, calib_file, "--t-start", "0.05", "--t-end", "0.3"), "--t-end"),
    ]:
        result = subprocess.run(_qat_command(*args), capture_output=True, text=True, timeout=600)
        assert result.returncode == 2, result.stderr
        assert message in result.stderr
        assert len(result.stderr.strip().splitlines()[-1]) < 400
        assert not out.exists() and not (tmp_path / ".never.partial").exists()


def test_an_interrupted_run_resumes_to_the_same_result(hyb_checkpoint_dir: Path, calib_file: Path,
                                                       tmp_path: Path):
    options = ["--steps", "6", "--eval-every", "2", "--lr", str(LR)]
    straight = tmp_path / "straight"
    subprocess.run(_qat_command(hyb_checkpoint_dir, straight, calib_file, *options), check=True,
                   capture_output=True, timeout=600)

    resumed = tmp_path / "resumed"
    process = subprocess.Popen(_qat_command(hyb_checkpoint_dir, resumed, calib_file, *options),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    record = tmp_path / ".resumed.partial" / "record.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:  # kill it after the snapshot of step 2 is written
        if record.is_file() and any(json.loads(x)["step"] >= 3 for x in record.read_text().splitlines()):
            break
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not resumed.exists()
    result = subprocess.run(_qat_command(hyb_checkpoint_dir, resumed, calib_file, *options),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "resuming" in result.stdout
    a, b = load_checkpoint(straight), load_checkpoint(resumed)
    for name in a.quantized:
        assert torch.equal(a.quantized[name].codes, b.quantized[name].codes), name
    steps = [json.loads(x)["step"] for x in (resumed / "qat_record.jsonl").read_text().splitlines()]
    assert steps == list(range(7))


def test_qat_trains_a_biased_family_and_keeps_its_biases(builtin_tokenizer_dir: Path, calib_file: Path,
                                                         tmp_path: Path):
    """Qwen2 (q/k/v biases): the trained checkpoint keeps the PTQ biases, and the runtime serves it
    computing what the trained student computes."""
    from conftest import pack_tiny_model
    from qat.sources import dense_model_from_checkpoint
    from test_architectures import FAMILIES, random_source_model
    from trellis_runtime.model import TrellisModel

    model_type, extra = FAMILIES["qwen2"]
    source = random_source_model(model_type, extra, tmp_path / "source", builtin_tokenizer_dir)
    ptq_dir = pack_tiny_model(source, tmp_path / "ptq", "hyb")
    out = tmp_path / "qat"
    train_qat(ptq_dir, out, small_options(calib_file))
    trained, ptq = load_checkpoint(out), load_checkpoint(ptq_dir)
    biases = [name for name in ptq.dense if name.endswith(".bias")]
    assert biases and all(torch.equal(trained.dense[name], ptq.dense[name]) for name in biases)
    tokens = torch.arange(100, 120)
    model = TrellisModel.from_checkpoint(trained)
    cache = model.new_cache(max_slots=1, max_seq_len=20)
    with torch.inference_mode():
        ours = model(tokens, torch.arange(20), torch.full((20,), cache.allocate()), cache)
        expected = dense_model_from_checkpoint(trained)(tokens[None]).logits[0]
    assert (ours - expected).abs().max() <= 1e-4 * expected.abs().max()
