"""Operating the server: metrics, admission control, body limit, API keys, request ids and the
access log, configuration, and SIGTERM draining. Every test talks to a real uvicorn over a socket
(an app in a thread, or `trellis serve` as a process) running the tiny quantized checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from live_server import live_server
from trellis_cli.serve_process import ServeProcess

MODEL = "tiny-ops"


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint_dir: Path) -> tuple[Any, Any]:
    from trellis_runtime.model import load_model

    return load_model(tiny_checkpoint_dir, "cpu")


@contextmanager
def serving(loaded: tuple[Any, Any], max_batch: int = 4, max_seq_len: int = 1024,
            **config: Any) -> Iterator[tuple[str, Any]]:
    """(base URL, engine) of a fresh app with AppConfig(**config)."""
    from server.app import create_app
    from server.settings import AppConfig
    from trellis_runtime.engine import Engine

    model, tokenizer = loaded
    engine = Engine(model, tokenizer, max_batch=max_batch, max_seq_len=max_seq_len)
    with live_server(create_app(engine, tokenizer, MODEL, AppConfig(**config))) as url:
        yield url, engine


def completion(max_tokens: int = 4, **extra: Any) -> dict[str, Any]:
    return {"prompt": "The river flows", "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, **extra}


def samples(url: str, **headers: str) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics as {(name, sorted labels): value}."""
    response = httpx.get(f"{url}/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def assert_openai_error(response: httpx.Response, status: int, code: str | None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == code and body["error"]["message"]
    return body["error"]


def first_event(lines: Iterator[str]) -> dict[str, Any]:
    """The next event of a stream's lines. Keep the iterator: dropping it closes the connection."""
    for line in lines:
        if line.startswith("data: "):
            return json.loads(line[6:])
    raise AssertionError("the stream ended without an event")


def read_stream(lines: Iterator[str]) -> tuple[str, list[dict[str, Any]], bool]:
    """(joined text, every JSON event, whether it ended with [DONE]) of the rest of a stream."""
    events, done = [], False
    for line in lines:
        if line == "data: [DONE]":
            done = True
        elif line.startswith("data: "):
            events.append(json.loads(line[6:]))
    text = "".join(e["choices"][0].get("text", "") for e in events if e.get("choices"))
    return text, events, done


# ------------------------------------------------------------------------------------ metrics


def test_metrics_count_requests_tokens_and_latencies(loaded: tuple[Any, Any]) -> None:
    with serving(loaded) as (url, _):
        with httpx.Client(base_url=url, timeout=60) as client:
            whole = client.post("/v1/completions", json=completion(5)).json()
            streamed = client.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}})
            usage_chunk = json.loads(streamed.text.split("\n\n")[-3][len("data: "):])
            assert client.post("/v1/completions", json=completion(temperature=-1)).status_code == 400
            scored = client.post("/v1/completions", json=completion(0, echo=True, logprobs=1))
            assert scored.status_code == 200 and scored.json()["usage"]["completion_tokens"] == 0
        metrics = samples(url)
    usages = [whole["usage"], usage_chunk["usage"], scored.json()["usage"]]

    def http(endpoint: str, method: str, status: str) -> float:
        key = (("endpoint", endpoint), ("method", method), ("status", status))
        return metrics[("trellis:http_requests_total", key)]

    assert http("/v1/completions", "POST", "200") == 2
    assert http("/v1/chat/completions", "POST", "200") == 1
    assert http("/v1/completions", "POST", "400") == 1
    assert metrics[("trellis:prompt_tokens_total", ())] == sum(u["prompt_tokens"] for u in usages)
    assert metrics[("trellis:generation_tokens_total", ())] == 5 + 3
    assert metrics[("trellis:time_to_first_token_seconds_count", ())] == 2
    assert metrics[("trellis:time_to_first_token_seconds_sum", ())] > 0
    assert metrics[("trellis:inter_token_latency_seconds_count", ())] == (5 - 1) + (3 - 1)
    assert metrics[("trellis:e2e_request_latency_seconds_count", ())] == 3
    assert metrics[("trellis:request_finished_total", (("finished_reason", "length"),))] == 3
    for gauge in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
        assert metrics[(f"trellis:{gauge}", ())] == 0


def test_two_apps_in_one_process_keep_separate_metrics(loaded: tuple[Any, Any]) -> None:
    with serving(loaded) as (first, _), serving(loaded) as (second, _):
        httpx.post(f"{first}/v1/completions", json=completion(2), timeout=60)
        key = ("trellis:generation_tokens_total", ())
        assert samples(first)[key] == 2 and samples(second)[key] == 0


# ------------------------------------------------------------------------------------ admission


def test_queue_bound_gives_429_and_waiting_requests_complete(loaded: tuple[Any, Any]) -> None:
    """One slot, one waiting place: a third request is refused at once; the waiting one runs to
    the same text it gets alone; the 400 for a request that can never fit is unaffected."""
    with serving(loaded, max_batch=1, max_seq_len=1024, max_waiting=1) as (url, engine):
        with httpx.Client(base_url=url, timeout=60) as a, httpx.Client(base_url=url,
                                                                        timeout=60) as b:
            alone = a.post("/v1/completions", json=completion(6)).json()["choices"][0]["text"]
            with a.stream("POST", "/v1/completions",
                          json=completion(1000, stream=True)) as running:
                first_event(running_lines := running.iter_lines())
                with b.stream("POST", "/v1/completions",
                              json=completion(6, stream=True)) as waiting:
                    deadline = time.monotonic() + 10
                    while engine.stats()["waiting"] < 1 and time.monotonic() < deadline:
                        time.sleep(0.01)
                    gauges = samples(url)
                    assert gauges[("trellis:num_requests_waiting", ())] == 1
                    assert gauges[("trellis:num_requests_running", ())] == 1
                    assert gauges[("trellis:kv_cache_usage_perc", ())] == 1.0
                    refused = httpx.post(f"{url}/v1/completions", json=completion(2))
                    error = assert_openai_error(refused, 429, "server_overloaded")
                    assert error["type"] == "rate_limit_error"
                    assert refused.headers["retry-after"] == "1"
                    never_fits = httpx.post(f"{url}/v1/chat/completions", json={
                        "messages": [{"role": "user", "content": "x"}], "max_tokens": 5000})
                    # The queue is full, so even this is a 429: admission comes first.
                    assert never_fits.status_code == 429
                    running_lines.close()  # the client leaves: its slot goes to the waiting one
                    text, events, done = read_stream(waiting.iter_lines())
            assert done and text == alone
            assert events[-1]["choices"][0]["finish_reason"] == "length"
            after = httpx.post(f"{url}/v1/completions", json=completion(2), timeout=60)
            assert after.status_code == 200
            never_fits = httpx.post(f"{url}/v1/completions", json=completion(5000))
            assert_openai_error(never_fits, 400, "context_length_exceeded")


def test_models_card_reports_limits(loaded: tuple[Any, Any]) -> None:
    with serving(loaded, max_batch=3, max_seq_len=256, max_waiting=7,
                 max_body_bytes=12345) as (url, _):
        (card,) = httpx.get(f"{url}/v1/models").json()["data"]
    assert card["id"] == MODEL
    assert (card["max_model_len"], card["max_num_seqs"], card["max_waiting"],
            card["max_body_bytes"]) == (256, 3, 7, 12345)


def test_body_limit_gives_413(loaded: tuple[Any, Any]) -> None:
    limit = 2048
    json_type = {"Content-Type": "application/json"}
    with serving(loaded, max_body_bytes=limit) as (url, _):
        small = json.dumps(completion(2)).encode()
        padded = json.dumps(completion(2, user="u" * (limit - len(small) - 20))).encode()
        assert len(padded) <= limit
        assert httpx.post(f"{url}/v1/completions", content=padded, headers=json_type,
                          timeout=60).status_code == 200
        big = json.dumps(completion(2, user="u" * limit)).encode()
        error = assert_openai_error(httpx.post(f"{url}/v1/completions", content=big), 413,
                                    "request_too_large")
        assert str(len(big)) in error["message"] and str(limit) in error["message"]

        def chunked(body: bytes) -> Iterator[bytes]:  # no Content-Length: transfer-encoding chunked
            for start in range(0, len(body), 500):
                yield body[start:start + 500]

        assert_openai_error(httpx.post(f"{url}/v1/completions", content=chunked(big)), 413,
                            "request_too_large")
        fits = httpx.post(f"{url}/v1/completions", content=chunked(padded), headers=json_type,
                          timeout=60)
        assert fits.status_code == 200 and fits.json()["usage"]["completion_tokens"] == 2


# ------------------------------------------------------------------------------------ API keys


def test_api_key(loaded: tuple[Any, Any]) -> None:
    import openai

    with serving(loaded, api_key="s3cret-key") as (url, _):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-key"},
                        {"Authorization": "Basic s3cret-key"}):
            refused = httpx.get(f"{url}/v1/models", headers=headers)
            assert_openai_error(refused, 401, "invalid_api_key")
            assert refused.headers["www-authenticate"] == "Bearer"
        assert_openai_error(httpx.post(f"{url}/v1/completions", json=completion(2)), 401,
                            "invalid_api_key")
        for scheme in ("Bearer", "bearer"):
            assert httpx.get(f"{url}/v1/models",
                             headers={"Authorization": f"{scheme} s3cret-key"}).status_code == 200
        for open_path in ("/health", "/ready", "/metrics", "/"):
            assert httpx.get(f"{url}{open_path}").status_code == 200, open_path

        good = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret-key", max_retries=0)
        reply = good.completions.create(model=MODEL, prompt="Hi", max_tokens=2,
                                        extra_body={"ignore_eos": True})
        assert reply.usage.completion_tokens == 2
        bad = openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as info:
            bad.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
        assert info.value.code == "invalid_api_key"

    with serving(loaded, api_key="k", protect_probes=True) as (url, _):
        for probe in ("/health", "/ready", "/metrics"):
            assert_openai_error(httpx.get(f"{url}{probe}"), 401, "invalid_api_key")
            assert httpx.get(f"{url}{probe}", headers={"Authorization": "Bearer k"}).status_code == 200
        assert httpx.get(f"{url}/").status_code == 200  # the page asks for the key itself


# ------------------------------------------------------------------------------------ request ids


def test_request_id_and_access_log(loaded: tuple[Any, Any],
                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="trellis.access")
    with serving(loaded, api_key="k") as (url, _):
        auth = {"Authorization": "Bearer k"}
        given = httpx.post(f"{url}/v1/completions", json=completion(3, stream=True),
                           headers={**auth, "X-Request-Id": "trace-42.a"}, timeout=60)
        made = httpx.post(f"{url}/v1/completions", json=completion(2), headers=auth, timeout=60)
        unsafe = httpx.get(f"{url}/health", headers={"X-Request-Id": "bad id\twith space"})
        refused = httpx.get(f"{url}/v1/models")
    assert given.headers["x-request-id"] == "trace-42.a"
    for response in (made, unsafe, refused):
        assert len(response.headers["x-request-id"]) == 32
        int(response.headers["x-request-id"], 16)
    lines = {}
    for record in caplog.records:
        if record.name == "trellis.access":
            line = json.loads(record.getMessage())
            assert line == record.access
            assert line["request_id"] not in lines, "one line per request"
            lines[line["request_id"]] = line
    streamed = lines["trace-42.a"]
    assert streamed["method"] == "POST" and streamed["path"] == "/v1/completions"
    assert streamed["status"] == 200 and streamed["completion_tokens"] == 3
    assert streamed["prompt_tokens"] == len(loaded[1].encode("The river flows"))
    assert 0 < streamed["ttft_s"] <= streamed["duration_s"]
    usage = made.json()["usage"]
    whole = lines[made.headers["x-request-id"]]
    assert (whole["prompt_tokens"], whole["completion_tokens"]) == (usage["prompt_tokens"], 2)
    probe = lines[unsafe.headers["x-request-id"]]
    assert probe["path"] == "/health" and probe["completion_tokens"] is None
    assert lines[refused.headers["x-request-id"]]["status"] == 401


# ------------------------------------------------------------------------------------ settings


def test_settings_flags_over_environment_over_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    from server.settings import ServerSettings, add_arguments, settings_from_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    for name in ServerSettings.model_fields:
        if name != "model":
            assert f"--{name.replace('_', '-')}" in parser.format_help()
        assert f"TRELLIS_{name.upper()}" in parser.format_help()
    monkeypatch.setenv("TRELLIS_MAX_WAITING", "5")
    monkeypatch.setenv("TRELLIS_API_KEY", "from-env")
    monkeypatch.setenv("TRELLIS_ACCESS_LOG", "false")
    settings = settings_from_arguments(parser.parse_args(["--max-waiting", "9", "ckpt"]))
    assert settings.max_waiting == 9 and settings.model == "ckpt"
    assert settings.api_key.get_secret_value() == "from-env" and settings.access_log is False
    assert settings.port == 8000 and settings.host == "127.0.0.1"
    assert settings.app_config().max_waiting == 9
    monkeypatch.setenv("TRELLIS_API_KEY", "")
    with pytest.raises(ValueError, match="TRELLIS_API_KEY.*set but empty"):
        settings_from_arguments(parser.parse_args([]))
    monkeypatch.delenv("TRELLIS_API_KEY")
    assert settings_from_arguments(parser.parse_args([])).api_key is None
    monkeypatch.setenv("TRELLIS_DRAIN_TIMEOUT", "-1")
    with pytest.raises(ValueError, match="drain_timeout"):
        settings_from_arguments(parser.parse_args([]))


def test_serve_rejects_a_bad_setting_in_one_line() -> None:
    result = subprocess.run([sys.executable, "-m", "trellis_cli", "serve"],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "TRELLIS_MAX_WAITING": "lots"})
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("trellis: error: ")
    assert "TRELLIS_MAX_WAITING" in result.stderr


# ------------------------------------------------------------------------------------ draining


def test_sigterm_drains_streams_then_exits_zero(tiny_checkpoint_dir: Path) -> None:
    """8 live streams, SIGTERM mid-way: /ready turns 503, new requests get 503, every stream still
    ends with its complete text and [DONE], and the process exits 0."""
    server = ServeProcess([str(tiny_checkpoint_dir), "--max-batch", "8", "--drain-timeout", "120"],
                          timeout_s=120, stderr=subprocess.PIPE)
    process, url = server.process, server.url
    body = completion(400, stream=True)
    try:
        expected = httpx.post(f"{url}/v1/completions", json={**body, "stream": False},
                              timeout=120).json()["choices"][0]["text"]
        started = threading.Barrier(9)
        results: list[Any] = [None] * 8

        def stream(i: int) -> None:
            with httpx.Client(timeout=120) as client:
                with client.stream("POST", f"{url}/v1/completions", json=body) as response:
                    lines = response.iter_lines()
                    head = first_event(lines)
                    started.wait()
                    text, events, done = read_stream(lines)
                    results[i] = (head["choices"][0]["text"] + text, events, done)

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        started.wait(timeout=60)
        process.send_signal(signal.SIGTERM)
        deadline = time.time() + 10
        while httpx.get(f"{url}/ready").status_code == 200:
            assert time.time() < deadline, "/ready did not turn 503"
            time.sleep(0.02)
        assert_openai_error(httpx.get(f"{url}/ready"), 503, "server_shutting_down")
        refused = httpx.post(f"{url}/v1/completions", json=completion(2))
        assert_openai_error(refused, 503, "server_shutting_down")
        assert refused.headers["retry-after"] == "1"
        assert any(thread.is_alive() for thread in threads), "streams ended before the checks"
        for thread in threads:
            thread.join(timeout=120)
        assert process.wait(timeout=60) == 0, process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    for text, events, done in results:
        assert done and text == expected
        assert events[-1]["choices"][0]["finish_reason"] == "length"
    log = process.stderr.read()
    assert "draining" in log and "drained" in log
