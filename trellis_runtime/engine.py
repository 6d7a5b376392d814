"""The generation engine: one loop in a background thread serving every request, batched continuously.

Each step is one model forward over a flat token list (the model is varlen): one token for every
sequence that is decoding, plus a chunk of at most one prompt being prefilled. Requests join the batch
between steps (a free KV slot and the prefill turn are all they need) and leave it the step they finish,
so a long generation never holds back a short one. Chunking the prefill bounds how long any step takes,
so running streams keep flowing while a long prompt is read (vLLM's chunked prefill, on nano-vllm's
simpler footing: at most one prompt in flight, one KV slot per sequence).

Who does what: the scheduler (trellis_runtime/scheduler.py) decides which sequences run and which
tokens each feeds; the runner (trellis_runtime/runner.py) turns that plan into one forward, samples and
scores; a request's Outputs are made in trellis_runtime/outputs.py. This module keeps the thread and
the asyncio bridge: requests go in, Outputs come back.

Logprobs cost nothing unless a request asks: then its sampled rows also get a log_softmax and a topk
(trellis_runtime.logprobs), and a prompt it wants scored gets logits for every position of its prefill
chunks instead of the last one only. max_tokens=0 scores a prompt and finishes without sampling.

Threads: callers (an asyncio server, or the blocking CLI helper) hand requests over under a Condition
and receive outputs through a per-request callback; for asyncio that callback is
`loop.call_soon_threadsafe(queue.put_nowait, ...)`. When there is nothing to do the loop sleeps on the
Condition. A consumer that stops listening (aclose, task cancellation after a client disconnect) flags
its request; the loop drops it and frees its slot at the start of the next step.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from typing import AsyncIterator, Callable, Sequence

import torch

from trellis_runtime.detokenize import TextStream
from trellis_runtime.errors import TrellisError
from trellis_runtime.kv_cache import KVCache
from trellis_runtime.openmp import release_workers
from trellis_runtime.outputs import Output, OutputAccumulator, Request
from trellis_runtime.runner import ModelRunner
from trellis_runtime.sampling import SamplingParams
from trellis_runtime.scheduler import (DEFAULT_MAX_BATCH, DEFAULT_MAX_SEQ_LEN,  # noqa: F401 (API)
                                       DEFAULT_PREFILL_CHUNK, Scheduler, StepPlan)

logger = logging.getLogger("trellis_runtime")



class ContextLengthError(TrellisError, ValueError):
    """The prompt, or the prompt plus max_tokens, does not fit the engine's context."""


class EngineError(RuntimeError):
    """Generation failed inside the engine (a failed forward, or a shutdown), not because of the input."""


class Engine:
    def __init__(self, model, tokenizer, max_batch: int = DEFAULT_MAX_BATCH, max_seq_len: int | None = None,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                 eos_token_ids: Sequence[int] | None = None) -> None:
        """model: a TrellisModel (or anything with its forward and new_cache); tokenizer: its HF tokenizer.

        max_batch sequences run at once, each in its own KV slot of max_seq_len positions (prompt plus
        output). eos_token_ids defaults to the tokenizer's EOS token.
        """
        if max_batch < 1 or prefill_chunk < 1:
            raise ValueError("max_batch and prefill_chunk must be at least 1")
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        # Without a choice, the model's own context, capped so the pre-allocated KV cache stays small.
        self.max_seq_len = max_seq_len or min(model.shape.max_positions, DEFAULT_MAX_SEQ_LEN)
        self.prefill_chunk = prefill_chunk
        if eos_token_ids is None:
            eos_token_ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
        self.eos_token_ids = frozenset(eos_token_ids)
        self.device = model.embed_tokens.device
        self.vocab_size = model.shape.vocab
        self.cache: KVCache = model.new_cache(max_batch, self.max_seq_len)
        self._runner = ModelRunner(model, self.cache, max_batch)
        self._scheduler = Scheduler(self.cache, max_batch, prefill_chunk)
        self._cond = threading.Condition()  # guards the scheduler's waiting queue and aborted flags
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._decode_steps = 0
        self._max_batch_seen = 0
        self._step_started: float | None = None  # monotonic start of the step running now

    @property
    def model(self):
        """The model the steps run (assignable: tests swap in one that fails)."""
        return self._runner.model

    @model.setter
    def model(self, model) -> None:
        self._runner.model = model

    # Lifecycle -----------------------------------------------------------------------------------

    def start(self) -> "Engine":
        if self._thread is None:
            self._stopping = False
            if self.device.type == "cpu":
                # The steps' parallel regions open on the engine's thread: this thread's OpenMP
                # workers, left from loading the model, would slow every one (trellis_runtime/openmp.py).
                release_workers()
            self._thread = threading.Thread(target=self._run, name="trellis-engine", daemon=True)
            self._thread.start()
        return self

    def shutdown(self) -> None:
        """Stop the loop; requests still waiting or running fail with EngineError."""
        if self._thread is None:
            return
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join()
        self._thread = None

    @property
    def alive(self) -> bool:
        """Whether the loop thread is running and accepting requests: what a health check probes."""
        thread = self._thread
        return thread is not None and thread.is_alive() and not self._stopping

    @property
    def step_running_for(self) -> float:
        """Seconds the step running now has taken so far (0 between steps): a loop stuck in a
        forward is alive but serves nobody, and a health check can tell."""
        started = self._step_started
        return 0.0 if started is None else time.monotonic() - started

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.shutdown()

    # Requests ------------------------------------------------------------------------------------

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams,
                 request_id: str | None = None) -> AsyncIterator[Output]:
        """Stream a request's Outputs: `async for out in engine.generate(ids, params)`.

        Input errors (ContextLengthError, ValueError) and a stopped engine (EngineError) raise here, at the
        call, so a server can answer 400 before it starts a stream. The request is queued when iteration
        starts; leaving the iteration early (aclose, cancellation) aborts it and frees its slot.
        """
        self._check(prompt_ids, params)
        return self._stream(list(prompt_ids), params, request_id)

    async def _stream(self, prompt_ids: list[int], params: SamplingParams,
                      request_id: str | None) -> AsyncIterator[Output]:
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[Output | BaseException] = asyncio.Queue()
        request = self._submit(prompt_ids, params, request_id,
                               lambda item: loop.call_soon_threadsafe(outputs.put_nowait, item))
        try:
            while True:
                item = await outputs.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            self._abort(request)

    def generate_text(self, prompt_ids: Sequence[int], params: SamplingParams,
                      request_id: str | None = None) -> Output:
        """Blocking: run one request to the end and return all of it as a single Output."""
        self._check(prompt_ids, params)
        outputs: queue.SimpleQueue[Output | BaseException] = queue.SimpleQueue()
        request = self._submit(list(prompt_ids), params, request_id, outputs.put)
        whole = OutputAccumulator()
        try:
            while whole.finish_reason is None:
                item = outputs.get()
                if isinstance(item, BaseException):
                    raise item
                whole.add(item)
            return whole.output()
        finally:
            self._abort(request)

    def stats(self) -> dict:
        """A snapshot for metrics and tests; max_batch_seen is the most sequences one decode step ran."""
        with self._cond:
            usage = self.cache.usage()
            return {
                "running": len(self._scheduler.active()),
                "waiting": len(self._scheduler.waiting),
                "kv_cache_usage": usage.slots_used / usage.slots_total,
                "decode_steps": self._decode_steps,
                "max_batch_seen": self._max_batch_seen,
            }

    def _check(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        params.validate()
        if self._thread is None:
            raise EngineError("the engine is not running: call start() first")
        check_prompt(prompt_ids, params, self.vocab_size, self.max_seq_len)

    def _submit(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None,
                emit: Callable[[Output | BaseException], None]) -> Request:
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_token_ids)
        request = Request(request_id=request_id or uuid.uuid4().hex, prompt_ids=prompt_ids,
                          params=params, generator=params.make_generator(self.device),
                          stop_ids=frozenset(stop_ids),
                          stream=TextStream(self.tokenizer, prompt_ids, params.stop), emit=emit)
        with self._cond:
            if self._thread is None or self._stopping:
                raise EngineError("the engine is shutting down")
            self._scheduler.add(request)
            self._cond.notify()
        return request

    def _abort(self, request: Request) -> None:
        if not request.finished:
            with self._cond:
                request.aborted = True
                self._cond.notify()

    # The loop ------------------------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while self._scheduler.idle and not self._stopping:
                        self._cond.wait()
                    if self._stopping:
                        break
                    # Requests whose consumer left free their slots before the step runs.
                    for request in self._scheduler.drop_aborted():
                        logger.info("request %s aborted after %d tokens", request.request_id,
                                    len(request.output_ids))
                    self._scheduler.admit()
                plan = self._scheduler.plan()
                if plan is None:
                    continue
                self._step_started = time.monotonic()
                try:
                    self._step(plan)
                except Exception as error:  # a failed forward: fail its requests, keep serving others
                    logger.exception("generation step failed")
                    self._fail(self._scheduler.active(), error)
                finally:
                    self._step_started = None
        with self._cond:
            stranded = self._scheduler.take_waiting()
        self._fail(stranded + self._scheduler.active(), EngineError("the engine shut down"))

    def _step(self, plan: StepPlan) -> None:
        result = self._runner.run(plan)
        self._scheduler.advance(plan)
        for request, scores in result.prompt_logprobs:
            request.prompt_logprobs += scores
        with self._cond:
            self._decode_steps += int(plan.decoding > 0)
            self._max_batch_seen = max(self._max_batch_seen, plan.decoding)
        for request, token, logprob in zip(result.sampled, result.next_ids, result.logprobs):
            output = request.append(token, logprob, self.max_seq_len)
            if output.finish_reason is not None:
                self._scheduler.release(request)
            request.deliver(output)
        for request in result.scored_only:
            self._scheduler.release(request)
            request.deliver(request.scored())

    def _fail(self, requests: list[Request], error: BaseException) -> None:
        for request in requests:
            if request.finished:
                continue
            self._scheduler.release(request)
            failure = EngineError(f"generation failed: {error}")
            failure.__cause__ = error
            request.deliver(failure)


def check_prompt(prompt_ids: Sequence[int], params: SamplingParams, vocab_size: int,
                  max_seq_len: int) -> None:
    """Refuse a prompt the model cannot read, or that leaves no room for what it asks to generate.
    Public so that a front end holding no model (the Ray ingress) refuses exactly what the engine
    would, before anything is sent to a replica."""
    if not prompt_ids:
        raise ValueError("the prompt must contain at least one token")
    if any(not 0 <= token < vocab_size for token in prompt_ids):
        raise ValueError(f"prompt token ids must lie in [0, {vocab_size})")
    if len(prompt_ids) >= max_seq_len and params.max_tokens != 0:
        raise ContextLengthError(f"the prompt has {len(prompt_ids)} tokens but the context holds "
                                 f"{max_seq_len}, including at least one generated token")
    if params.max_tokens is not None and len(prompt_ids) + params.max_tokens > max_seq_len:
        raise ContextLengthError(f"the prompt ({len(prompt_ids)} tokens) plus max_tokens "
                                 f"({params.max_tokens}) exceeds the context of {max_seq_len} tokens")
