"""``suffix`` on /v1/completions: fill-in-the-middle prompts for a model whose vocabulary has FIM
tokens, a 400 naming the problem for one without."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from live_server import TINY, TINY_ENGINE, LiveServer, start_server

from loom.server import ServerConfig
from tests.tiny_models import FIM_TOKENS, make_tiny_fim_model


@pytest.fixture(scope="module")
def fim_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    srv = start_server(make_tiny_fim_model(tmp_path_factory.mktemp("tiny-fim")), ServerConfig(served_model_names=(TINY,)),
                       **TINY_ENGINE)
    yield srv
    srv.stop()


def test_suffix_builds_a_fim_prompt(fim_server, monkeypatch):
    seen = []
    generate = fim_server.engine.generate

    def spy(prompt, params, request_id=None, **kwargs):
        seen.append(prompt)
        return generate(prompt, params, request_id, **kwargs)

    monkeypatch.setattr(fim_server.engine, "generate", spy)
    tok = fim_server.engine.tokenizer
    pre, suf, mid = (tok.backend.token_to_id(t) for t in FIM_TOKENS)
    before, after = "def add(a, b):\n    ", "\n    return c\n"
    client = fim_server.client()
    r = client.completions.create(model=TINY, prompt=before, suffix=after, max_tokens=4, temperature=0,
                                  extra_body={"ignore_eos": True})
    tail = tok.encode(after, add_special_tokens=False)
    assert seen == [[pre, *tok.encode(before, add_special_tokens=False), suf, *tail, mid]]
    assert r.usage.prompt_tokens == len(seen[0]) and r.usage.completion_tokens == 4
    client.completions.create(model=TINY, prompt=[[7, 8], [9]], suffix=after, max_tokens=1)  # token-id prefixes
    client.completions.create(model=TINY, prompt="", suffix=after, max_tokens=1)  # nothing before the gap
    assert seen[1:] == [[pre, 7, 8, suf, *tail, mid], [pre, 9, suf, *tail, mid], [pre, suf, *tail, mid]]
    with fim_server.http() as http:
        resp = http.post("/v1/completions", json={"prompt": "x", "suffix": "y", "echo": True})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "echo"


def test_a_model_without_fim_tokens_answers_400(tiny_server):
    with tiny_server.http() as http:
        resp = http.post("/v1/completions", json={"model": TINY, "prompt": "def f(", "suffix": ")", "max_tokens": 2})
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["param"] == "suffix" and "FIM tokens" in error["message"] and "<|fim_prefix|>" in error["message"]
