"""Tools on the prompt side: the conversation and the tools through the model's chat template.

A template that renders tools (Qwen 2.5, Llama 3.x, Hermes, ...) gets them as ``tools=[...]``,
the way transformers passes them, and the messages as they are (assistant ``tool_calls`` with
their arguments as objects, ``tool`` messages with ``tool_call_id``). A template that ignores
``tools`` (SmolLM2's plain ChatML, for one) would silently drop them, so for those the server
writes the Hermes tool-use prompt itself: the tool descriptions in the system message, earlier
calls as ``<tool_call>`` blocks in the assistant's content, results as ``<tool_response>`` blocks.
"""

from __future__ import annotations

import json
from typing import Any

from loom.tokenizer import Tokenizer

_PROBE_MESSAGES = [{"role": "user", "content": "hi"}]
_PROBE_TOOLS = [{"type": "function", "function": {"name": "probe", "parameters": {"type": "object", "properties": {}}}}]

HERMES_SYSTEM = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


def template_renders_tools(tokenizer: Tokenizer) -> bool:
    """Whether the chat template shows ``tools`` in the prompt: a one-message conversation
    rendered with and without a tool differs. False for a template that cannot render at all
    (chat requests fail on it anyway, with the template's own error)."""
    if tokenizer.chat_template is None:
        return False
    try:
        plain = tokenizer.apply_chat_template(_PROBE_MESSAGES)
        return tokenizer.apply_chat_template(_PROBE_MESSAGES, tools=_PROBE_TOOLS) != plain
    except ValueError:
        return False


def template_inputs(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                    template_renders_tools: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The messages and the ``tools`` argument that render ``messages`` (as ``ChatMessage.to_template``
    gives them) offering ``tools`` with the model's template."""
    if template_renders_tools:
        return messages, tools
    return hermes_messages(messages, tools), None


def render_chat(tokenizer: Tokenizer, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                add_generation_prompt: bool, template_renders_tools: bool) -> str:
    """The prompt text of ``messages`` offering ``tools``."""
    messages, tools = template_inputs(messages, tools, template_renders_tools)
    return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tools=tools)


def hermes_messages(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """``messages`` with the tool use written out in the Hermes format, for templates that ignore it."""
    out = [_hermes_message(m) for m in messages]
    if tools:
        block = HERMES_SYSTEM.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{block}" if out[0]["content"] else block}
        else:
            out.insert(0, {"role": "system", "content": block})
    return out


def _hermes_message(message: dict[str, Any]) -> dict[str, Any]:
    if message["role"] == "tool":
        return {"role": "tool", "content": f"<tool_response>\n{message['content']}\n</tool_response>"}
    calls = message.get("tool_calls")
    if not calls:
        return message
    blocks = [
        "<tool_call>\n" + json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]},
                                     ensure_ascii=False) + "\n</tool_call>"
        for c in calls
    ]
    content = "\n".join([message["content"], *blocks] if message["content"] else blocks)
    return {k: v for k, v in message.items() if k != "tool_calls"} | {"content": content}
