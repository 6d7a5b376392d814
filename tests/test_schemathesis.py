"""Property-based API testing with schemathesis against the app's own /openapi.json, served over a
real socket by the tiny checkpoint: generated requests for every operation must never get a 5xx,
and every answer must match what the schema declares (status, content type, headers, body).

Examples are bounded and derandomized so the run is reproducible and stays well under a minute; the
small context keeps every generated completion short.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance,
                                               response_headers_conformance,
                                               response_schema_conformance,
                                               status_code_conformance)

from live_server import live_server

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance]
# Requests that must succeed, checked against the schema too: generated bodies rarely hit every
# success path (a streamed answer, each prompt form, the served model by name).
SUCCESSES: dict[str, list[dict[str, Any]]] = {
    "POST /v1/completions": [
        {"prompt": "Hello", "max_tokens": 3},
        {"prompt": ["Hello"], "max_tokens": 3, "model": "tiny-schema", "temperature": 0},
        {"prompt": [1, 2, 3], "max_tokens": 2, "stream": True},
        {"prompt": "Hi", "max_tokens": 2, "stream": True, "stream_options": {"include_usage": True}}],
    "POST /v1/chat/completions": [
        {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3},
        {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "stream": True}],
}


@pytest.fixture(scope="module")
def served_url(tiny_checkpoint_dir: Path) -> Iterator[str]:
    from server.app import create_app
    from trellis_runtime.engine import Engine
    from trellis_runtime.model import load_model

    model, tokenizer = load_model(tiny_checkpoint_dir, "cpu")
    engine = Engine(model, tokenizer, max_batch=4, max_seq_len=64)
    with live_server(create_app(engine, tokenizer, "tiny-schema")) as url:
        yield url


def test_api_conforms_to_its_schema(served_url: str) -> None:
    """Every operation of /openapi.json, each with its own bounded, derandomized run."""
    api = schemathesis.openapi.from_url(f"{served_url}/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]
    assert {op.label for op in operations} >= {
        "GET /health", "GET /ready", "GET /metrics", "GET /v1/models",
        "GET /v1/models/{model_id}", "POST /v1/completions", "POST /v1/chat/completions"}
    for operation in operations:
        for body in SUCCESSES.get(operation.label, []):
            response = operation.Case(body=body).call_and_validate(checks=CHECKS, timeout=60)
            assert response.status_code == 200, response.text
        # Generation routes get more examples: their request bodies are where the variety is.
        examples = 40 if operation.method.upper() == "POST" else 10

        @given(case=operation.as_strategy())
        @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def conforms(case: Any) -> None:
            case.call_and_validate(checks=CHECKS, timeout=60)

        conforms()
