"""The OpenAI-compatible server, end to end: a real uvicorn on a socket, a real engine, a real
(tiny, random-weight) quantized checkpoint, spoken to with httpx and with the official openai client.

The model's weights are random, so its text is gibberish; the tests check the protocol (shapes, ids,
statuses, streaming order, cancellation, batching), and content only where it is determined
(greedy / seeded decoding, stop strings).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import httpx
import pytest
from live_server import live_server

MODEL = "tiny-trellis"
CONTEXT = 512  # room for a stream long enough to disconnect from mid-way
MAX_BATCH = 8
ERROR_KEYS = {"message", "type", "param", "code"}


@dataclass
class Served:
    url: str
    engine: Any
    tokenizer: Any


@pytest.fixture(scope="module")
def served(tiny_checkpoint_dir: Path):
    from server.app import create_app
    from trellis_runtime.engine import Engine
    from trellis_runtime.model import load_model

    model, tokenizer = load_model(tiny_checkpoint_dir, "cpu")
    engine = Engine(model, tokenizer, max_batch=MAX_BATCH, max_seq_len=CONTEXT)
    with live_server(create_app(engine, tokenizer, MODEL)) as url:
        yield Served(url, engine, tokenizer)


@pytest.fixture(scope="module")
def client(served: Served):
    with httpx.Client(base_url=served.url, timeout=60) as c:
        yield c


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Hello there"}],
            "max_tokens": 4, **extra}


def completion_body(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 4, **extra}


def sse_events(lines: list[str]) -> list[Any]:
    """Parse an SSE body strictly: every event is exactly one `data: ` line and one blank line."""
    assert lines[-1] == "data: [DONE]", lines[-3:]
    events = []
    for i, line in enumerate(lines):
        if line == "":
            continue
        assert line.startswith("data: "), line
        assert i + 1 == len(lines) or lines[i + 1] == "", "an event must end with a blank line"
        payload = line[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def stream_lines(client: httpx.Client, path: str, body: dict[str, Any]) -> list[str]:
    with client.stream("POST", path, json=body) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        text = response.read().decode()
    assert "\r" not in text  # LF-only framing
    return text.split("\n")[:-2]  # the body ends with "data: [DONE]\n\n"


def wait_idle(engine: Any, timeout: float = 10.0) -> dict[str, Any]:
    """Engine stats once nothing runs or waits and no KV slot is held."""
    deadline = time.monotonic() + timeout
    while True:
        stats = engine.stats()
        if idle(stats) or time.monotonic() > deadline:
            return stats
        time.sleep(0.02)


def idle(stats: dict[str, Any]) -> bool:
    return stats["running"] == 0 and stats["waiting"] == 0 and stats["kv_cache_usage"] == 0


def assert_error(response: httpx.Response, status: int, param: str | None = None,
                 code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == ("invalid_request_error" if status == 400 else error["type"])
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


# ------------------------------------------------------------------------------------ plain routes


def test_health_and_models(client: httpx.Client) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    listing = client.get("/v1/models").json()
    assert listing["object"] == "list" and len(listing["data"]) == 1
    card = listing["data"][0]
    assert card["id"] == MODEL and card["object"] == "model" and card["max_model_len"] == CONTEXT
    assert isinstance(card["created"], int) and card["owned_by"]
    assert client.get(f"/v1/models/{MODEL}").json() == card
    assert_error(client.get("/v1/models/nope"), 404, code="model_not_found")


def test_completion(client: httpx.Client) -> None:
    body = client.post("/v1/completions", json=completion_body()).json()
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    assert body["model"] == MODEL and isinstance(body["created"], int)
    (choice,) = body["choices"]
    assert choice["index"] == 0 and isinstance(choice["text"], str) and choice["logprobs"] is None
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["completion_tokens"] <= 4 and usage["prompt_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_completion_prompt_forms(served: Served, client: httpx.Client) -> None:
    """Text, a list of one text and token ids are the same prompt."""
    ids = served.tokenizer.encode("Once upon a time")
    texts = [client.post("/v1/completions",
                         json=completion_body(prompt=p, temperature=0, ignore_eos=True)).json()
             for p in ("Once upon a time", ["Once upon a time"], ids, [ids])]
    assert all(t["usage"]["prompt_tokens"] == len(ids) for t in texts)
    assert len({t["choices"][0]["text"] for t in texts}) == 1


def test_chat_completion(client: httpx.Client) -> None:
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    body = client.post("/v1/chat/completions",
                       json=chat_body(messages=messages, max_tokens=None,
                                      max_completion_tokens=3, ignore_eos=True)).json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 3


# ------------------------------------------------------------------------------------ streaming


def test_chat_stream_format(client: httpx.Client) -> None:
    lines = stream_lines(client, "/v1/chat/completions",
                         chat_body(stream=True, stream_options={"include_usage": True},
                                   ignore_eos=True, max_tokens=5))
    events = sse_events(lines)
    chunks, usage_chunk = events[:-2], events[-2]
    assert len({(c["id"], c["created"], c["model"]) for c in events[:-1]}) == 1
    assert chunks[0]["id"].startswith("chatcmpl-") and chunks[0]["model"] == MODEL
    assert all(c["object"] == "chat.completion.chunk" and "usage" in c and c["usage"] is None
               for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    for middle in chunks[1:-1]:
        (choice,) = middle["choices"]
        assert set(choice["delta"]) == {"content"} and choice["finish_reason"] is None
    finish = chunks[-1]["choices"][0]
    assert finish["delta"] == {} and finish["finish_reason"] == "length"
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 5
    u = usage_chunk["usage"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]


def test_completion_stream_matches_whole(client: httpx.Client) -> None:
    """Streamed deltas join to the non-streamed text; no usage key unless asked for."""
    body = completion_body(temperature=0, ignore_eos=True, max_tokens=6)
    whole = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    events = sse_events(stream_lines(client, "/v1/completions", {**body, "stream": True}))
    chunks = events[:-1]
    assert all(c["object"] == "text_completion" and "usage" not in c for c in chunks)
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("cmpl-")
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_disconnect_mid_stream_frees_the_request(served: Served) -> None:
    """Closing the connection aborts the request: its slot is freed long before max_tokens."""
    assert idle(wait_idle(served.engine))
    steps_before = served.engine.stats()["decode_steps"]
    max_tokens = CONTEXT - 16
    body = completion_body(stream=True, ignore_eos=True, max_tokens=max_tokens)
    with httpx.Client(base_url=served.url, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json=body) as response:
            lines = response.iter_lines()  # keep it: a dropped iterator closes the connection
            first = next(lines)
            stats = served.engine.stats()
            assert first.startswith("data: ") and "error" not in json.loads(first[6:]), first
            assert not idle(stats), (first, stats)  # the request holds a slot while it streams
        # leaving the block closes the connection after one event
    stats = wait_idle(served.engine)
    assert idle(stats), stats
    assert stats["decode_steps"] - steps_before < max_tokens // 2, stats


def test_disconnect_while_waiting_for_whole_answer(served: Served) -> None:
    """A non-streaming client that gives up (timeout) also frees its request."""
    assert idle(wait_idle(served.engine))
    steps_before = served.engine.stats()["decode_steps"]
    max_tokens = CONTEXT - 16
    with httpx.Client(base_url=served.url, timeout=0.3) as c:
        with pytest.raises(httpx.ReadTimeout):
            c.post("/v1/completions", json=completion_body(ignore_eos=True, max_tokens=max_tokens))
    stats = wait_idle(served.engine)
    assert idle(stats), stats
    assert stats["decode_steps"] - steps_before < max_tokens // 2, stats


# ------------------------------------------------------------------------------------ sampling


def test_seed_reproducible(client: httpx.Client) -> None:
    def text(seed: int) -> str:
        body = completion_body(temperature=1.0, seed=seed, max_tokens=8, ignore_eos=True)
        return client.post("/v1/completions", json=body).json()["choices"][0]["text"]

    assert text(1234) == text(1234)
    assert text(1234) != text(4321)


def test_stop_string_not_in_output(client: httpx.Client) -> None:
    base = completion_body(temperature=0, ignore_eos=True, max_tokens=12)
    text = client.post("/v1/completions", json=base).json()["choices"][0]["text"]
    stop = text[len(text) // 2:len(text) // 2 + 2]
    assert stop.strip(), f"greedy output too short or blank to pick a stop string: {text!r}"
    for form in (stop, [stop, "never-generated-zzz"]):
        body = client.post("/v1/completions", json={**base, "stop": form}).json()
        choice = body["choices"][0]
        assert choice["finish_reason"] == "stop" and stop not in choice["text"]
        assert choice["text"] == text[:text.index(stop)]


async def _fire_together(url: str, count: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        body = completion_body(max_tokens=8, ignore_eos=True)
        return await asyncio.gather(*(c.post("/v1/completions", json=body) for _ in range(count)))


def test_concurrent_requests_share_steps(served: Served) -> None:
    responses = asyncio.run(_fire_together(served.url, 6))
    assert all(r.status_code == 200 for r in responses)
    assert len({r.json()["id"] for r in responses}) == 6
    assert served.engine.stats()["max_batch_seen"] > 1


# ------------------------------------------------------------------------------------ errors


CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
BAD_REQUESTS: list[tuple[str, str, Callable[[], dict[str, Any]], str | None]] = [
    ("negative temperature", CHAT, lambda: chat_body(temperature=-0.5), "temperature"),
    ("top_p zero", CHAT, lambda: chat_body(top_p=0), "top_p"),
    ("top_p above one", COMPLETIONS, lambda: completion_body(top_p=1.5), "top_p"),
    ("temperature as text", CHAT, lambda: chat_body(temperature="hot"), "temperature"),
    ("max_tokens as text", COMPLETIONS, lambda: completion_body(max_tokens="ten"), "max_tokens"),
    ("max_tokens zero", COMPLETIONS, lambda: completion_body(max_tokens=0), "max_tokens"),
    ("stream not a bool", CHAT, lambda: chat_body(stream="yes"), "stream"),
    ("messages not a list", CHAT, lambda: chat_body(messages="hi"), "messages"),
    ("bad role", CHAT, lambda: chat_body(messages=[{"role": "robot", "content": "x"}]),
     "messages[0].role"),
    ("image content", CHAT, lambda: chat_body(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]), "messages[0].content"),
    ("messages missing", CHAT, lambda: {"model": MODEL}, "messages"),
    ("prompt missing", COMPLETIONS, lambda: {"model": MODEL, "max_tokens": 2}, "prompt"),
    ("two prompts", COMPLETIONS, lambda: completion_body(prompt=["a", "b"]), "prompt"),
    ("token id out of range", COMPLETIONS, lambda: completion_body(prompt=[1, 10 ** 9]), "prompt"),
    ("stop not strings", COMPLETIONS, lambda: completion_body(stop=[1, 2]), "stop"),
    ("n above 8", CHAT, lambda: chat_body(n=9), "n"),
    ("logprobs above 20", COMPLETIONS, lambda: completion_body(logprobs=21), "logprobs"),
    ("presence_penalty out of range", CHAT, lambda: chat_body(presence_penalty=3), "presence_penalty"),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request(client: httpx.Client, case: tuple, stream: bool) -> None:
    """Each refusal is a 400 in OpenAI's shape naming the field, streamed or not, never a 500."""
    _, path, make, param = case
    body = make()
    body.setdefault("stream", stream)
    assert_error(client.post(path, json=body), 400, param=param)


def test_stream_options_needs_stream(client: httpx.Client) -> None:
    assert_error(client.post(CHAT, json=chat_body(stream_options={"include_usage": True})), 400,
                 param="stream_options")


def test_context_length(client: httpx.Client) -> None:
    long_prompt = " ".join(["word"] * (CONTEXT * 2))
    for stream in (False, True):
        assert_error(client.post("/v1/completions", json=completion_body(prompt=long_prompt,
                                                                         stream=stream)),
                     400, param="prompt", code="context_length_exceeded")
        assert_error(client.post("/v1/chat/completions",
                                 json=chat_body(messages=[{"role": "user", "content": long_prompt}],
                                                stream=stream)),
                     400, param="messages", code="context_length_exceeded")
        assert_error(client.post("/v1/completions", json=completion_body(max_tokens=CONTEXT,
                                                                         stream=stream)),
                     400, param="max_tokens", code="context_length_exceeded")
        assert_error(client.post("/v1/chat/completions",
                                 json=chat_body(max_completion_tokens=CONTEXT, stream=stream)),
                     400, param="max_completion_tokens", code="context_length_exceeded")


def test_malformed_json_unknown_model_and_routes(client: httpx.Client) -> None:
    headers = {"content-type": "application/json"}
    assert_error(client.post("/v1/chat/completions", content=b'{"messages": [', headers=headers), 400)
    assert_error(client.post("/v1/completions", content=b"", headers=headers), 400)
    assert_error(client.post("/v1/completions", json=[1, 2]), 400)
    assert_error(client.post("/v1/chat/completions", json=chat_body(model="gpt-5")), 404,
                 param="model", code="model_not_found")
    assert_error(client.post("/v1/completions", json=completion_body(model="gpt-5", stream=True)),
                 404, code="model_not_found")
    assert_error(client.get("/v1/nothing-here"), 404)
    assert_error(client.get("/v1/completions"), 405)


# ------------------------------------------------------------------------------------ openai client


def test_official_openai_client(served: Served) -> None:
    import openai

    api = openai.OpenAI(base_url=f"{served.url}/v1", api_key="x", max_retries=0)
    chat = api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=3, extra_body={"ignore_eos": True})
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 3

    pieces, usage = [], None
    for chunk in api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                             max_tokens=3, stream=True,
                                             stream_options={"include_usage": True}):
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
        else:
            usage = chunk.usage
    assert usage is not None and usage.completion_tokens <= 3

    text = api.completions.create(model=MODEL, prompt="Hello", max_tokens=3, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert text.object == "text_completion" and text.usage.completion_tokens == 3
    streamed = "".join(c.choices[0].text for c in api.completions.create(
        model=MODEL, prompt="Hello", max_tokens=3, temperature=0, stream=True,
        extra_body={"ignore_eos": True}) if c.choices)
    assert streamed == text.choices[0].text

    assert [m.id for m in api.models.list()] == [MODEL]
    with pytest.raises(openai.BadRequestError) as info:
        api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                    temperature=-1)
    assert info.value.param == "temperature"
    with pytest.raises(openai.NotFoundError) as missing:
        api.completions.create(model="gpt-5", prompt="Hi")
    assert missing.value.code == "model_not_found"
