"""Property-based conformance: schemathesis generates requests from OpenAI's spec (the subset with
completions, chat and models), valid ones and invalid ones, and sends them to a live server.

Checks run: ``not_a_server_error`` (no 5xx, whatever the input) and ``response_schema_conformance``
(a successful response matches the spec). Checks left out, on purpose:

- ``status_code_conformance``: the spec documents only 200 and 429; our 400/401/404 errors are
  what OpenAI really answers, but the spec does not list them.
- ``positive_data_acceptance``: the spec allows what we refuse with a clear 400 (``logit_bias``
  keys that are not token ids, ``suffix`` on a model without FIM tokens, streamed ``best_of > n``,
  the legacy ``functions``, schemas the grammar compiler refuses, non-text content, prompts longer
  than the context).
- ``negative_data_rejection``: we are lenient on purpose (unknown fields are ignored, ``model``
  may be omitted, vLLM extras are accepted).
- ``content_type_conformance``: streamed answers are ``text/event-stream``, which the spec does
  not declare.

The generated ``model`` is replaced by the served name (otherwise nearly every request is a 404
and nothing else gets exercised). Legacy logprobs with ``echo`` start with ``null`` for the first
prompt token, as OpenAI and vLLM send them, while the spec types those entries as numbers: such
responses are checked against the spec with that leading ``null`` set aside.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from live_server import TINY, TINY_ENGINE, LiveServer, start_server
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error, response_schema_conformance
from server_spec import SUBSET, available, spec_errors

from loom.server import ServerConfig

pytestmark = pytest.mark.skipif(not available(), reason="the OpenAI spec is not in shared/")

# (path, method, examples per generation mode)
OPERATIONS = [
    ("/completions", "POST", 40),
    ("/chat/completions", "POST", 40),
    ("/models", "GET", 5),
    ("/models/{model}", "GET", 10),
]


@pytest.fixture(scope="module")
def server(tiny_path) -> Iterator[LiveServer]:
    # A short context bounds the work of any generated request (n up to 128, any max_tokens).
    options = {**TINY_ENGINE, "max_model_len": 64, "num_blocks": 1024}
    srv = start_server(tiny_path, ServerConfig(served_model_names=(TINY,)), **options)
    yield srv
    srv.stop()


def _echoed_logprobs(case: Any) -> bool:
    body = case.body if isinstance(case.body, dict) else {}
    return bool(body.get("echo")) and body.get("logprobs") is not None


def _without_first_prompt_entry(body: dict[str, Any]) -> dict[str, Any]:
    body = copy.deepcopy(body)
    for choice in body["choices"]:
        lp = choice["logprobs"]
        if lp and lp["token_logprobs"] and lp["token_logprobs"][0] is None:
            for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                del lp[key][0]
    return body


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
@pytest.mark.parametrize(("path", "method", "examples"), OPERATIONS, ids=[f"{m} {p}" for p, m, _ in OPERATIONS])
def test_openapi_conformance(server, path, method, examples, mode):
    operation = schemathesis.openapi.from_path(SUBSET)[path][method]
    statuses: list[int] = []

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case: Any) -> None:
        if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
            case.body["model"] = TINY
        if case.path_parameters and "model" in case.path_parameters:
            case.path_parameters["model"] = TINY
        response = case.call(base_url=server.base_url + "/v1", timeout=60)
        statuses.append(response.status_code)
        if response.status_code == 200 and _echoed_logprobs(case) and not case.body.get("stream"):
            case.validate_response(response, checks=[not_a_server_error])
            assert spec_errors("CreateCompletionResponse", _without_first_prompt_entry(response.json())) == []
        else:
            case.validate_response(response, checks=[not_a_server_error, response_schema_conformance])

    check()
    assert 200 in statuses  # the run exercised successful responses, not only rejections
    server.wait_idle()
