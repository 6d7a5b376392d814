"""The playground page at /, driven end to end in headless Chromium (Playwright) against a real
server with an API key: the key field, the model name, the sampling controls, the streamed answer,
the tokens/s readout, the conversation history and the display of errors.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from live_server import live_server

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
MODEL = "tiny-playground"
KEY = "playground-key"

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="Chromium is not installed at /usr/bin/chromium (`make test` installs it with apt-get "
           "when run as root; elsewhere: apt-get install chromium)")


@pytest.fixture(scope="module")
def served_url(tiny_checkpoint_dir: Path) -> Iterator[str]:
    from server.app import create_app
    from server.settings import AppConfig
    from trellis_runtime.engine import Engine
    from trellis_runtime.model import load_model

    model, tokenizer = load_model(tiny_checkpoint_dir, "cpu")
    engine = Engine(model, tokenizer, max_batch=2, max_seq_len=256)
    with live_server(create_app(engine, tokenizer, MODEL, AppConfig(api_key=KEY))) as url:
        yield url


@pytest.fixture(scope="module")
def page(served_url: str) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(60_000)
            yield page
        finally:
            browser.close()


def send(page: Any, text: str) -> None:
    page.fill("#prompt", text)
    page.click("#send")
    page.wait_for_selector("body[data-state=idle]")


def test_chat_in_the_browser(page: Any, served_url: str) -> None:
    from playwright.sync_api import expect

    requests: list[dict[str, Any]] = []
    stream_types: list[str] = []
    page.on("request", lambda r: requests.append(json.loads(r.post_data))
            if r.url.endswith("/v1/chat/completions") else None)
    page.on("response", lambda r: stream_types.append(r.headers.get("content-type", ""))
            if r.url.endswith("/v1/chat/completions") else None)
    page.goto(served_url)

    # Without the key the server refuses, and the page says so.
    # (Waits use Playwright's locators: the page's Content-Security-Policy forbids eval.)
    expect(page.locator("#status")).to_contain_text("401")
    assert page.text_content("#model") == "?"
    page.fill("#api-key", KEY)
    page.dispatch_event("#api-key", "change")
    expect(page.locator("#model")).to_have_text(MODEL)
    expect(page.locator("#status")).to_have_text("")

    page.fill("#temperature", "0")
    page.fill("#top-p", "0.9")
    page.fill("#max-tokens", "12")
    page.fill("#seed", "7")
    send(page, "Hello there")
    (body,) = requests
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert (body["temperature"], body["top_p"], body["max_tokens"], body["seed"]) == (0, 0.9, 12, 7)
    assert body["messages"] == [{"role": "user", "content": "Hello there"}]
    assert stream_types[0].startswith("text/event-stream")

    # The streamed answer on the page is exactly the server's answer to the same request.
    reference = httpx.post(f"{served_url}/v1/chat/completions",
                           headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                           json={**body, "stream": False, "stream_options": None}).json()
    answer = reference["choices"][0]["message"]["content"]
    assert answer, "the tiny model stopped at once; pick another prompt"
    bubbles = page.locator(".message.assistant")
    assert bubbles.count() == 1 and bubbles.first.text_content() == answer
    speed = re.fullmatch(r"([0-9.]+) tokens/s", page.text_content("#speed"))
    assert speed is not None and float(speed.group(1)) > 0

    # The next turn carries the conversation so far.
    send(page, "And then?")
    assert requests[1]["messages"] == [{"role": "user", "content": "Hello there"},
                                       {"role": "assistant", "content": answer},
                                       {"role": "user", "content": "And then?"}]
    assert page.locator(".message.assistant").count() == 2

    # A request the server refuses shows its message, and the turn is given back for editing.
    page.fill("#max-tokens", "100000")
    send(page, "Too long")
    assert "context length" in page.text_content("#status")
    assert page.input_value("#prompt") == "Too long"
    assert page.locator(".message").count() == 4
