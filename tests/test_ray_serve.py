"""`trellis serve --ray` as a user runs it: a local Ray cluster started by the server (or a running
one it joins), engine replicas behind the ingress, real sockets, the official openai client; a
replica killed under load; and autoscaling watched through Ray's own state API."""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import httpx
import openai
import pytest
import ray
from ray import serve

from server.ray_deployments import APP_NAME, ENGINE_DEPLOYMENT
from processes import pids_titled
from trellis_cli.serve_process import ServeProcess, free_port

MODEL = "tiny"
MAX_WAITING = 4  # of the two-replica cluster: 2 x 8 batch slots run, 4 more wait, then 429
PROMPT = "The history of the river valley begins with"
# Ray's process title of an engine replica, as `ps` shows it.
ENGINE_TITLE = f"ray::ServeReplica:{APP_NAME}:{ENGINE_DEPLOYMENT}"


def engine_pids() -> set[int]:
    return pids_titled(ENGINE_TITLE)


class RayServer:
    """`trellis serve --ray` on the tiny checkpoint, its stderr kept for the replicas' logs."""

    def __init__(self, checkpoint: Path, *flags: str) -> None:
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log")
        self.process = ServeProcess([str(checkpoint), "--served-model-name", MODEL, "--ray",
                                     *flags], timeout_s=300, stderr=self.log)
        self.url = self.process.url

    def stderr(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def stop(self) -> int:
        try:
            return self.process.stop(timeout_s=120)
        finally:
            self.log.close()


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="class")
def plain(tiny_checkpoint_dir: Path) -> Iterator[str]:
    """Plain `trellis serve` of the same checkpoint, to compare answers with."""
    server = ServeProcess([str(tiny_checkpoint_dir), "--served-model-name", MODEL], timeout_s=120)
    yield server.url
    server.stop()


@pytest.fixture(scope="class")
def ray_server(tiny_checkpoint_dir: Path) -> Iterator[RayServer]:
    """Two fixed replicas, one CPU each; for one class of tests, so that no other Ray cluster of
    this module runs beside it."""
    server = RayServer(tiny_checkpoint_dir, "--replicas", "2", "--replica-cpus", "1",
                       "--max-waiting", str(MAX_WAITING))
    yield server
    assert server.stop() == 0  # SIGTERM drained it; the process exits cleanly


class TestTwoReplicas:
    """Two fixed replicas, one CPU each, against plain `trellis serve` of the same checkpoint."""

    def test_openai_client_gets_the_same_answers(self, plain: str, ray_server: RayServer) -> None:
        ours, theirs = client(ray_server.url), client(plain)
        chat = dict(model=MODEL, messages=[{"role": "user", "content": "Say hello"}],
                    max_tokens=12, temperature=0)
        answer = ours.chat.completions.create(**chat).choices[0].message.content
        assert answer == theirs.chat.completions.create(**chat).choices[0].message.content
        streamed = "".join(chunk.choices[0].delta.content or ""
                           for chunk in ours.chat.completions.create(**chat, stream=True)
                           if chunk.choices)
        assert streamed == answer

        completion = dict(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0, logprobs=2)
        mine = ours.completions.create(**completion).choices[0]
        reference = theirs.completions.create(**completion).choices[0]
        assert mine.text == reference.text
        assert mine.logprobs.tokens == reference.logprobs.tokens
        assert mine.logprobs.token_logprobs == pytest.approx(reference.logprobs.token_logprobs,
                                                             abs=1e-3)
        pieces = [chunk.choices[0].text for chunk in
                  ours.completions.create(**completion, stream=True) if chunk.choices]
        assert "".join(pieces) == reference.text

        several = ours.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, n=3,
                                          temperature=1.0, seed=7)
        assert sorted(choice.index for choice in several.choices) == [0, 1, 2]
        assert several.usage.completion_tokens == 18

    def test_errors_have_the_same_status_and_code(self, plain: str, ray_server: RayServer
                                                  ) -> None:
        cases = [dict(model="missing", prompt="x", max_tokens=2),
                 dict(model=MODEL, prompt="word " * 2000, max_tokens=2),
                 dict(model=MODEL, prompt="x", max_tokens=2, temperature=-1)]
        for case in cases:
            failures = []
            for url in (ray_server.url, plain):
                with pytest.raises(openai.APIStatusError) as caught:
                    client(url).completions.create(**case)
                failures.append((caught.value.status_code, caught.value.body.get("code")))
            assert failures[0] == failures[1], case
            assert 400 <= failures[0][0] < 500

    def test_the_queue_bound_is_the_whole_clusters(self, ray_server: RayServer) -> None:
        capacity = 2 * 8 + MAX_WAITING

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=ray_server.url, timeout=120,
                                         limits=httpx.Limits(max_connections=64)) as http:
                body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 300, "ignore_eos": True}
                return await asyncio.gather(*[http.post("/v1/completions", json=body)
                                              for _ in range(capacity + 6)])

        replies = asyncio.run(burst())
        refused = [reply for reply in replies if reply.status_code == 429]
        assert len(refused) >= 6 and all(r.headers["retry-after"] == "1" for r in refused)
        assert refused[0].json()["error"]["code"] == "server_overloaded"
        assert sum(reply.status_code == 200 for reply in replies) >= 2 * 8  # both replicas ran

    def test_a_killed_replica_ends_its_streams_and_comes_back(self, ray_server: RayServer
                                                              ) -> None:
        before = engine_pids()
        assert len(before) == 2

        async def one_stream(http: httpx.AsyncClient) -> str:
            """'done' (finished, [DONE]), 'error' (an error event or status), never a hang."""
            body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 900, "ignore_eos": True,
                    "temperature": 0, "stream": True}
            async with http.stream("POST", "/v1/completions", json=body) as response:
                if response.status_code != 200:
                    return "error"
                finished = errored = done = False
                async for line in response.aiter_lines():
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: "):
                        chunk = json.loads(line[6:])
                        errored |= "error" in chunk
                        finished |= any(c["finish_reason"] for c in chunk.get("choices", []))
                return "done" if done and finished and not errored else "error"

        async def load_and_kill() -> list[str]:
            async with httpx.AsyncClient(base_url=ray_server.url, timeout=120) as http:
                streams = [asyncio.ensure_future(one_stream(http)) for _ in range(16)]
                await asyncio.sleep(1.5)  # every stream is running on one replica or the other
                os.kill(min(before), signal.SIGKILL)
                return await asyncio.wait_for(asyncio.gather(*streams), timeout=120)

        outcomes = asyncio.run(load_and_kill())
        assert "error" in outcomes  # the killed replica's streams ended, and said so
        assert "done" in outcomes  # the other replica's streams were not disturbed
        with httpx.Client(base_url=ray_server.url, timeout=60) as http:
            for _ in range(8):  # every new request after the kill is answered
                reply = http.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT,
                                                           "max_tokens": 4})
                assert reply.status_code == 200, reply.text
            deadline = time.monotonic() + 120
            while not (engine_pids() - before) and time.monotonic() < deadline:
                time.sleep(1)
            [replacement] = engine_pids() - before  # Ray started a new replica
            served = re.compile(rf"\(ServeReplica:{APP_NAME}:{ENGINE_DEPLOYMENT} "
                                rf"pid={replacement}\).*CALL generate OK")
            while not served.search(ray_server.stderr()) and time.monotonic() < deadline:
                http.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT,
                                                   "max_tokens": 4})
            assert served.search(ray_server.stderr()), "the new replica never served"


def running_replicas() -> int:
    deployment = serve.status().applications[APP_NAME].deployments[ENGINE_DEPLOYMENT]
    return deployment.replica_states.get("RUNNING", 0)


def test_load_scales_out_to_two_replicas_and_back(tiny_checkpoint_dir: Path) -> None:
    # Two batch slots per replica, so autoscaling aims at one request each; short delays.
    server = RayServer(tiny_checkpoint_dir, "--min-replicas", "1", "--max-replicas", "2",
                       "--replica-cpus", "1", "--max-batch", "2", "--upscale-delay", "1",
                       "--downscale-delay", "2")
    ray.init(address="auto")  # the cluster the server started: observed through Ray's state API
    try:
        assert running_replicas() == 1

        async def load_until_two() -> bool:
            body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 200, "ignore_eos": True}
            async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline:
                    replies = await asyncio.gather(*[http.post("/v1/completions", json=body)
                                                     for _ in range(4)])
                    assert all(reply.status_code == 200 for reply in replies)
                    if running_replicas() == 2:
                        return True
            return False

        assert asyncio.run(load_until_two()), "sustained load never scaled out"
        deadline = time.monotonic() + 120
        while running_replicas() != 1 and time.monotonic() < deadline:
            time.sleep(1)
        assert running_replicas() == 1, "the idle deployment never scaled back in"
    finally:
        ray.shutdown()
        assert server.stop() == 0


def test_joins_a_running_cluster_and_leaves_it_running(tiny_checkpoint_dir: Path) -> None:
    """--ray-address: the server deploys onto a cluster it did not start, and on SIGTERM removes
    only its application. Token authentication is on, as Ray's defaults have it."""
    port = free_port()
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    head = subprocess.Popen([sys.executable, "-m", "ray.scripts.scripts", "start", "--head",
                             "--block", f"--port={port}", "--num-cpus=2",
                             "--include-dashboard=false", "--disable-usage-stats"],
                            env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        server = ServeProcess([str(tiny_checkpoint_dir), "--served-model-name", MODEL, "--ray",
                               "--ray-address", f"127.0.0.1:{port}"], timeout_s=300, env=env)
        reply = httpx.post(f"{server.url}/v1/completions", timeout=60,
                           json={"model": MODEL, "prompt": PROMPT, "max_tokens": 4})
        assert reply.status_code == 200, reply.text
        assert server.stop() == 0
        assert head.poll() is None  # the cluster is not the server's to stop
        assert not engine_pids()  # but its replicas are gone with its application
    finally:
        head.send_signal(signal.SIGTERM)
        head.wait(timeout=60)
