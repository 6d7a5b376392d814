"""Decode steps through DecodeGraphs equal the model's ordinary forward.

On a CPU the static step runs eagerly (no graph): its padding, context buckets and device-built mask
are checked here; on CUDA the captured graphs are replayed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trellis_cli.kernel_suite import CASES
from trellis_runtime.checkpoint import load_checkpoint
from trellis_runtime.cuda_graphs import DecodeGraphs, buckets
from trellis_runtime.model import TrellisModel

GRAPH_CASES = [c for c in CASES if c.kernel == "cuda_graphs"]


def _prefilled(device: str, tiny_checkpoint_dir: Path):
    """The tiny model and a cache holding three prompts in slots 1, 3 and 4 (one past 128)."""
    model = TrellisModel.from_checkpoint(load_checkpoint(tiny_checkpoint_dir), device)
    cache = model.new_cache(max_slots=6, max_seq_len=200)
    gen = torch.Generator().manual_seed(0)
    lengths = {}
    for slot, length in ((1, 5), (3, 140), (4, 9)):
        while cache.allocate() != slot:
            pass
        tokens = torch.randint(0, 1000, (length,), generator=gen).to(device)
        positions = torch.arange(length, device=device)
        model(tokens, positions, torch.full((length,), slot, device=device), cache)
        lengths[slot] = length
    return model, cache, lengths


def test_buckets() -> None:
    assert buckets(8) == [1, 2, 4, 8]
    assert buckets(6) == [1, 2, 4, 6]
    assert buckets(200, 128) == [128, 200]
    assert buckets(100, 100) == [100]


def _check_steps(device: str, tiny_checkpoint_dir: Path, in_place_attention: bool | None = None
                 ) -> None:
    model, cache, lengths = _prefilled(device, tiny_checkpoint_dir)
    graphs = DecodeGraphs(model, cache, max_batch=6, in_place_attention=in_place_attention)
    for step in range(2):  # the second step replays the same buckets with new inputs
        slots = [3, 1, 4]  # three sequences: padded to the bucket of 4
        tokens = [17 + step, 2, 999]
        positions = [lengths[s] + step for s in slots]
        got = graphs.run(tokens, positions, slots).clone()
        expected = model(*(torch.tensor(v, device=device) for v in (tokens, positions, slots)),
                         cache)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        one = graphs.run(tokens[1:2], positions[1:2], slots[1:2])  # batch 1, context 128
        torch.testing.assert_close(one, expected[1:2], rtol=1e-4, atol=1e-4)
    # Reading the cache in place, one context bucket (the whole cache) serves every step.
    assert set(graphs._steps) == ({(4, 200), (1, 200)} if graphs.in_place_attention
                                  else {(4, 200), (1, 128)})


def test_static_steps_equal_the_forward_on_cpu(tiny_checkpoint_dir: Path) -> None:
    _check_steps("cpu", tiny_checkpoint_dir)


def test_static_steps_reading_the_cache_in_place_equal_the_forward(tiny_checkpoint_dir: Path
                                                                    ) -> None:
    """The decode-attention kernel (in Triton's interpreter here) in the model's padded steps."""
    _check_steps("cpu", tiny_checkpoint_dir, in_place_attention=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graph_replays_equal_the_forward_on_cuda(tiny_checkpoint_dir: Path) -> None:
    _check_steps("cuda", tiny_checkpoint_dir)


@pytest.mark.parametrize("case", GRAPH_CASES, ids=lambda c: c.name)
def test_suite_case_on_a_random_model(case) -> None:
    """The suite's check (a random 2-layer model): what `trellis bench kernels` reports."""
    assert case.run("cuda" if torch.cuda.is_available() else "cpu") <= case.tolerance


def test_bad_steps_are_refused(tiny_checkpoint_dir: Path) -> None:
    model, cache, lengths = _prefilled("cpu", tiny_checkpoint_dir)
    graphs = DecodeGraphs(model, cache, max_batch=2)
    with pytest.raises(ValueError, match="exceeds max_batch 2"):
        graphs.run([1, 2, 3], [5, 140, 9], [1, 3, 4])
    with pytest.raises(ValueError, match="not allocated"):
        graphs.run([1], [0], [5])
    with pytest.raises(ValueError, match="positions must lie"):
        graphs.run([1], [200], [1])
