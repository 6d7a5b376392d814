"""The FastAPI application: OpenAI-compatible routes over one engine and one model.

create_app() takes an engine that need not be started: the app's lifespan starts it when the server
starts and shuts it down (failing what is still in flight) when the server stops, so whoever runs
uvicorn owns the engine's whole life and a stopped server leaves no generation thread behind.
"""

from __future__ import annotations

import asyncio
import inspect
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from server.access_log import TRACE_KEY
from server.admission import Admission
from server.choices import ChatChoices, CompletionChoices
from server.errors import install_error_handlers
from server.inputs import (chat_inputs, check_model, completion_inputs, refuse_invalid_text,
                           refuse_unsupported)
from server.logprobs import TokenText
from server.metrics import Metrics
from server.openapi import GENERATION_RESPONSES, MODEL_RESPONSES, MODELS_RESPONSES
from server.operations import install_operations
from server.settings import AppConfig
from server.schemas import (ChatCompletionRequest, ChatCompletionResponse, CompletionRequest,
                            CompletionResponse, ModelCard, ModelList, SamplingFields, Usage, new_id,
                            now)
from server.streaming import (ChunkWriter, ClientGone, EventStreamResponse, collect, events, start,
                              until_disconnected)
from server.trace import Trace, traced

# Status for a request whose client left before the answer (nginx's convention; nobody receives it).
CLIENT_CLOSED = 499
# Threads that tokenize and apply chat templates, off the event loop: a 1 MiB prompt takes about a
# second, which on the loop would stall every stream and probe. Bounded, so a burst of huge prompts
# queues (each already holds an admission place) instead of taking a thread each.
TOKENIZER_THREADS = 2


async def _maybe_await(value: Any) -> None:
    if inspect.isawaitable(value):
        await value


def context_length(engine: Any) -> int:
    """The most tokens (prompt + completion) one sequence may hold in this engine."""
    return int(engine.max_seq_len)


def create_app(engine: Any, tokenizer: Any, model_name: str,
               config: AppConfig | None = None) -> FastAPI:
    """Build the app. `engine` follows trellis_runtime.engine.Engine; `tokenizer` is the model's HF
    tokenizer (encode, apply_chat_template, len); `config` holds keys and limits (defaults: none
    and the documented limits). The app's Admission is app.state.admission, for the draining
    server."""
    config = config or AppConfig()
    admission = Admission(engine.max_batch, config.max_waiting)
    metrics = Metrics(engine)
    tokenizing = ThreadPoolExecutor(TOKENIZER_THREADS, thread_name_prefix="trellis-tokenize")

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await _maybe_await(engine.start())
        try:
            yield
        finally:
            tokenizing.shutdown(wait=False, cancel_futures=True)
            await _maybe_await(engine.shutdown())

    app = FastAPI(title="trellis-runtime", lifespan=lifespan, docs_url=None, redoc_url=None)
    install_error_handlers(app)
    install_operations(app, config, admission, metrics)
    app.state.admission = admission
    created = now()
    vocab = TokenText(tokenizer)  # token text and bytes for logprobs

    def card() -> ModelCard:
        return ModelCard(id=model_name, created=created, max_model_len=context_length(engine),
                         max_num_seqs=admission.max_running, max_waiting=admission.max_waiting,
                         max_body_bytes=config.max_body_bytes)

    @app.get("/v1/models", response_model=ModelList, responses=MODELS_RESPONSES)
    async def models() -> JSONResponse:
        return JSONResponse(ModelList(data=[card()]).model_dump())

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=MODEL_RESPONSES)
    async def model(model_id: str) -> JSONResponse:
        check_model(model_id, model_name)
        return JSONResponse(card().model_dump())

    async def run(request: Request, body: SamplingFields, prefix: str,
                  prepare: Callable[[], tuple[list[int], Any]], prompt_param: str,
                  render: Callable[[list[int]], Any],
                  respond: Callable[[str, list[Any], Usage], Any]) -> Response:
        """What both routes share: checks, then one engine request per choice, streamed or
        collected. `prepare` (tokenizing, templating) and `render(prompt_ids)` (the route's choice
        rendering, server.choices; it may decode the prompt) run on the tokenizer threads."""
        trace = Trace()
        refuse_invalid_text(body)
        check_model(body.model, model_name)
        refuse_unsupported(body)

        def tokenize() -> tuple[list[int], Any, Any]:
            prompt_ids, params = prepare()
            return prompt_ids, params, render(prompt_ids)

        prompt_ids, params, rendering = await asyncio.get_running_loop().run_in_executor(
            tokenizing, tokenize)
        choices = [params.for_choice(i) for i in range(body.choices)]
        request_id = new_id(prefix)
        outputs = traced(start(engine, prompt_ids, choices, request_id, prompt_param), trace,
                         metrics.observe_request)
        setattr(request.state, TRACE_KEY, trace)
        if body.stream:
            writer = ChunkWriter(request_id, now(), model_name, chat=prefix == "chatcmpl",
                                 include_usage=body.include_usage)
            return EventStreamResponse(events(outputs, writer, rendering, len(choices),
                                              len(prompt_ids), admission.streams_cut))
        try:
            answer = await until_disconnected(request,
                                              collect(outputs, len(choices), len(prompt_ids)))
        except ClientGone:
            return Response(status_code=CLIENT_CLOSED)
        whole = [rendering.whole(i, choice) for i, choice in enumerate(answer.choices)]
        return JSONResponse(respond(request_id, whole, answer.usage).model_dump())

    @app.post("/v1/completions", response_model=CompletionResponse,
              responses=GENERATION_RESPONSES)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        def render(prompt_ids: list[int]) -> CompletionChoices:
            echo = None
            if body.echo:  # the prompt as sent; token ids as their text
                prompt = body.prompt
                echo = prompt if isinstance(prompt, str) else tokenizer.decode(prompt_ids)
            return CompletionChoices(vocab, echo, prompt_ids)

        def respond(request_id: str, choices: list[Any], usage: Usage) -> CompletionResponse:
            return CompletionResponse(id=request_id, created=now(), model=model_name, usage=usage,
                                      choices=choices)

        return await run(request, body, "cmpl",
                         lambda: completion_inputs(body, tokenizer, context_length(engine)),
                         "prompt", render, respond)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse,
              responses=GENERATION_RESPONSES)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        def respond(request_id: str, choices: list[Any], usage: Usage) -> ChatCompletionResponse:
            return ChatCompletionResponse(id=request_id, created=now(), model=model_name,
                                          usage=usage, choices=choices)

        return await run(request, body, "chatcmpl",
                         lambda: chat_inputs(body, tokenizer, context_length(engine)),
                         "messages", lambda _: ChatChoices(vocab), respond)

    return app
