"""Stop tokens: the checkpoint's generation_config.json, copied from the source by quantize, lists EOS
ids that the engine stops on besides the tokenizer's; the file stays optional."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from trellis_runtime.checkpoint import load_checkpoint
from trellis_runtime.engine import Engine
from trellis_runtime.errors import CheckpointError
from trellis_runtime.generation_config import GENERATION_CONFIG_FILE, stop_token_ids
from trellis_runtime.model import load_model
from trellis_runtime.sampling import SamplingParams

PROMPT = "The capital of France is"


def test_quantize_copies_the_source_generation_config(tiny_model_dir: Path,
                                                      tiny_checkpoint_dir: Path) -> None:
    source = (tiny_model_dir / GENERATION_CONFIG_FILE).read_bytes()
    assert (tiny_checkpoint_dir / GENERATION_CONFIG_FILE).read_bytes() == source


@pytest.fixture
def checkpoint_copy(tiny_checkpoint_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_checkpoint_dir, tmp_path / "tiny"))


def _write_eos(checkpoint: Path, eos) -> None:
    (checkpoint / GENERATION_CONFIG_FILE).write_text(json.dumps({"eos_token_id": eos}))


def test_stop_token_ids_read_an_int_a_list_or_nothing(checkpoint_copy: Path) -> None:
    _, tokenizer = load_model(checkpoint_copy)
    own = tokenizer.eos_token_id
    _write_eos(checkpoint_copy, 7)
    assert stop_token_ids(checkpoint_copy, tokenizer) == sorted({7, own})
    _write_eos(checkpoint_copy, [9, own, 5])
    assert stop_token_ids(checkpoint_copy, tokenizer) == sorted({5, 9, own})
    (checkpoint_copy / GENERATION_CONFIG_FILE).unlink()
    load_checkpoint(checkpoint_copy)  # the file is optional
    assert stop_token_ids(checkpoint_copy, tokenizer) == [own]
    for bad in ("seven", [1, "2"], -1):
        _write_eos(checkpoint_copy, bad)
        with pytest.raises(CheckpointError, match="eos_token_id must be a token id"):
            stop_token_ids(checkpoint_copy, tokenizer)


def test_the_engine_stops_on_every_listed_eos_id(checkpoint_copy: Path) -> None:
    model, tokenizer = load_model(checkpoint_copy)
    prompt = tokenizer(PROMPT)["input_ids"]
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    with Engine(model, tokenizer, max_batch=1) as engine:
        free = engine.generate_text(prompt, greedy).token_ids
    # The first generated token not seen before it becomes the second of two listed EOS ids; the
    # first listed id is one the model never produces here.
    position = next(i for i in range(1, len(free)) if free[i] not in free[:i])
    never = next(i for i in range(tokenizer.vocab_size) if i not in free)
    _write_eos(checkpoint_copy, [never, free[position]])
    params = SamplingParams(temperature=0.0, max_tokens=12)
    with Engine(model, tokenizer, max_batch=1,
                eos_token_ids=stop_token_ids(checkpoint_copy, tokenizer)) as engine:
        stopped = engine.generate_text(prompt, params)
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == free[:position + 1]
