"""Tool calling on /v1/chat/completions end to end, through the official openai SDK: a scripted
engine writes the calls a real model would (its tokenizer and ChatML template are the default
model's, a template that ignores tools, so the server writes the Hermes tool prompt and reads
Hermes calls), then the follow-up turn with the tool's result. Request validation, and tools
requests on the real tiny model: under "auto" its random output must come back in a valid shape;
under "required" or a named function the grammar alone makes it valid calls."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import jsonschema_rs
import openai
import pytest
from live_server import TINY, LiveServer, serve_engine
from scripted_engine import ScriptedEngine
from server_spec import available, spec_errors

from loom.server import ServerConfig
from loom.tokenizer import Tokenizer

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}  # fmt: skip
TIME_TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
TOOLS = [WEATHER_TOOL, TIME_TOOL]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
TWO_CALLS = f'{CALL}\n<tool_call>\n{{"name": "get_time", "arguments": {{}}}}\n</tool_call>'


@pytest.fixture(scope="module")
def scripted(tiny_path: Path) -> Iterator[tuple[LiveServer, ScriptedEngine]]:
    engine = ScriptedEngine(Tokenizer.from_dir(tiny_path))
    srv = serve_engine(engine, ServerConfig(served_model_names=(TINY,)))
    yield srv, engine
    srv.stop()


def say(engine: ScriptedEngine, text: str) -> None:
    engine.script = text
    engine.prompts.clear()


def test_tool_call_round_trip_with_the_sdk(scripted):
    srv, engine = scripted
    client = srv.client()
    say(engine, f"Let me check.\n{CALL}")
    r = client.chat.completions.create(model=TINY, messages=ASK, tools=TOOLS, tool_choice="auto")
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check."
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    prompt = engine.prompts[0]
    assert "<tools>\n" + json.dumps(WEATHER_TOOL, ensure_ascii=False) in prompt and "<tool_call>" in prompt

    say(engine, "It is 21 C in Paris.")
    follow_up = [*ASK, choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21}'}]
    r2 = client.chat.completions.create(model=TINY, messages=follow_up, tools=TOOLS)
    assert r2.choices[0].message.content == "It is 21 C in Paris." and r2.choices[0].message.tool_calls is None
    assert r2.choices[0].finish_reason == "stop"
    prompt = engine.prompts[0]
    assert f"<|im_start|>assistant\nLet me check.\n{CALL}<|im_end|>" in prompt
    assert '<|im_start|>tool\n<tool_response>\n{"temp_c": 21}\n</tool_response><|im_end|>' in prompt


def test_streamed_tool_calls_with_the_sdk(scripted):
    srv, engine = scripted
    say(engine, f"Sure: {TWO_CALLS}")
    chunks = list(srv.client().chat.completions.create(model=TINY, messages=ASK, tools=TOOLS, stream=True))
    deltas = [c.choices[0].delta for c in chunks]
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == "Sure:"
    assert not any("<" in (d.content or "") for d in deltas)
    calls: dict[int, dict] = {}
    for d in deltas:
        for tc in d.tool_calls or []:
            if tc.id is not None:
                assert tc.type == "function" and tc.function.arguments == "" and tc.index not in calls
                calls[tc.index] = {"id": tc.id, "name": tc.function.name, "arguments": ""}
            else:
                calls[tc.index]["arguments"] += tc.function.arguments
    assert [c["name"] for c in calls.values()] == ["get_weather", "get_time"]
    assert [json.loads(c["arguments"]) for c in calls.values()] == [{"city": "Paris"}, {}]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_n_choices_stream_their_calls_independently(scripted):
    srv, engine = scripted
    say(engine, CALL)
    chunks = list(srv.client().chat.completions.create(model=TINY, messages=ASK, tools=TOOLS, stream=True, n=2))
    for i in range(2):
        own = [c.choices[0] for c in chunks if c.choices[0].index == i]
        calls = [tc for ch in own for tc in ch.delta.tool_calls or []]
        assert [tc.index for tc in calls if tc.id] == [0] and calls[0].function.name == "get_weather"
        assert json.loads("".join(tc.function.arguments for tc in calls)) == {"city": "Paris"}
        assert own[-1].finish_reason == "tool_calls"


def test_parallel_tool_calls_false_and_tool_choice_none(scripted):
    srv, engine = scripted
    client = srv.client()
    say(engine, TWO_CALLS)
    r = client.chat.completions.create(model=TINY, messages=ASK, tools=TOOLS, parallel_tool_calls=False)
    assert [c.function.name for c in r.choices[0].message.tool_calls] == ["get_weather"]
    r = client.chat.completions.create(model=TINY, messages=ASK, tools=TOOLS, tool_choice="none")
    assert r.choices[0].message.content == TWO_CALLS and r.choices[0].finish_reason == "stop"
    assert "<tools>" not in engine.prompts[-1]


def test_tool_call_responses_match_the_openapi_spec(scripted):
    assert available(), "the OpenAI spec is missing from shared/data/openai-openapi"
    srv, engine = scripted
    say(engine, f"Checking. {CALL}")
    body = {"model": TINY, "messages": ASK, "tools": TOOLS}
    with srv.http() as http:
        full = http.post("/v1/chat/completions", json=body).json()
        assert full["choices"][0]["message"]["tool_calls"] and spec_errors("CreateChatCompletionResponse", full) == []
        with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as resp:
            events = [json.loads(e.removeprefix("data: ")) for e in resp.iter_lines() if e and e != "data: [DONE]"]
    assert any("tool_calls" in e["choices"][0]["delta"] for e in events)
    for e in events:
        assert spec_errors("CreateChatCompletionStreamResponse", e) == [], e


BAD_TOOL_REQUESTS = [
    ({"tool_choice": "auto"}, "tool_choice", "only allowed when tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_stock"}}}, "tool_choice", "get_stock"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}, "tools", "dictionary"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]}, "tools", "'object'"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools", "pattern"),
    ({"tools": [TIME_TOOL, TIME_TOOL]}, "tools", "unique"),
    ({"tools": [{"type": "retrieval"}]}, "tools", None),
    ({"functions": [{"name": "f"}]}, "functions", "tools and tool_choice"),
    ({"function_call": "auto"}, "function_call", None),
    ({"messages": [*ASK, {"role": "tool", "content": "21"}]}, "messages", "tool_call_id"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}, "messages", "assistant"),
    ({"messages": [*ASK, {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]}, "messages", "JSON object"),
]  # fmt: skip


@pytest.mark.parametrize(("extra", "param", "says"), BAD_TOOL_REQUESTS)
def test_bad_tool_requests_are_400(scripted, extra, param, says):
    srv, _ = scripted
    with srv.http() as http:
        resp = http.post("/v1/chat/completions", json={"model": TINY, "messages": ASK, **extra})
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["param"] == param and (says is None or says in err["message"]), err


def test_auto_needs_a_parser(tiny_path: Path):
    engine = ScriptedEngine(Tokenizer.from_dir(tiny_path))
    srv = serve_engine(engine, ServerConfig(served_model_names=(TINY,), tool_call_parser="none"))
    try:
        with pytest.raises(openai.BadRequestError, match="tool-call-parser none"):
            srv.client().chat.completions.create(model=TINY, messages=ASK, tools=TOOLS)
        say(engine, CALL)
        r = srv.client().chat.completions.create(model=TINY, messages=ASK, tools=TOOLS, tool_choice="none")
        assert r.choices[0].message.content == CALL
    finally:
        srv.stop()


def test_tools_on_the_real_tiny_model(tiny_server):
    """Random weights write no calls, but the request runs and its answer has the right shape."""
    body = {"model": TINY, "messages": ASK, "tools": TOOLS, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    with tiny_server.http() as http:
        r = http.post("/v1/chat/completions", json=body).json()
        plain = http.post("/v1/chat/completions", json={k: v for k, v in body.items() if k != "tools"}).json()
        with_tools = http.post("/tokenize", json={"messages": ASK, "tools": TOOLS}).json()
        without = http.post("/tokenize", json={"messages": ASK}).json()
    assert r["choices"][0]["finish_reason"] == "length" and isinstance(r["choices"][0]["message"]["content"], str)
    assert r["usage"]["prompt_tokens"] == with_tools["count"] > without["count"] == plain["usage"]["prompt_tokens"]
    tiny_server.wait_idle()



# Constrained tool calls on the real tiny model: its random weights write garbage, so only the
# grammar built from the tools' schemas makes the output a valid call. The bounds keep random
# strings and lists short enough to finish well within max_tokens.
BOUNDED_WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "days"], "properties": {
        "city": {"type": "string", "maxLength": 12}, "days": {"type": "integer", "minimum": 1, "maximum": 7}}}}}  # fmt: skip
BOUNDED_TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "additionalProperties": False, "required": ["zone"],
                                       "properties": {"zone": {"enum": ["UTC", "CET", "PST"]}}}}}  # fmt: skip
BOUNDED_TOOLS = [BOUNDED_WEATHER, BOUNDED_TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in BOUNDED_TOOLS}
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def assert_valid_call(call, names=("get_weather",)) -> dict:
    assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
    args = json.loads(call.function.arguments)
    jsonschema_rs.validator_for(SCHEMAS[call.function.name]).validate(args)
    return args


def test_named_tool_choice_on_the_real_tiny_model(tiny_server):
    client = tiny_server.client()
    kwargs = dict(model=TINY, messages=ASK, tools=BOUNDED_TOOLS, tool_choice=NAMED, max_tokens=200, temperature=1.0)
    r = client.chat.completions.create(**kwargs, seed=3, n=3)
    for c in r.choices:
        assert c.finish_reason == "tool_calls" and c.message.content is None
        [call] = c.message.tool_calls
        assert_valid_call(call)
    chunks = list(client.chat.completions.create(**kwargs, seed=3, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    calls = [tc for d in deltas for tc in d.tool_calls or ()]
    assert calls[0].function.name == "get_weather" and calls[0].id.startswith("call_")
    assert {tc.index for tc in calls} == {0} and not any(d.content for d in deltas)
    streamed = "".join(tc.function.arguments or "" for tc in calls)
    assert len(calls) > 2  # the arguments arrive token by token
    single = client.chat.completions.create(**kwargs, seed=3)
    assert streamed == single.choices[0].message.tool_calls[0].function.arguments
    jsonschema_rs.validator_for(SCHEMAS["get_weather"]).validate(json.loads(streamed))
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    tiny_server.wait_idle()


def test_required_tool_choice_on_the_real_tiny_model(tiny_server):
    client = tiny_server.client()
    kwargs = dict(model=TINY, messages=ASK, tools=BOUNDED_TOOLS, tool_choice="required", max_tokens=200, temperature=1.0)
    r = client.chat.completions.create(**kwargs, seed=1, n=4)
    for c in r.choices:
        assert c.finish_reason == "tool_calls" and c.message.tool_calls, c
        for call in c.message.tool_calls:
            assert_valid_call(call, names=tuple(SCHEMAS))
    single = client.chat.completions.create(**kwargs, seed=1, n=4, parallel_tool_calls=False,
                                            response_format={"type": "text"})  # text: no constraint of its own
    for c in single.choices:
        assert c.finish_reason == "tool_calls" and len(c.message.tool_calls) == 1, c
        assert_valid_call(c.message.tool_calls[0], names=tuple(SCHEMAS))
    tiny_server.wait_idle()


def test_auto_tool_choice_keeps_response_format(tiny_server):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}
    r = tiny_server.client().chat.completions.create(
        model=TINY, messages=ASK, tools=BOUNDED_TOOLS, max_tokens=30, temperature=1.0, seed=2,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}})
    c = r.choices[0]
    assert c.finish_reason == "stop" and not c.message.tool_calls
    assert json.loads(c.message.content) in ({"ok": True}, {"ok": False})
    tiny_server.wait_idle()


@pytest.mark.parametrize(("tool_choice", "extra", "named"), [
    ("required", {"response_format": {"type": "json_object"}}, "response_format"),
    (NAMED, {"guided_regex": "a+"}, "guided_regex"),
    (NAMED, {"structured_outputs": {"choice": ["a", "b"]}}, "structured_outputs"),
])  # fmt: skip
def test_constrained_tool_choice_and_an_output_constraint_are_400(scripted, tool_choice, extra, named):
    srv, _ = scripted
    body = {"model": TINY, "messages": ASK, "tools": BOUNDED_TOOLS, "tool_choice": tool_choice, **extra}
    with srv.http() as http:
        resp = http.post("/v1/chat/completions", json=body)
        assert resp.status_code == 400, resp.text
        err = resp.json()["error"]
        assert err["param"] == "tool_choice" and named in err["message"] and "tool_choice" in err["message"], err


def test_a_schema_the_grammar_refuses_is_a_400_on_tools(tiny_server):
    bogus = {"type": "function",
             "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "bogus"}}}}}
    with pytest.raises(openai.BadRequestError, match="invalid json constraint") as e:
        tiny_server.client().chat.completions.create(model=TINY, messages=ASK, tools=[bogus], tool_choice="required",
                                                     max_tokens=5)
    assert e.value.body["param"] == "tools"
    tiny_server.wait_idle()
