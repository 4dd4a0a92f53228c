"""Tools, assistant tool calls and tool results through the real chat templates: Qwen 2.5's renders
them itself; SmolLM2's ignores tools, so the server writes the Hermes tool-use prompt for it. The
Qwen model comes from `make setup-models`; its tests skip when it is not installed."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from gguf import GGUFReader

from loom.model.gguf_meta import field_value
from loom.server.protocol import ChatMessage
from loom.server.tool_choice import ToolOutput, ToolPlan
from loom.server.tool_parsers import HermesParser, auto_parser
from loom.server.tool_prompt import render_chat, template_renders_tools
from loom.tokenizer import Tokenizer
from tests.conftest import QWEN_PARTS

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]  # fmt: skip
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
FOLLOW_UP = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'},
]
CALL_BLOCK = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def template_tokenizer(gguf: Path, tiny_path: Path) -> Tokenizer:
    """The tiny model's tokenizer (the text is all these tests look at) with ``gguf``'s chat template."""
    from tokenizers import Tokenizer as Backend

    template = field_value(GGUFReader(str(gguf)), "tokenizer.chat_template")
    return Tokenizer(Backend.from_file(str(tiny_path / "tokenizer.json")), chat_template=template)


def render(tok: Tokenizer, messages: list[dict], tools: list[dict] | None) -> str:
    as_template = [ChatMessage.model_validate(m).to_template() for m in messages]
    return render_chat(tok, as_template, tools, True, template_renders_tools(tok))


@pytest.fixture(scope="module")
def smollm2(real_gguf: Callable[[str], Path], tiny_path: Path) -> Tokenizer:
    return template_tokenizer(real_gguf("smollm2"), tiny_path)


@pytest.fixture(scope="module")
def qwen(real_gguf: Callable[[str], Path], tiny_path: Path) -> Tokenizer:
    if any(importlib.util.find_spec(p) is None for p in QWEN_PARTS):
        pytest.skip("the Qwen2.5 GGUF is not installed (make setup-models)")
    return template_tokenizer(real_gguf("qwen2"), tiny_path)


def test_qwen_template_renders_tools_calls_and_results(qwen):
    assert template_renders_tools(qwen) and auto_parser(qwen.chat_template, True) == "hermes"
    prompt = render(qwen, FOLLOW_UP, TOOLS)
    assert prompt.startswith("<|im_start|>system\nYou are Qwen") and "# Tools" in prompt
    assert f"<tools>\n{json.dumps(TOOLS[0], ensure_ascii=False)}\n</tools>" in prompt
    assert f"<|im_start|>assistant\n{CALL_BLOCK}<|im_end|>" in prompt
    assert '<|im_start|>user\n<tool_response>\n{"temp_c": 21}\n</tool_response><|im_end|>' in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    assert "# Tools" not in render(qwen, FOLLOW_UP[:1], None)


def test_smollm2_template_ignores_tools_so_the_server_writes_the_hermes_prompt(smollm2):
    assert not template_renders_tools(smollm2) and auto_parser(smollm2.chat_template, False) == "hermes"
    assert smollm2.apply_chat_template(FOLLOW_UP[:1], tools=TOOLS) == smollm2.apply_chat_template(FOLLOW_UP[:1])
    prompt = render(smollm2, [{"role": "system", "content": "Be brief."}, *FOLLOW_UP], TOOLS)
    assert prompt.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")
    assert f"<tools>\n{json.dumps(TOOLS[0], ensure_ascii=False)}\n</tools>" in prompt
    assert f"<|im_start|>assistant\n{CALL_BLOCK}<|im_end|>" in prompt
    assert '<|im_start|>tool\n<tool_response>\n{"temp_c": 21}\n</tool_response><|im_end|>' in prompt
    no_system = render(smollm2, FOLLOW_UP[:1], TOOLS)
    assert no_system.startswith("<|im_start|>system\n# Tools\n") and "SmolLM" not in no_system
    assert render(smollm2, FOLLOW_UP[:1], None) == smollm2.apply_chat_template(FOLLOW_UP[:1])


def test_assistant_text_and_calls_render_in_the_hermes_format_the_parser_reads(smollm2):
    said = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Checking.", "tool_calls": [CALL, CALL]}]
    prompt = render(smollm2, said, TOOLS)
    turn = prompt.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0]
    assert turn == f"Checking.\n{CALL_BLOCK}\n{CALL_BLOCK}"
    msg = ToolOutput(ToolPlan([], None, HermesParser)).message(turn)
    assert msg["content"] == "Checking." and [c["function"]["arguments"] for c in msg["tool_calls"]] == ['{"city": "Paris"}'] * 2
