"""`trellis quantize --ray` through the real command on a local Ray cluster: the checkpoint is the
single-process one byte for byte, also when a task's worker is killed mid-run and Ray runs it again."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from processes import pids_titled
from test_quantize_cli import CALIB_TEXT, assert_one_line_error, trellis

FAST = ["--state-bits", "8", "--calib-windows", "4", "--layers-per-group", "1"]
# Ray's process title of a worker running a quantization task.
TASK_TITLE = "ray::quantize_group"


def same_files(first: Path, second: Path) -> None:
    names = sorted(path.name for path in first.iterdir())
    assert names == sorted(path.name for path in second.iterdir())
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text") / "calib.txt"
    path.write_text(CALIB_TEXT)
    return path


def test_ray_tasks_write_the_same_checkpoint(tiny_model_dir: Path, calib_file: Path,
                                             tmp_path: Path) -> None:
    args = [str(tiny_model_dir), "--calib-text", str(calib_file), *FAST]
    alone = trellis("quantize", *args, "--out", str(tmp_path / "alone"))
    assert alone.returncode == 0, alone.stderr
    on_ray = trellis("quantize", *args, "--out", str(tmp_path / "ray"), "--ray")
    assert on_ray.returncode == 0, on_ray.stderr
    same_files(tmp_path / "alone", tmp_path / "ray")


@pytest.fixture(scope="module")
def wider_model_dir(tmp_path_factory: pytest.TempPathFactory, builtin_tokenizer_dir: Path
                    ) -> Path:
    """Four layers wide enough that quantizing one takes seconds: time to kill its task."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=49152, hidden_size=256, intermediate_size=768,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=True)
    torch.manual_seed(1)
    directory = tmp_path_factory.mktemp("wider-llama")
    LlamaForCausalLM(config).eval().save_pretrained(str(directory), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(builtin_tokenizer_dir)).save_pretrained(str(directory))
    return directory


def running_task() -> int | None:
    """The pid of a worker running a quantization task, if one is running now."""
    return min(pids_titled(TASK_TITLE), default=None)


def test_a_killed_task_is_run_again_to_the_same_result(wider_model_dir: Path, calib_file: Path,
                                                       tmp_path: Path) -> None:
    args = [str(wider_model_dir), "--calib-text", str(calib_file), "--no-hessian",
            "--layers-per-group", "1"]
    process = subprocess.Popen(
        [sys.executable, "-m", "trellis_cli", "quantize", *args, "--out", str(tmp_path / "ray"),
         "--ray"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "TQDM_DISABLE": "1"})
    killed = None
    deadline = time.monotonic() + 300
    while killed is None and process.poll() is None and time.monotonic() < deadline:
        pid = running_task()
        if pid is not None:
            os.kill(pid, 9)
            killed = pid
        time.sleep(0.02)
    _, stderr = process.communicate(timeout=600)
    assert killed is not None, "no task was seen running"
    assert process.returncode == 0, stderr
    alone = trellis("quantize", *args, "--out", str(tmp_path / "alone"))
    assert alone.returncode == 0, alone.stderr
    same_files(tmp_path / "alone", tmp_path / "ray")


def test_ray_flags_need_ray(tiny_model_dir: Path, tmp_path: Path) -> None:
    result = trellis("quantize", str(tiny_model_dir), "--out", str(tmp_path / "out"),
                     "--ray-address", "auto")
    assert_one_line_error(result, "need --ray")
    assert not (tmp_path / "out").exists()
