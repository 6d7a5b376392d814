"""Logprobs, echo and n choices over the real server: a uvicorn socket, the engine, the tiny checkpoint.

Numbers are checked against a float64 log-softmax of one teacher-forced forward of the runtime model
(the tolerance is argued in test_logprobs); shapes against OpenAI's; the loglikelihood request of
lm-evaluation-harness's `local-completions` model is sent exactly as the harness sends it and parsed
as the harness parses it.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import httpx
import pytest
import torch

from test_logprobs import TOLERANCE
from test_server import (CONTEXT, MODEL, Served, assert_error, chat_body, client,  # noqa: F401
                         completion_body, idle, served, sse_events, stream_lines, wait_idle)

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
REPLACEMENT = "\ufffd"


def reference_logprobs(served: Served, ids: list[int]) -> torch.Tensor:
    """(len(ids), vocab) float64 log-softmax of one teacher-forced forward of the served model."""
    model = served.engine.model
    cache = model.new_cache(1, CONTEXT)
    slot = cache.allocate()
    with torch.inference_mode():
        logits = model(torch.tensor(ids), torch.arange(len(ids)), torch.full((len(ids),), slot), cache)
    return logits.double().log_softmax(dim=-1)


def engine_tokens(served: Served, prompt_ids: list[int], max_tokens: int) -> list[int]:
    """The greedy continuation, straight from the engine (the API returns token text, not ids)."""
    from trellis_runtime.sampling import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return served.engine.generate_text(prompt_ids, params).token_ids


def chat_prompt_ids(served: Served, body: dict[str, Any]) -> list[int]:
    tokenizer = served.tokenizer
    text = tokenizer.apply_chat_template(body["messages"], add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


@functools.cache
def token_text(tokenizer: Any) -> Any:
    from server.logprobs import TokenText

    return TokenText(tokenizer)


def vocab_text(served: Served, token_id: int) -> tuple[str, list[int]]:
    raw = token_text(served.tokenizer).bytes(token_id)
    return raw.decode("utf-8", errors="replace"), list(raw)


# ------------------------------------------------------------------------------------ chat


def check_chat_entries(served: Served, entries: list[dict], ids: list[int], reference: torch.Tensor,
                       top: int) -> None:
    """Each generated token's item against the reference row that predicted it."""
    assert len(entries) == len(ids)
    for entry, token, row in zip(entries, ids, reference):
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert (entry["token"], entry["bytes"]) == vocab_text(served, token)
        assert entry["logprob"] == pytest.approx(row[token].item(), abs=TOLERANCE)
        alternatives = entry["top_logprobs"]
        assert len(alternatives) == top
        expected = row.topk(top)
        assert [a["logprob"] for a in alternatives] == pytest.approx(expected.values.tolist(),
                                                                    abs=TOLERANCE)
        assert [(a["token"], a["bytes"]) for a in alternatives] == [
            vocab_text(served, t) for t in expected.indices.tolist()]
        values = [a["logprob"] for a in alternatives]
        assert values == sorted(values, reverse=True)
        # Greedy decoding: the token is the top-1, with the very same number.
        assert (alternatives[0]["token"], alternatives[0]["logprob"]) == (entry["token"],
                                                                         entry["logprob"])


def test_chat_logprobs_whole_and_streamed(served: Served, client: httpx.Client) -> None:
    body = chat_body(max_tokens=6, temperature=0, ignore_eos=True, logprobs=True, top_logprobs=5)
    prompt_ids = chat_prompt_ids(served, body)
    ids = engine_tokens(served, prompt_ids, 6)
    reference = reference_logprobs(served, prompt_ids + ids)[len(prompt_ids) - 1:-1]

    whole = client.post(CHAT, json=body).json()
    (choice,) = whole["choices"]
    assert set(choice["logprobs"]) == {"content"}
    entries = choice["logprobs"]["content"]
    check_chat_entries(served, entries, ids, reference, 5)
    assert len(entries) == whole["usage"]["completion_tokens"]
    # The tokens' bytes join back into exactly the answer's text.
    assert bytes(b for e in entries for b in e["bytes"]).decode() == choice["message"]["content"]

    chunks = [e for e in sse_events(stream_lines(client, CHAT, {**body, "stream": True}))[:-1]]
    streamed = [item for c in chunks for ch in c["choices"] if ch["logprobs"]
                for item in ch["logprobs"]["content"]]
    assert streamed == entries
    for c in chunks[1:-1]:  # every content chunk carries the logprobs of the tokens it brings
        assert len(c["choices"][0]["logprobs"]["content"]) == 1
    assert chunks[0]["choices"][0]["logprobs"] is None and chunks[-1]["choices"][0]["logprobs"] is None

    bare = client.post(CHAT, json=chat_body(max_tokens=2, logprobs=True)).json()["choices"][0]
    assert all(e["top_logprobs"] == [] for e in bare["logprobs"]["content"])  # top_logprobs unset: 0
    assert client.post(CHAT, json=chat_body(max_tokens=2)).json()["choices"][0]["logprobs"] is None


# ------------------------------------------------------------------------------------ completions


def check_completion_logprobs(served: Served, logprobs: dict, text: str, ids: list[int],
                              reference: torch.Tensor, top: int, first_unscored: bool) -> None:
    """The legacy shape over `ids`; reference row i scores ids[i] (row 0 unused if first_unscored)."""
    assert set(logprobs) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert len({len(v) for v in logprobs.values()}) == 1 and len(logprobs["tokens"]) == len(ids)
    for i, token in enumerate(ids):
        assert logprobs["tokens"][i] == vocab_text(served, token)[0]
        offset = logprobs["text_offset"][i]
        if REPLACEMENT not in logprobs["tokens"][i]:
            assert text[offset:].startswith(logprobs["tokens"][i]), (i, offset)
        if i == 0 and first_unscored:
            assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
            continue
        value, alternatives = logprobs["token_logprobs"][i], logprobs["top_logprobs"][i]
        assert value == pytest.approx(reference[i, token].item(), abs=TOLERANCE)
        best = reference[i].topk(top)
        expected = {vocab_text(served, t)[0]: v for t, v in zip(best.indices.tolist(),
                                                                best.values.tolist())}
        expected.setdefault(logprobs["tokens"][i], reference[i, token].item())
        assert alternatives.keys() == expected.keys()  # the top ones plus the chosen one
        assert list(alternatives.values()) == pytest.approx(list(expected.values()), abs=TOLERANCE)
        assert alternatives[logprobs["tokens"][i]] == value


def test_completion_logprobs_with_echo(served: Served, client: httpx.Client) -> None:
    prompt = "The quick brown fox jumps"
    prompt_ids = served.tokenizer.encode(prompt)
    ids = engine_tokens(served, prompt_ids, 5)
    # Row i of `reference` scores token i of prompt + completion (row 0 scores nothing).
    reference = reference_logprobs(served, prompt_ids + ids)
    reference = torch.cat([reference[:1], reference[:-1]])
    body = completion_body(prompt=prompt, max_tokens=5, temperature=0, ignore_eos=True, logprobs=3)

    plain = client.post(COMPLETIONS, json=body).json()["choices"][0]
    check_completion_logprobs(served, plain["logprobs"], plain["text"], ids,
                              reference[len(prompt_ids):], 3, first_unscored=False)
    assert plain["logprobs"]["text_offset"][0] == 0

    echoed = client.post(COMPLETIONS, json={**body, "echo": True}).json()
    choice = echoed["choices"][0]
    assert choice["text"] == prompt + plain["text"]
    check_completion_logprobs(served, choice["logprobs"], choice["text"], prompt_ids + ids,
                              reference, 3, first_unscored=True)
    assert echoed["usage"] == {"prompt_tokens": len(prompt_ids), "completion_tokens": 5,
                               "total_tokens": len(prompt_ids) + 5}

    events = sse_events(stream_lines(client, COMPLETIONS, {**body, "echo": True, "stream": True}))
    pieces = [c["choices"][0] for c in events[:-1]]
    assert pieces[0]["text"] == prompt  # the echo comes first, with the prompt's logprobs
    assert len(pieces[0]["logprobs"]["tokens"]) == len(prompt_ids)
    assert "".join(p["text"] for p in pieces) == choice["text"]
    joined = {key: [v for p in pieces if p["logprobs"] for v in p["logprobs"][key]]
              for key in choice["logprobs"]}
    assert joined == choice["logprobs"]

    no_logprobs = client.post(COMPLETIONS, json={**body, "logprobs": None, "echo": True}).json()
    assert no_logprobs["choices"][0]["logprobs"] is None
    assert no_logprobs["choices"][0]["text"] == choice["text"]


def test_bytes_rebuild_split_characters(served: Served, client: httpx.Client) -> None:
    """Byte-level BPE splits these characters across tokens; their bytes join back exactly."""
    prompt = "naïve café — 你好 😀"
    prompt_ids = served.tokenizer.encode(prompt)
    vocab = token_text(served.tokenizer)
    pieces = [vocab.bytes(t) for t in prompt_ids]
    assert b"".join(pieces).decode() == prompt
    assert any(REPLACEMENT in p.decode("utf-8", errors="replace") for p in pieces)  # really split
    body = completion_body(prompt=prompt, max_tokens=0, echo=True, logprobs=0)
    choice = client.post(COMPLETIONS, json=body).json()["choices"][0]
    assert choice["text"] == prompt and choice["logprobs"]["tokens"] == [
        p.decode("utf-8", errors="replace") for p in pieces]
    offsets = choice["logprobs"]["text_offset"]
    assert offsets == sorted(offsets) and offsets[0] == 0 and offsets[-1] < len(prompt)


def test_bytes_of_a_sentencepiece_byte_fallback_vocabulary() -> None:
    """Llama-2-style vocabularies spell a space "▁" and a byte "<0xNN>"; specials are their text."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    from server.logprobs import TokenText

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    vocab.update({piece: 259 + i for i, piece in enumerate("\u2581hia")})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"),
                                               normalizers.Replace(" ", "\u2581")])
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>")
    text = "hi a你"
    ids = tokenizer.encode(text, add_special_tokens=False)
    vocab_text = TokenText(tokenizer)
    pieces = [vocab_text.bytes(t) for t in ids]
    assert b"".join(pieces) == b" " + text.encode()  # the leading "▁" is the first token's space
    assert pieces[-3:] == [b"\xe4", b"\xbd", b"\xa0"] and vocab_text.text(ids[-1]) == REPLACEMENT
    assert vocab_text.bytes(tokenizer.bos_token_id) == b"<s>"


# ------------------------------------------------------------------------ lm-evaluation-harness


def harness_loglikelihood(response: dict, ctxlen: int) -> tuple[float, bool]:
    """lm_eval.models.openai_completions.LocalCompletionsAPI.parse_logprobs, for one choice."""
    (choice,) = sorted(response["choices"], key=lambda c: c["index"])
    token_logprobs = choice["logprobs"]["token_logprobs"][ctxlen:-1]
    top_logprobs = choice["logprobs"]["top_logprobs"][ctxlen:-1]
    is_greedy = all(token == max(top.values()) for token, top in zip(token_logprobs, top_logprobs))
    return sum(token_logprobs), is_greedy


def test_lm_eval_loglikelihood_request(served: Served, client: httpx.Client) -> None:
    """What the harness's local-completions model sends for a loglikelihood request (tokenized
    requests, batch size 1): the prompt as a batch of one token list, context + continuation; it
    reads the continuation's logprobs out of the echo, dropping the one generated token."""
    context = served.tokenizer.encode("Question: what colour is the sky? Answer:")
    greedy = engine_tokens(served, context, 3)
    other = [served.tokenizer.encode(" blue")[0], 1234, 777]
    for continuation, greedy_expected in ((greedy, True), (other, False)):
        tokens = context + continuation
        payload = {"model": MODEL, "prompt": [tokens], "temperature": 0, "max_tokens": 1,
                   "logprobs": 1, "seed": 1234, "echo": True}
        response = client.post(COMPLETIONS, json=payload)
        assert response.status_code == 200, response.text
        logprob, is_greedy = harness_loglikelihood(response.json(), len(context))

        reference = reference_logprobs(served, tokens)
        rows = reference[len(context) - 1:-1]
        expected = sum(rows[i, t].item() for i, t in enumerate(continuation))
        assert logprob == pytest.approx(expected, abs=TOLERANCE * len(continuation))
        assert is_greedy == greedy_expected == (rows.argmax(dim=-1).tolist() == continuation)

    # Its older form, and OpenAI's documented scoring request: max_tokens 0, nothing generated.
    scoring = {"model": MODEL, "prompt": tokens, "echo": True, "max_tokens": 0, "temperature": 0,
               "logprobs": 0}
    body = client.post(COMPLETIONS, json=scoring).json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 0
    assert choice["text"] == served.tokenizer.decode(tokens)
    values = choice["logprobs"]["token_logprobs"]
    assert len(values) == len(tokens) and values[0] is None
    assert sum(values[len(context):]) == pytest.approx(expected, abs=TOLERANCE * len(other))


def test_max_tokens_zero_only_with_echo(client: httpx.Client) -> None:
    assert_error(client.post(COMPLETIONS, json=completion_body(max_tokens=0)), 400,
                 param="max_tokens")
    streamed = sse_events(stream_lines(client, COMPLETIONS, completion_body(
        max_tokens=0, echo=True, stream=True, stream_options={"include_usage": True})))
    assert [c["choices"][0]["text"] for c in streamed[:2]] == ["The capital of France is", ""]
    assert streamed[1]["choices"][0]["finish_reason"] == "length"
    assert streamed[2]["usage"]["completion_tokens"] == 0 and streamed[3] == "[DONE]"


# ------------------------------------------------------------------------------------ n choices


def texts(response: dict) -> list[str]:
    choices = response["choices"]
    assert [c["index"] for c in choices] == list(range(len(choices)))
    return [c["text"] if "text" in c else c["message"]["content"] for c in choices]


def test_n_choices_are_distinct_and_reproducible(client: httpx.Client) -> None:
    body = completion_body(n=3, seed=77, temperature=1.0, max_tokens=6, ignore_eos=True)
    first = client.post(COMPLETIONS, json=body).json()
    assert len(set(texts(first))) == 3  # independent samples
    assert texts(client.post(COMPLETIONS, json=body).json()) == texts(first)  # the seed holds
    assert texts(client.post(COMPLETIONS, json={**body, "n": 1}).json()) == texts(first)[:1]
    assert first["usage"]["completion_tokens"] == 18
    # best_of = n keeps every sample, so it is the same request; any other best_of is refused.
    assert texts(client.post(COMPLETIONS, json={**body, "best_of": 3}).json()) == texts(first)
    assert_error(client.post(COMPLETIONS, json={**body, "best_of": 5}), 400, param="best_of")

    unseeded = client.post(CHAT, json=chat_body(n=4, temperature=1.0, max_tokens=8,
                                                ignore_eos=True)).json()
    assert len(set(texts(unseeded))) == 4 and unseeded["usage"]["completion_tokens"] == 32
    assert all(c["message"]["role"] == "assistant" for c in unseeded["choices"])


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
def test_n_choices_streamed_join_to_whole(client: httpx.Client, path: str) -> None:
    make = chat_body if path == CHAT else completion_body
    body = make(n=3, seed=5, temperature=1.0, max_tokens=5, ignore_eos=True, logprobs=(
        True if path == CHAT else 2))
    whole = client.post(path, json=body).json()
    events = sse_events(stream_lines(client, path, {**body, "stream": True,
                                                    "stream_options": {"include_usage": True}}))
    chunks, usage = events[:-2], events[-2]
    assert usage["usage"] == whole["usage"] and usage["usage"]["completion_tokens"] == 15
    for index, choice in enumerate(whole["choices"]):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert sum(c["finish_reason"] is not None for c in mine) == 1
        assert mine[-1]["finish_reason"] == choice["finish_reason"] == "length"
        if path == CHAT:
            assert mine[0]["delta"] == {"role": "assistant", "content": ""}
            assert "".join(c["delta"].get("content", "") for c in mine) == choice["message"]["content"]
            assert [e for c in mine if c["logprobs"] for e in c["logprobs"]["content"]] == \
                choice["logprobs"]["content"]
        else:
            assert "".join(c["text"] for c in mine) == choice["text"]
            assert [v for c in mine if c["logprobs"] for v in c["logprobs"]["token_logprobs"]] == \
                choice["logprobs"]["token_logprobs"]


def test_disconnect_frees_every_choice(served: Served) -> None:
    assert idle(wait_idle(served.engine))
    body = completion_body(n=3, stream=True, ignore_eos=True, max_tokens=CONTEXT - 16)
    with httpx.Client(base_url=served.url, timeout=60) as c:
        with c.stream("POST", COMPLETIONS, json=body) as response:
            lines = response.iter_lines()
            next(lines)
            assert served.engine.stats()["running"] + served.engine.stats()["waiting"] > 0
    stats = wait_idle(served.engine)
    assert idle(stats), stats


async def _n_and_singles(url: str) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        requests = [c.post(COMPLETIONS, json=completion_body(n=8, max_tokens=3, ignore_eos=True))]
        requests += [c.post(COMPLETIONS, json=completion_body(max_tokens=3)) for _ in range(3)]
        return await asyncio.gather(*requests)


def test_n_up_to_8_alongside_other_requests(served: Served) -> None:
    responses = asyncio.run(_n_and_singles(served.url))
    assert [r.status_code for r in responses] == [200] * 4
    assert len(responses[0].json()["choices"]) == 8


# ------------------------------------------------------------------------------------ refusals


BAD = [
    ("top_logprobs above 20", CHAT, chat_body(logprobs=True, top_logprobs=21), "top_logprobs"),
    ("top_logprobs negative", CHAT, chat_body(logprobs=True, top_logprobs=-1), "top_logprobs"),
    ("top_logprobs without logprobs", CHAT, chat_body(top_logprobs=2), "top_logprobs"),
    ("chat logprobs not a bool", CHAT, chat_body(logprobs=3), "logprobs"),
    ("completion logprobs above 20", COMPLETIONS, completion_body(logprobs=21), "logprobs"),
    ("completion logprobs negative", COMPLETIONS, completion_body(logprobs=-1), "logprobs"),
    ("completion logprobs a bool", COMPLETIONS, completion_body(logprobs=True), "logprobs"),
    ("n zero", COMPLETIONS, completion_body(n=0), "n"),
    ("n nine", CHAT, chat_body(n=9), "n"),
    ("echo not a bool", COMPLETIONS, completion_body(echo="yes"), "echo"),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_logprob_and_choice_values(client: httpx.Client, case: tuple, stream: bool) -> None:
    _, path, body, param = case
    error = assert_error(client.post(path, json={**body, "stream": stream}), 400, param=param)
    assert "\n" not in error["message"]


# ------------------------------------------------------------------------------------ openai client


def test_openai_client_reads_logprobs(served: Served) -> None:
    import openai

    api = openai.OpenAI(base_url=f"{served.url}/v1", api_key="x", max_retries=0)
    messages = [{"role": "user", "content": "Hi"}]
    chat = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=3, temperature=0,
                                       logprobs=True, top_logprobs=2, n=2,
                                       extra_body={"ignore_eos": True})
    assert [c.index for c in chat.choices] == [0, 1] and chat.usage.completion_tokens == 6
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(c.top_logprobs) == 2 for c in content)
    assert content[0].top_logprobs[0].logprob == content[0].logprob  # greedy: the top-1
    assert bytes(content[0].bytes).decode("utf-8", errors="replace") == content[0].token

    streamed = [item for chunk in api.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=3, temperature=0, logprobs=True, top_logprobs=2,
        stream=True, extra_body={"ignore_eos": True})
        for choice in chunk.choices if choice.logprobs for item in choice.logprobs.content]
    assert [(s.token, s.logprob) for s in streamed] == [(c.token, c.logprob) for c in content]

    text = api.completions.create(model=MODEL, prompt="Hello world", max_tokens=2, temperature=0,
                                  logprobs=2, echo=True, extra_body={"ignore_eos": True})
    logprobs = text.choices[0].logprobs
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert len(logprobs.tokens) == text.usage.prompt_tokens + 2 == len(logprobs.text_offset)
    assert all(len(top) in (2, 3) for top in logprobs.top_logprobs[1:])
    assert text.choices[0].text.startswith("Hello world")
