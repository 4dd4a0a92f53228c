"""Tool call parsers and the OpenAI deltas built from them: whole outputs, and the same outputs
streamed in pieces (which must give the same message, and never leak a call's markup as content)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from loom.server.tool_choice import NamedCall, ToolOutput, ToolPlan
from loom.server.tool_parsers import (
    CallArguments,
    CallStart,
    Extractor,
    HermesParser,
    JsonParser,
    PlainText,
    Text,
    auto_parser,
)

WEATHER = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n</tool_call>'
TIME = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>'


def parse(extractor: Extractor, text: str) -> list[Any]:
    return extractor.feed(text) + extractor.finish()


def message(extractor: type[Extractor], text: str, parallel: bool = True) -> dict[str, Any]:
    return ToolOutput(ToolPlan([], None, extractor, parallel)).message(text)


def streamed(extractor: type[Extractor], text: str, step: int, parallel: bool = True) -> tuple[dict[str, Any], list[dict]]:
    """The message folded from the deltas of ``text`` fed ``step`` characters at a time, and the deltas."""
    output = ToolOutput(ToolPlan([], None, extractor, parallel))
    pieces = [text[i : i + step] for i in range(0, len(text), step)] or [""]
    deltas = [d for k, p in enumerate(pieces) for d in output.deltas(p, k == len(pieces) - 1)]
    content, calls = "", []
    for d in deltas:
        content += d.get("content", "")
        for c in d.get("tool_calls", ()):
            if "id" in c:
                assert c["function"]["arguments"] == "" and c["type"] == "function" and c["index"] == len(calls)
                calls.append({"name": c["function"]["name"], "arguments": ""})
            else:
                assert set(c) == {"index", "function"} and set(c["function"]) == {"arguments"}
                calls[c["index"]]["arguments"] += c["function"]["arguments"]
    return {"content": content, "calls": calls}, deltas


def calls_of(msg: dict[str, Any]) -> list[tuple[str, dict]]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in msg.get("tool_calls", [])]


def test_hermes_several_calls_with_text_before():
    text = f"Let me look that up.\n{WEATHER}\n{TIME}"
    assert parse(HermesParser(), text) == [
        Text("Let me look that up."),
        CallStart("get_weather"), CallArguments('{"city": "Paris", "unit": "C"}'),
        CallStart("get_time"), CallArguments('{"zone": "CET"}'),
    ]  # fmt: skip
    msg = message(HermesParser, text)
    assert msg["content"] == "Let me look that up." and msg["role"] == "assistant"
    assert calls_of(msg) == [("get_weather", {"city": "Paris", "unit": "C"}), ("get_time", {"zone": "CET"})]
    ids = [c["id"] for c in msg["tool_calls"]]
    assert all(i.startswith("call_") for i in ids) and len(set(ids)) == 2
    assert all(c["type"] == "function" for c in msg["tool_calls"])


def test_hermes_only_calls_give_null_content_and_text_between_calls_stays():
    assert message(HermesParser, f"{WEATHER}\n")["content"] is None
    msg = message(HermesParser, f"{WEATHER}\nand also\n{TIME} done.")
    assert msg["content"] == "and alsodone." and len(msg["tool_calls"]) == 2


def test_hermes_malformed_call_stays_content_verbatim():
    bad = 'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>'
    msg = message(HermesParser, bad)
    assert msg["content"] == bad and "tool_calls" not in msg
    no_name = '<tool_call>\n{"arguments": {}}\n</tool_call>'
    assert message(HermesParser, no_name)["content"] == no_name
    cut = 'Sure. <tool_call>\n{"name": "get_weather", "argu'  # ran out of tokens inside the call
    assert message(HermesParser, cut)["content"] == cut


def test_hermes_call_without_closing_tag_at_the_end_is_a_call():
    assert calls_of(message(HermesParser, '<tool_call>\n{"name": "f", "arguments": {"x": 1}}')) == [("f", {"x": 1})]


def test_hermes_text_without_calls_is_unchanged():
    for text in ("plain answer", "ends with spaces  \n", "a < b and <tool_ is not a tag", "<tool_cal", ""):
        assert message(HermesParser, text)["content"] == text
        assert streamed(HermesParser, text, 1)[0] == {"content": text, "calls": []}


@pytest.mark.parametrize("step", [1, 2, 3, 7, 1000])
@pytest.mark.parametrize("parser", [HermesParser, JsonParser])
def test_streaming_in_pieces_gives_the_whole_message(parser, step):
    texts = {
        HermesParser: [f"Checking.\n{WEATHER}\n{TIME}", f"{WEATHER}", "no calls at all", 'x <tool_call>{"bad"</tool_call> y'],
        JsonParser: ['[{"name": "f", "arguments": {"a": [1, 2]}}, {"name": "g", "parameters": {}}]', "just words",
                     '  {"name": "f", "parameters": {"q": "x"}}', "[1, 2]"],
    }[parser]
    for text in texts:
        whole = message(parser, text)
        folded, _ = streamed(parser, text, step)
        assert folded["content"] == (whole["content"] or "")
        assert [(c["name"], json.loads(c["arguments"])) for c in folded["calls"]] == calls_of(whole)


def test_a_partial_start_marker_never_leaks_as_content():
    _, deltas = streamed(HermesParser, f"Hi {WEATHER}", 1)
    content = [d["content"] for d in deltas if "content" in d]
    assert "".join(content) == "Hi" and not any("<" in c for c in content)
    parser = HermesParser()
    assert parser.feed("Hello <tool_c") == [Text("Hello")]
    assert parser.feed("ute ") == [Text(" <tool_cute")]  # not a marker after all; the new space waits
    assert parser.feed("!") == [Text(" !")]


def test_json_list_accepts_arguments_or_parameters_and_single_objects():
    msg = message(JsonParser, '[{"name": "f", "arguments": {"a": 1}}, {"name": "g", "parameters": {"b": "2"}}]')
    assert msg["content"] is None and calls_of(msg) == [("f", {"a": 1}), ("g", {"b": "2"})]
    assert calls_of(message(JsonParser, '{"name": "f", "parameters": {"a": 1}}')) == [("f", {"a": 1})]
    assert calls_of(message(JsonParser, '[{"name": "f", "arguments": "{\\"a\\": 1}"}]')) == [("f", {"a": 1})]


def test_json_that_is_not_calls_is_content():
    for text in ("[1, 2]", '{"answer": 42}', '[{"name": "f", "arguments": 3}]', "[]", '[{"name": "f"', "Paris."):
        msg = message(JsonParser, text)
        assert msg["content"] == text and "tool_calls" not in msg


def test_parallel_tool_calls_false_keeps_the_first_call():
    msg = message(HermesParser, f"{WEATHER}\n{TIME}", parallel=False)
    assert calls_of(msg) == [("get_weather", {"city": "Paris", "unit": "C"})]
    folded, _ = streamed(HermesParser, f"{WEATHER}\n{TIME}", 4, parallel=False)
    assert [c["name"] for c in folded["calls"]] == ["get_weather"]


def test_finish_reason_is_tool_calls_only_for_calls_that_stopped_normally():
    output = ToolOutput(ToolPlan([], None, HermesParser))
    output.message(WEATHER)
    assert output.finish_reason("stop") == "tool_calls" and output.finish_reason("length") == "length"
    plain = ToolOutput(ToolPlan([], None, HermesParser))
    plain.message("no call")
    assert plain.finish_reason("stop") == "stop"


def test_named_call_streams_the_output_as_arguments():
    folded, deltas = streamed(lambda: NamedCall("get_weather"), '{"city": "Paris"}', 3)
    assert folded == {"content": "", "calls": [{"name": "get_weather", "arguments": '{"city": "Paris"}'}]}
    assert deltas[0]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": ""}
    msg = ToolOutput(ToolPlan([], None, lambda: NamedCall("f"))).message('{"a": 1}')
    assert msg["content"] is None and calls_of(msg) == [("f", {"a": 1})]


def test_plain_text_keeps_empty_content():
    assert message(PlainText, "")["content"] == "" and message(PlainText, "<tool_call>")["content"] == "<tool_call>"


def test_auto_parser_follows_the_template():
    assert auto_parser("... <tool_call> ...", True) == "hermes"
    assert auto_parser("{{ tools }}", True) == "json"
    assert auto_parser("{{ messages }}", False) == "hermes"  # the server writes the Hermes prompt itself


def test_required_schema_is_a_list_of_calls_to_the_tools():
    from loom.server.protocol import ChatTool
    from loom.server.tool_choice import NO_PARAMETERS, required_schema

    tools = [ChatTool.model_validate({"type": "function", "function": {"name": n, **extra}})
             for n, extra in (("f", {"parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}), ("g", {}))]
    schema = required_schema(tools, parallel=True)
    assert schema["type"] == "array" and schema["minItems"] == 1 and "maxItems" not in schema
    [f, g] = schema["items"]["anyOf"]
    assert f["properties"] == {"name": {"const": "f"}, "parameters": tools[0].function.parameters}
    assert g["properties"]["parameters"] == NO_PARAMETERS and g["required"] == ["name", "parameters"]
    assert g["additionalProperties"] is False and NO_PARAMETERS["additionalProperties"] is False
    assert required_schema(tools, parallel=False)["maxItems"] == 1
