"""Running one request on the engine: start it, collect it or stream it as SSE, cancel it when the
client goes away.

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
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Optional, TypeVar

import anyio
from fastapi import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from server.errors import APIError, error_body
from server.schemas import (ChatChunkChoice, ChatCompletionChunk, CompletionChoice,
                            CompletionResponse, Usage)
from trellis_runtime.engine import ContextLengthError, EngineError

log = logging.getLogger("trellis.server")
T = TypeVar("T")
DONE = "data: [DONE]\n\n"


class ClientGone(Exception):
    """The client closed the connection before the answer was ready; there is no one to reply to."""


def start(engine: Any, prompt_ids: list[int], params: Any, request_id: str,
          prompt_param: str) -> AsyncIterator[Any]:
    """Hand the request to the engine. The engine checks its input at this call, before any response
    is sent, so its refusals become ordinary HTTP errors rather than broken streams."""
    try:
        return engine.generate(prompt_ids, params, request_id=request_id)
    except ContextLengthError as exc:
        raise APIError(str(exc), param=prompt_param, code="context_length_exceeded") from exc
    except ValueError as exc:  # sampling parameters are checked before; what is left is the prompt
        raise APIError(str(exc), param=prompt_param) from exc
    except EngineError as exc:  # stopped or stopping: try again later, maybe elsewhere
        raise APIError(str(exc), status=503) from exc


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
class Collected:
    text: str
    finish_reason: Optional[str]
    prompt_tokens: int
    completion_tokens: int

    @property
    def usage(self) -> Usage:
        return Usage.of(self.prompt_tokens, self.completion_tokens)


async def collect(outputs: AsyncIterator[Any], prompt_tokens: int) -> Collected:
    """The whole answer of a non-streaming request."""
    result = Collected("", None, prompt_tokens, 0)
    pieces = []
    try:
        async for output in outputs:
            pieces.append(output.text)
            result.prompt_tokens = output.prompt_tokens
            result.completion_tokens = output.completion_tokens
            result.finish_reason = output.finish_reason or result.finish_reason
    finally:
        await _close(outputs)
    result.text = "".join(pieces)
    return result


@dataclass
class ChunkWriter:
    """Renders the SSE events of one stream; id, created and model are the same on every chunk."""

    id: str
    created: int
    model: str
    chat: bool
    include_usage: bool

    def chunk(self, text: Optional[str] = None, finish_reason: Optional[str] = None,
              role: bool = False) -> str:
        if self.chat:
            delta = ({"role": "assistant", "content": text or ""} if role
                     else {} if text is None else {"content": text})
            body: Any = ChatCompletionChunk(id=self.id, created=self.created, model=self.model,
                                            choices=[ChatChunkChoice(delta=delta,
                                                                     finish_reason=finish_reason)])
        else:
            body = CompletionResponse(id=self.id, created=self.created, model=self.model,
                                      choices=[CompletionChoice(text=text or "",
                                                                finish_reason=finish_reason)])
        # With include_usage every chunk carries "usage": null and only the last one the totals.
        return _event(body.model_dump(exclude=None if self.include_usage else {"usage"}))

    def usage(self, usage: Usage) -> str:
        cls = ChatCompletionChunk if self.chat else CompletionResponse
        return _event(cls(id=self.id, created=self.created, model=self.model, choices=[],
                          usage=usage).model_dump())


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def events(outputs: AsyncIterator[Any], writer: ChunkWriter, prompt_tokens: int
                 ) -> AsyncIterator[str]:
    """The SSE body: [role chunk], content chunks, the finishing chunk, [usage chunk], [DONE]."""
    completion_tokens = 0
    finished = False
    try:
        if writer.chat:
            yield writer.chunk(role=True)
        async for output in outputs:
            prompt_tokens, completion_tokens = output.prompt_tokens, output.completion_tokens
            if output.text:
                yield writer.chunk(text=output.text)
            if output.finish_reason is not None:
                finished = True
                yield writer.chunk(finish_reason=output.finish_reason)
        if not finished:
            raise RuntimeError("the engine ended the request without a finish reason")
        if writer.include_usage:
            yield writer.usage(Usage.of(prompt_tokens, completion_tokens))
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
