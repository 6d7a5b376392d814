"""Decode steps replayed from CUDA graphs: one captured forward per (batch, context) bucket.

A decode step of a quantized model is a thousand-odd small kernel launches (three per linear), so
launching them from Python costs more than running them. A CUDA graph records the launches once and
replays them with one call. Graphs need static shapes and no host synchronisation, so a captured
step differs from the model's ordinary forward in two ways (nano-vllm and gpt-fast do the same):

- the batch is padded up to a bucket (powers of two up to max_batch) by repeating its last token,
  which writes the same key and value to the same cache position and whose logits are dropped;
- attention reads each sequence's cache rows in place, up to its own position (the Triton kernel of
  trellis_kernels/attention.py), where Triton runs; elsewhere it reads a fixed number of cache
  positions, the context bucket (powers of two from 128 up to the cache length) that covers every
  sequence's position, with a mask built on the device instead of AttentionLayout.plan's
  host-side bookkeeping.

Inputs go into the graph's static buffers before each replay in one asynchronous copy from a pinned
host buffer, so the host queues the replay without waiting for the device; the returned logits are
the graph's static output, valid until the next step. On a CPU the same static step runs eagerly (no
graph), which is how the tests check it against the model's ordinary forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trellis_runtime.attention import AttentionLayout
from trellis_runtime.backend_triton import kernels_available
from trellis_runtime.kv_cache import KVCache

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

    inputs: torch.Tensor  # (3, batch) int64 on the device: tokens, positions, slots
    staging: torch.Tensor  # the same on the host, pinned on CUDA: the copy's source
    copied: torch.cuda.Event | None  # when staging was last read (CUDA only)
    graph: torch.cuda.CUDAGraph | None = None
    logits: torch.Tensor | None = None

    @property
    def tokens(self) -> torch.Tensor:
        return self.inputs[0]

    @property
    def positions(self) -> torch.Tensor:
        return self.inputs[1]

    @property
    def slots(self) -> torch.Tensor:
        return self.inputs[2]

    def load(self, rows: list[list[int]]) -> None:
        """Copy the step's inputs in, without blocking the host on CUDA. The staging buffer is
        overwritten only once the device has read its previous contents."""
        if self.copied is not None:
            self.copied.synchronize()
        self.staging.copy_(torch.tensor(rows, dtype=torch.int64))
        self.inputs.copy_(self.staging, non_blocking=self.copied is not None)
        if self.copied is not None:
            self.copied.record()


class DecodeGraphs:
    """Runs decode steps (one new token per sequence) of `model` over `cache`."""

    def __init__(self, model, cache: KVCache, max_batch: int,
                 in_place_attention: bool | None = None) -> None:
        """in_place_attention: read the cache in place with the Triton kernel; by default on CUDA
        where Triton is installed."""
        self.model = model
        self.cache = cache
        self.group = model.shape.heads // model.shape.kv_heads
        self.device = model.embed_tokens.device
        self.batch_buckets = buckets(max_batch)
        self.context_buckets = buckets(cache.max_seq_len, min(MIN_CONTEXT_BUCKET,
                                                               cache.max_seq_len))
        # A rope whose frequencies follow the sequence length reads it back: such a model runs eagerly.
        self.capture = self.device.type == "cuda" and not model.length_dependent_rope
        if in_place_attention is None:
            in_place_attention = self.device.type == "cuda" and kernels_available()
        self.in_place_attention = in_place_attention
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
        # Attention that reads the cache in place stops at each sequence's own position: one
        # bucket (the whole cache) serves every context, so fewer graphs are captured.
        context = (self.context_buckets[-1] if self.in_place_attention
                   else next(c for c in self.context_buckets if c > max(positions)))
        pad = batch - count
        step = self._steps.get((batch, context))
        if step is None:
            step = self._steps[(batch, context)] = self._new_step(batch)
        step.load([values + values[-1:] * pad for values in (tokens, positions, slots)])
        if not self.capture:
            return self._forward(step, context)[:count]
        if step.graph is None:
            self._capture(step, context)
        step.graph.replay()
        return step.logits[:count]

    def _new_step(self, batch: int) -> _Step:
        cuda = self.device.type == "cuda"
        return _Step(inputs=torch.zeros(3, batch, dtype=torch.int64, device=self.device),
                     staging=torch.zeros(3, batch, dtype=torch.int64, pin_memory=cuda),
                     copied=torch.cuda.Event() if cuda else None)

    def _forward(self, step: _Step, context: int) -> torch.Tensor:
        """The model's forward over the static inputs, attending to `context` cache positions."""
        layout = AttentionLayout.padded_decode(step.positions, step.slots, context, self.group,
                                               self.model.shape.windows(), self.cache.keys[0].dtype,
                                               in_place=self.in_place_attention)
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
