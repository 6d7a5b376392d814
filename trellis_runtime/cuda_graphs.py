"""Decode steps replayed from CUDA graphs: one captured forward per (batch, context) bucket.

A decode step of a quantized model is a thousand-odd small kernel launches (three per linear), so
launching them from Python costs more than running them. A CUDA graph records the launches once and
replays them with one call. Graphs need static shapes and no host synchronisation, so a captured
step differs from the model's ordinary forward in two ways (nano-vllm and gpt-fast do the same):

- the batch is padded up to a bucket (powers of two up to max_batch) by repeating its last token,
  which writes the same key and value to the same cache position and whose logits are dropped;
- attention reads a fixed number of cache positions, the context bucket (powers of two from 128 up
  to the cache length) that covers every sequence's position, with a mask built on the device
  instead of AttentionLayout.plan's host-side bookkeeping.

Inputs are copied into the graph's static buffers before each replay; the returned logits are the
graph's static output, valid until the next step. On a CPU the same static step runs eagerly (no
graph), which is how the tests check it against the model's ordinary forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trellis_runtime.kv_cache import KVCache
from trellis_runtime.attention import AttentionLayout

MIN_CONTEXT_BUCKET = 128


def buckets(largest: int, smallest: int = 1) -> list[int]:
    """Powers of two from `smallest` below `largest`, then `largest` itself."""
    sizes = []
    size = smallest
    while size < largest:
        sizes.append(size)
        size *= 2
    return sizes + [largest]


@dataclass
class _Step:
    """Static inputs and, once captured, the graph and its output for one bucket."""

    tokens: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    graph: torch.cuda.CUDAGraph | None = None
    logits: torch.Tensor | None = None


class DecodeGraphs:
    """Runs decode steps (one new token per sequence) of `model` over `cache`."""

    def __init__(self, model, cache: KVCache, max_batch: int) -> None:
        self.model = model
        self.cache = cache
        self.group = model.shape.heads // model.shape.kv_heads
        self.device = model.embed_tokens.device
        self.batch_buckets = buckets(max_batch)
        self.context_buckets = buckets(cache.max_seq_len, min(MIN_CONTEXT_BUCKET,
                                                               cache.max_seq_len))
        # A rope whose frequencies follow the sequence length reads it back: such a model runs eagerly.
        self.capture = self.device.type == "cuda" and not model.length_dependent_rope
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None
        self._steps: dict[tuple[int, int], _Step] = {}

    def run(self, tokens: list[int], positions: list[int], slots: list[int]) -> torch.Tensor:
        """Logits (len(tokens), vocab) of one decode step, as model.forward would compute them."""
        self.cache.check(slots, positions)
        count = len(tokens)
        batch = next((b for b in self.batch_buckets if b >= count), None)
        if batch is None:
            raise ValueError(f"decode step of {count} sequences exceeds max_batch "
                             f"{self.batch_buckets[-1]}")
        context = next(c for c in self.context_buckets if c > max(positions))
        pad = batch - count
        step = self._steps.get((batch, context))
        if step is None:
            step = self._steps[(batch, context)] = _Step(
                *(torch.zeros(batch, dtype=torch.int64, device=self.device) for _ in range(3)))
        for buffer, values in ((step.tokens, tokens), (step.positions, positions),
                               (step.slots, slots)):
            buffer.copy_(torch.tensor(values + values[-1:] * pad, dtype=torch.int64))
        if not self.capture:
            return self._forward(step, context)[:count]
        if step.graph is None:
            self._capture(step, context)
        step.graph.replay()
        return step.logits[:count]

    def _forward(self, step: _Step, context: int) -> torch.Tensor:
        """The model's forward over the static inputs, attending to `context` cache positions."""
        layout = AttentionLayout.padded_decode(step.positions, step.slots, context, self.group,
                                               self.model.shape.windows(), self.cache.keys[0].dtype)
        return self.model(step.tokens, step.positions, step.slots, self.cache, layout=layout)

    def _capture(self, step: _Step, context: int) -> None:
        """Warm up on a side stream (kernels compile, libraries allocate their workspaces), then
        record the step. The warm-up runs are this step's real computation, done twice more."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward(step, context)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            step.logits = self._forward(step, context)
        step.graph = graph
