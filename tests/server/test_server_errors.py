"""Bad requests get OpenAI-format errors with the right status (never a 500), and the server keeps
serving; API keys; the bounded waiting queue (429)."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest
from live_server import TINY, TINY_ENGINE, start_server

from loom.server import ServerConfig

CHAT = {"model": TINY, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMPLETION = {"model": TINY, "prompt": "hi", "max_tokens": 2}
IMAGE_PART = {"type": "image_url", "image_url": {"url": "http://127.0.0.1/cat.png"}}


def assert_error(resp: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {**COMPLETION, "temperature": "hot"}, "temperature"),
        ("/v1/completions", {**COMPLETION, "max_tokens": "5"}, "max_tokens"),
        ("/v1/completions", {**COMPLETION, "prompt": [1, "a"]}, "prompt"),
        ("/v1/completions", {**COMPLETION, "stream": "yes"}, "stream"),
        ("/v1/completions", {**COMPLETION, "n": 1.5}, "n"),
        ("/v1/completions", {**COMPLETION, "temperature": -1}, "temperature"),
        ("/v1/completions", {**COMPLETION, "top_p": 1.5}, "top_p"),
        ("/v1/completions", {**COMPLETION, "n": 0}, "n"),
        ("/v1/completions", {**COMPLETION, "max_tokens": -1}, "max_tokens"),
        ("/v1/completions", {**COMPLETION, "logprobs": 21}, "logprobs"),
        ("/v1/completions", {**COMPLETION, "presence_penalty": 3}, "presence_penalty"),
        ("/v1/completions", {**COMPLETION, "stop": [""]}, "stop"),
        ("/v1/completions", {**COMPLETION, "logit_bias": {"five": 10}}, "logit_bias"),
        ("/v1/completions", {**COMPLETION, "suffix": "end"}, "suffix"),
        ("/v1/completions", {**COMPLETION, "prompt": []}, "prompt"),
        ("/v1/completions", {**COMPLETION, "prompt": [10**9]}, "prompt"),
        ("/v1/completions", {**COMPLETION, "prompt": [5] * 600}, "prompt"),  # longer than the context (512)
        ("/v1/completions", {**COMPLETION, "prompt": ["fine", [5] * 600]}, "prompt"),
        ("/v1/chat/completions", {"model": TINY}, "messages"),
        ("/v1/chat/completions", {**CHAT, "messages": []}, "messages"),
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, "messages"),
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": [IMAGE_PART]}]}, "messages"),
        ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, "top_logprobs"),
        ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 30}, "logprobs"),
        ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]}, "tools"),
        ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_schema"}}, "response_format"),
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "x" * 3000}]}, "messages"),
    ],
)
def test_bad_requests_are_400_in_openai_format(tiny_server, path, body, param):
    with tiny_server.http() as http:
        err = assert_error(http.post(path, json=body), 400, param)
    assert err["type"] == "invalid_request_error"


def test_invalid_json_and_wrong_body_type(tiny_server):
    with tiny_server.http() as http:
        assert "JSON" in assert_error(http.post("/v1/completions", content=b'{"model": "tiny", "prompt": ',
                                                headers={"content-type": "application/json"}), 400)["message"]
        assert_error(http.post("/v1/completions", json=["not", "an", "object"]), 400)
        assert_error(http.post("/v1/chat/completions", content=b"", headers={"content-type": "application/json"}), 400)


def test_unknown_model_is_404_and_unknown_routes_are_openai_errors(tiny_server):
    with tiny_server.http() as http:
        assert_error(http.post("/v1/completions", json={**COMPLETION, "model": "gpt-4"}), 404, "model", "model_not_found")
        assert_error(http.post("/v1/chat/completions", json={**CHAT, "model": "gpt-4"}), 404, "model", "model_not_found")
        assert_error(http.get("/v1/models/gpt-4"), 404, "model", "model_not_found")
        assert http.get("/v1/models/tiny-alias").json()["id"] == "tiny-alias"
        assert_error(http.get("/v1/nothing-here"), 404)
        assert_error(http.get("/v1/completions"), 405)
    with pytest.raises(openai.NotFoundError):
        tiny_server.client().completions.create(model="gpt-4", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        tiny_server.client().completions.create(model=TINY, prompt="x", temperature=-3)


def test_server_keeps_serving_after_errors(tiny_server):
    with tiny_server.http() as http:
        for _ in range(3):
            assert http.post("/v1/completions", json={**COMPLETION, "prompt": [10**9]}).status_code == 400
        r = http.post("/v1/completions", json=COMPLETION)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("length", "stop")
    tiny_server.wait_idle()


def test_api_key(tiny_path):
    srv = start_server(tiny_path, ServerConfig(served_model_names=(TINY,), api_key="s3cret"), **TINY_ENGINE)
    try:
        with srv.http() as http:
            assert_error(http.post("/v1/completions", json=COMPLETION), 401, code="invalid_api_key")
            assert_error(http.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401, code="invalid_api_key")
            assert_error(http.post("/tokenize", json={"prompt": "x"}), 401)
            assert http.get("/health").status_code == 200 and http.get("/metrics").status_code == 200
            assert http.head("/v1/models").status_code == 401 and http.head("/health").status_code == 200
            assert http.head("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        with pytest.raises(openai.AuthenticationError):
            srv.client(api_key="wrong").models.list()
        assert [m.id for m in srv.client(api_key="s3cret").models.list()] == [TINY]
        assert srv.client(api_key="s3cret").completions.create(model=TINY, prompt="x", max_tokens=1).choices
    finally:
        srv.stop()


async def _until(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def test_full_waiting_queue_answers_429(tiny_path):
    """One request runs (max_num_seqs=1), two wait (max_waiting=2): the next is turned away at
    once with 429 and a Retry-After, and the queued ones still complete."""
    options = {**TINY_ENGINE, "max_num_seqs": 1, "max_waiting": 2}
    srv = start_server(tiny_path, ServerConfig(served_model_names=(TINY,)), **options)
    stats = srv.engine.stats
    hold = {**COMPLETION, "max_tokens": 400, "ignore_eos": True}  # keeps the only running slot busy
    short = {**COMPLETION, "max_tokens": 8, "ignore_eos": True}

    async def scenario() -> list[int]:
        async with httpx.AsyncClient(base_url=srv.base_url, timeout=60) as http:
            first = asyncio.create_task(http.post("/v1/completions", json=hold))
            await _until(lambda: stats().num_running == 1)
            queued = [asyncio.create_task(http.post("/v1/completions", json=short)) for _ in range(2)]
            await _until(lambda: stats().num_waiting == 2)
            rejected = await http.post("/v1/completions", json=COMPLETION)
            err = assert_error(rejected, 429, code="queue_full")
            assert "max_waiting=2" in err["message"] and rejected.headers["retry-after"] == "1"
            return [r.status_code for r in await asyncio.gather(first, *queued)]

    async def sdk_view() -> None:
        client = srv.async_client()
        first = asyncio.create_task(client.completions.create(prompt="x", model=TINY, max_tokens=400,
                                                              extra_body={"ignore_eos": True}))
        await _until(lambda: stats().num_running == 1)
        queued = [asyncio.create_task(client.completions.create(model=TINY, prompt="x", max_tokens=8)) for _ in range(2)]
        await _until(lambda: stats().num_waiting == 2)
        try:
            with pytest.raises(openai.RateLimitError):
                await client.completions.create(model=TINY, prompt="x", max_tokens=1)
        finally:
            for t in (first, *queued):  # hang up: the server aborts them
                t.cancel()
            await asyncio.gather(first, *queued, return_exceptions=True)

    try:
        assert asyncio.run(scenario()) == [200, 200, 200]
        asyncio.run(sdk_view())
        srv.wait_idle()
    finally:
        srv.stop()


def test_a_failed_engine_answers_503_not_500(tiny_path):
    srv = start_server(tiny_path, ServerConfig(served_model_names=(TINY,)), **TINY_ENGINE)

    def broken_step():
        raise RuntimeError("simulated engine bug")

    srv.engine.engine.step = broken_step  # the engine thread is idle: it reads this on the next request
    try:
        with srv.http() as http:
            assert_error(http.post("/v1/completions", json=COMPLETION), 503, code="engine_unavailable")
            assert_error(http.post("/v1/chat/completions", json={**CHAT, "stream": True}), 503)
            assert_error(http.get("/health"), 503)
    finally:
        srv.stop()
