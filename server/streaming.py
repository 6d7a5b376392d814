"""Running one request on the engine: start it, collect it or stream it as SSE, cancel it when the
client goes away.

A request with n choices is n engine requests (each its own sample); start() merges their outputs into
one stream of ChoiceOutputs, tagged with the choice index, in the order they come.

Three rules shape this file:
- The engine checks a request when it is handed over, before any response is sent, so a request it
  refuses (context too long, bad prompt) is still an ordinary 4xx, not a broken stream.
- The engine's generator is always closed (aclose) when we stop reading, on every path: normal end,
  error, client disconnect, server shutdown. Closing is what frees its batch slot and KV cache, so it
  runs shielded from the cancellation that usually causes it.
- SSE lines are written by hand as `data: {json}\\n\\n` (LF only, no sse-starlette CRLF), ending with
  `data: [DONE]`; a failure after the 200 has gone out is sent in-band as `data: {"error": ...}`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Protocol, Sequence, TypeVar

import anyio
from fastapi import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from server.choices import ChoiceOutput
from server.errors import APIError, error_body
from server.schemas import ChatCompletionChunk, CompletionResponse, Usage
from trellis_runtime.engine import ContextLengthError, EngineError
from trellis_runtime.outputs import Output, OutputAccumulator

log = logging.getLogger("trellis.server")
T = TypeVar("T")
DONE = "data: [DONE]\n\n"


class ClientGone(Exception):
    """The client closed the connection before the answer was ready; there is no one to reply to."""


class StreamCut(Exception):
    """The server's drain deadline passed while the stream was still running."""


def start(engine: Any, prompt_ids: list[int], choices: Sequence[Any], request_id: str,
          prompt_param: str) -> AsyncIterator[ChoiceOutput]:
    """Hand the request's choices (one SamplingParams each) to the engine. The engine checks its input
    at this call, before any response is sent, so its refusals become ordinary HTTP errors rather than
    broken streams."""
    try:
        streams = [engine.generate(prompt_ids, params,
                                   request_id=request_id if len(choices) == 1 else f"{request_id}-{i}")
                   for i, params in enumerate(choices)]
    except ContextLengthError as exc:
        raise APIError(str(exc), param=prompt_param, code="context_length_exceeded") from exc
    except ValueError as exc:  # sampling parameters are checked before; what is left is the prompt
        raise APIError(str(exc), param=prompt_param) from exc
    except EngineError as exc:  # stopped or stopping: try again later, maybe elsewhere
        raise APIError(str(exc), status=503) from exc
    # Nothing is queued yet (an engine stream submits when first read), so a refusal above leaks nothing.
    return _merged(streams)


async def _merged(streams: list[AsyncIterator[Output]]) -> AsyncIterator[ChoiceOutput]:
    """Every choice's outputs as they arrive. One task reads each stream; closing this generator
    cancels them, and each closes its stream, which aborts that engine request."""
    arrivals: asyncio.Queue[tuple[int, Output | Exception | None]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[Output]) -> None:
        try:
            async for output in stream:
                arrivals.put_nowait((index, output))
            arrivals.put_nowait((index, None))
        except Exception as exc:
            arrivals.put_nowait((index, exc))
        finally:
            await _close(stream)

    tasks = [asyncio.ensure_future(pump(i, stream)) for i, stream in enumerate(streams)]
    generated = [0] * len(streams)
    try:
        running = len(tasks)
        while running:
            index, item = await arrivals.get()
            if item is None:
                running -= 1
                continue
            if isinstance(item, Exception):
                raise item
            generated[index] = item.completion_tokens
            yield ChoiceOutput(index, item, sum(generated))
    finally:
        for task in tasks:
            task.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.gather(*tasks, return_exceptions=True)


async def _close(outputs: Any) -> None:
    """aclose() the generator even while our task is being cancelled: it is what aborts the request."""
    with anyio.CancelScope(shield=True):
        await outputs.aclose()


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, but cancel it (freeing its engine slot) if the client disconnects first.

    The body has been read by now, so the next ASGI receive() only returns when the client goes away.
    """
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)  # let its cleanup reach the engine
    if task.cancelled():
        raise ClientGone()
    return task.result()


@dataclass
class Answer:
    """The whole answer of a non-streamed request: each choice's, and the usage of them all."""

    choices: list[OutputAccumulator]
    usage: Usage


async def collect(outputs: AsyncIterator[ChoiceOutput], choices: int, prompt_tokens: int) -> Answer:
    """Read the request's merged stream to the end."""
    answer = Answer([OutputAccumulator() for _ in range(choices)], Usage.of(prompt_tokens, 0))
    try:
        async for choice in outputs:
            answer.choices[choice.index].add(choice.output)
            answer.usage = Usage.of(choice.output.prompt_tokens, choice.completion_tokens)
    finally:
        await _close(outputs)
    return answer


class ChoiceRenderer(Protocol):
    """What a route's choice rendering (server.choices) gives a stream."""

    def opening(self, index: int) -> list[Any]: ...

    def chunks(self, choice: ChoiceOutput) -> list[Any]: ...


@dataclass
class ChunkWriter:
    """Renders the SSE events of one stream; id, created and model are the same on every chunk."""

    id: str
    created: int
    model: str
    chat: bool
    include_usage: bool

    def chunk(self, choice: Any) -> str:
        """The event for one choice's chunk (a ChatChunkChoice or a CompletionChoice)."""
        cls = ChatCompletionChunk if self.chat else CompletionResponse
        body = cls(id=self.id, created=self.created, model=self.model, choices=[choice])
        # With include_usage every chunk carries "usage": null and only the last one the totals.
        return _event(body.model_dump(exclude=None if self.include_usage else {"usage"}))

    def usage(self, usage: Usage) -> str:
        cls = ChatCompletionChunk if self.chat else CompletionResponse
        return _event(cls(id=self.id, created=self.created, model=self.model, choices=[],
                          usage=usage).model_dump())


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def until_cut(outputs: AsyncIterator[T], cut: asyncio.Event) -> AsyncIterator[T]:
    """`outputs` as they come, ended by StreamCut as soon as `cut` is set (the drain deadline), so
    that a stream the server must stop still ends with an error event rather than a dropped
    connection. Stopping the pending read cancels `outputs`, which aborts its engine requests."""
    cutting = asyncio.ensure_future(cut.wait())
    step: asyncio.Future[T] | None = None
    try:
        while True:
            step = asyncio.ensure_future(anext(outputs))
            await asyncio.wait({step, cutting}, return_when=asyncio.FIRST_COMPLETED)
            if not step.done():
                raise StreamCut()
            try:
                item = step.result()
            except StopAsyncIteration:
                return
            yield item
    finally:  # cut, or our reader cancelled: the pending read must end before outputs is closed
        cutting.cancel()
        if step is not None and not step.done():
            step.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.gather(step, return_exceptions=True)


async def events(outputs: AsyncIterator[ChoiceOutput], writer: ChunkWriter, render: ChoiceRenderer,
                 choices: int, prompt_tokens: int, cut: asyncio.Event) -> AsyncIterator[str]:
    """The SSE body: per choice [an opening chunk], content chunks, its finishing chunk (choices
    interleaved as they are generated); then [the usage chunk] and [DONE]. Cut at the drain
    deadline, it ends with an error event and [DONE]."""
    usage = Usage.of(prompt_tokens, 0)
    finished = 0
    try:
        for index in range(choices):
            for chunk in render.opening(index):
                yield writer.chunk(chunk)
        async with aclosing(until_cut(outputs, cut)) as arriving:
            async for choice in arriving:
                usage = Usage.of(choice.output.prompt_tokens, choice.completion_tokens)
                for chunk in render.chunks(choice):
                    yield writer.chunk(chunk)
                finished += choice.output.finish_reason is not None
        if finished < choices:
            raise RuntimeError("the engine ended the request without a finish reason")
        if writer.include_usage:
            yield writer.usage(usage)
    except StreamCut:
        yield _event(error_body("The server is shutting down and stopped this stream at its drain "
                                "deadline; retry on another replica.", "service_unavailable_error",
                                code="server_shutting_down"))
    except Exception:  # the 200 is already out: report in-band, as vLLM and openai-python expect
        log.exception("generation failed mid-stream")
        yield _event(error_body("The server had an error while generating the response.",
                                "server_error"))
    finally:
        await _close(outputs)
    yield DONE


class EventStreamResponse(StreamingResponse):
    """StreamingResponse that always closes its body generator, whichever way the response ends.

    Starlette stops iterating on a client disconnect (cancelling the task, or raising from send)
    without closing the generator; it would then only be closed whenever the garbage collector gets
    to it, and the request would keep its engine slot until then.
    """

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str]) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await _close(self.body_iterator)
