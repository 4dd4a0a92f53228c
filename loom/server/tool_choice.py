"""What a chat request's ``tools`` and ``tool_choice`` mean: which tools the prompt offers, what
constrains the output, and how the output is read back into content and calls (OpenAI deltas).

``tool_choice`` (default ``"auto"`` with tools):

* ``"none"``: no tools in the prompt, the output is content.
* ``"auto"``: the tools are in the prompt; the server's tool call parser reads the output.
* ``"required"``: the output is constrained to a JSON list of one or more calls (one when
  ``parallel_tool_calls`` is false), ``[{"name": ..., "parameters": {...}}]``, each matching a
  tool's schema (vLLM's approach), then read as calls.
* ``{"type": "function", "function": {"name": ...}}``: the output is constrained to that
  function's parameters schema and is the arguments of one call to it.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from loom.server.errors import APIError
from loom.server.protocol import ChatCompletionRequest, ChatTool, NamedToolChoice
from loom.server.tool_parsers import PARSERS, CallArguments, CallStart, Event, Extractor, JsonParser, PlainText, Text
from loom.structured import StructuredOutputs

NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass(frozen=True)
class ToolPlan:
    tools: list[dict[str, Any]] | None  # for the chat template, in the OpenAI shape
    structured_outputs: StructuredOutputs | None
    extractor: Callable[[], Extractor]
    parallel: bool = True


def plan_tools(req: ChatCompletionRequest, parser: str) -> ToolPlan:
    """The plan of ``req`` on a server whose tool call parser is ``parser`` (a name in ``PARSERS``,
    or ``"none"``); 400 for tool fields that do not fit together."""
    req.check_tools()
    choice = req.tool_choice or ("auto" if req.tools else "none")
    if choice == "none":
        return ToolPlan(None, None, PlainText)
    tools = req.tools or []
    offered = template_tools(tools)
    parallel = req.parallel_tool_calls is not False
    if isinstance(choice, NamedToolChoice):
        name = choice.function.name
        tool = next(t for t in tools if t.function.name == name)
        return ToolPlan(offered, _constrained(_parameters(tool)), lambda: NamedCall(name), parallel)
    if choice == "required":
        return ToolPlan(offered, _constrained(required_schema(tools, parallel)), JsonParser, parallel)
    if parser not in PARSERS:
        raise APIError(400, "tool_choice 'auto' needs a tool call parser, and this server runs with "
                            "--tool-call-parser none (use 'required' or a named function)", param="tool_choice")
    return ToolPlan(offered, None, PARSERS[parser], parallel)


def template_tools(tools: list[ChatTool]) -> list[dict[str, Any]]:
    """The tools as chat templates take them: the request's dicts, without the unset fields."""
    return [t.model_dump(exclude_none=True) for t in tools]


def _constrained(schema: dict[str, Any]) -> StructuredOutputs:
    """The JSON schema as the output's constraint (compiled with the request; a schema the
    grammar compiler refuses is a 400 on ``tools``)."""
    try:
        return StructuredOutputs(json=schema)
    except ValueError as e:
        raise APIError(400, f"the tools' parameters schemas cannot constrain the output: {e}", param="tools") from None


def _parameters(tool: ChatTool) -> dict[str, Any]:
    return tool.function.parameters or NO_PARAMETERS


def required_schema(tools: list[ChatTool], parallel: bool) -> dict[str, Any]:
    """A JSON list of calls, ``{"name": <a tool>, "parameters": <its arguments>}`` each."""
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": t.function.name}, "parameters": _parameters(t)},
            "required": ["name", "parameters"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    if not parallel:
        schema["maxItems"] = 1
    return schema


class NamedCall:
    """The whole output is the arguments of one call to a known function."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._started = False

    def feed(self, delta: str) -> list[Event]:
        events: list[Event] = [] if self._started else [CallStart(self._name)]
        self._started = True
        return events + ([CallArguments(delta)] if delta else [])

    def finish(self) -> list[Event]:
        return self.feed("")


class ToolOutput:
    """One choice's output read through a plan, as OpenAI message deltas: ``{"content": ...}``,
    a call's header ``{"tool_calls": [{"index", "id", "type", "function": {"name", "arguments": ""}}]}``
    and its arguments ``{"tool_calls": [{"index", "function": {"arguments": <fragment>}}]}``.
    Without parallel calls, calls after the first are dropped."""

    def __init__(self, plan: ToolPlan) -> None:
        self._extractor = plan.extractor()
        self._parallel = plan.parallel
        self.num_calls = 0
        self._dropping = False

    def deltas(self, text: str, final: bool) -> list[dict[str, Any]]:
        events = self._extractor.feed(text) + (self._extractor.finish() if final else [])
        out: list[dict[str, Any]] = []
        for e in events:
            if isinstance(e, Text):
                if out and "content" in out[-1]:
                    out[-1]["content"] += e.text
                else:
                    out.append({"content": e.text})
            elif isinstance(e, CallStart):
                self._dropping = self.num_calls > 0 and not self._parallel
                if not self._dropping:
                    function = {"name": e.name, "arguments": ""}
                    out.append({"tool_calls": [{"index": self.num_calls, "id": new_call_id(), "type": "function",
                                                "function": function}]})
                    self.num_calls += 1
            elif not self._dropping:
                out.append({"tool_calls": [{"index": self.num_calls - 1, "function": {"arguments": e.fragment}}]})
        return out

    def finish_reason(self, reason: str | None) -> str | None:
        """``tool_calls`` for an output that made calls and stopped on its own."""
        return "tool_calls" if self.num_calls and reason == "stop" else reason

    def message(self, text: str) -> dict[str, Any]:
        """The whole output as a message: ``content`` (null when empty and calls were made) and
        ``tool_calls`` (when there are some)."""
        content = ""
        calls: list[dict[str, Any]] = []
        for d in self.deltas(text, final=True):
            content += d.get("content", "")
            for c in d.get("tool_calls", ()):
                if "id" in c:
                    calls.append(c)
                else:
                    calls[c["index"]]["function"]["arguments"] += c["function"]["arguments"]
        message: dict[str, Any] = {"role": "assistant", "content": content or (None if calls else ""), "refusal": None}
        if calls:
            message["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in calls]
        return message


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"
