"""Structured output and logit_bias through the server, driven by the official openai SDK: the
tiny random model's output parses and validates only because the grammar constrains it."""

from __future__ import annotations

import json
import re

import jsonschema_rs
import openai
import pytest
from live_server import TINY

ANSWER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 8}, "population": {"type": "integer", "minimum": 0}},
    "required": ["city", "population"],
    "additionalProperties": False,
}
MESSAGES = [{"role": "user", "content": "Largest city of France, as JSON."}]


def test_response_format_json_schema(tiny_server):
    r = tiny_server.client().chat.completions.create(
        model=TINY, messages=MESSAGES, max_tokens=60, temperature=1.0, seed=4, n=3,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER, "strict": True}})
    validator = jsonschema_rs.validator_for(ANSWER)
    for c in r.choices:
        assert c.finish_reason == "stop"
        validator.validate(json.loads(c.message.content))


def test_streamed_json_schema_concatenates_to_a_valid_document(tiny_server):
    chunks = tiny_server.client().chat.completions.create(
        model=TINY, messages=MESSAGES, max_tokens=60, temperature=0, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER}})
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema_rs.validator_for(ANSWER).validate(json.loads(text))


@pytest.mark.parametrize("extra, pattern", [
    ({"guided_regex": r"[0-9]{3}-[a-z]{3}"}, r"[0-9]{3}-[a-z]{3}"),
    ({"guided_choice": ["alpha", "beta"]}, r"alpha|beta"),
    ({"guided_grammar": 'root ::= "x" [0-9] [0-9]'}, r"x[0-9]{2}"),
    ({"structured_outputs": {"regex": "(yes|no)!"}}, r"(yes|no)!"),
    ({"guided_json": {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 2}},
     r"\[(true|false)(, (true|false))?\]"),
])
def test_vllm_extras_on_completions(tiny_server, extra, pattern):
    r = tiny_server.client().completions.create(model=TINY, prompt="Answer:", max_tokens=30, temperature=1.0, seed=2,
                                                extra_body=extra)
    assert re.fullmatch(pattern, r.choices[0].text), r.choices[0].text
    assert r.choices[0].finish_reason == "stop"


def test_json_object_on_completions(tiny_server):
    r = tiny_server.client().completions.create(model=TINY, prompt="{", max_tokens=5, temperature=0,
                                                extra_body={"response_format": {"type": "json_object"}})
    assert r.choices[0].text.startswith("{")


@pytest.mark.parametrize("kwargs, message", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}},
     "invalid json constraint"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "needs json_schema.schema"),
    ({"extra_body": {"guided_regex": "(["}}, "invalid regex constraint"),
    ({"response_format": {"type": "json_object"}, "extra_body": {"guided_regex": "a"}}, "one output constraint"),
    ({"extra_body": {"guided_choice": []}}, "non-empty list"),
])
def test_bad_constraints_are_400s(tiny_server, kwargs, message):
    with pytest.raises(openai.BadRequestError, match=re.escape(message)) as e:
        tiny_server.client().chat.completions.create(model=TINY, messages=MESSAGES, max_tokens=5, **kwargs)
    assert e.value.body["param"] in ("response_format", "guided_regex", "guided_choice")
    tiny_server.wait_idle()


def test_logit_bias(tiny_server):
    client = tiny_server.client()
    r = client.completions.create(model=TINY, prompt="Hello", max_tokens=4, temperature=0, logit_bias={"321": 100},
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == tiny_server.engine.tokenizer.decode([321] * 4)
    chat = client.chat.completions.create(model=TINY, messages=MESSAGES, max_tokens=3, temperature=0,
                                          logit_bias={"321": 100}, logprobs=True, extra_body={"ignore_eos": True})
    assert [t.token for t in chat.choices[0].logprobs.content] == [tiny_server.engine.tokenizer.token_to_str(321)] * 3
    for bias, message in (({"abc": 1}, "token ids"), ({"5": 150}, "[-100, 100]"), ({"99999999": 1}, "outside the vocabulary")):
        with pytest.raises(openai.BadRequestError, match=re.escape(message)):
            client.completions.create(model=TINY, prompt="Hello", max_tokens=2, logit_bias=bias)


def test_a_lone_surrogate_in_a_constraint_is_a_400(tiny_server):
    with tiny_server.http() as http:
        r = http.post("/v1/completions", content=b'{"prompt": "x", "guided_regex": "a\\ud800"}',
                      headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "guided_regex"
