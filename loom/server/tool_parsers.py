"""Tool calls in generated text: per-family parsers that split a choice's output into content and
calls.

A parser is fed the output's text deltas as they come and answers with events (text, a call's
start, a fragment of its arguments); a non-streamed answer is the same parser fed the whole text
at once, so streamed and non-streamed answers cannot disagree. Text that only might be the start
of a call (``"<tool_c"``) is held back until it is known not to be one, so it never leaks as
content. A call the parser cannot read (malformed JSON, no name) stays in the content, verbatim.

Families:

* ``hermes``: ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``, any number of
  them, text around them allowed (Hermes 2 Pro, Qwen 2.5). Whitespace that only separates a call
  from its surroundings is dropped.
* ``json``: the whole output is a JSON list of ``{"name": ..., "arguments" | "parameters": {...}}``
  objects, or one such object (Llama 3.x style). Output that does not start with ``[`` or ``{``
  streams as content at once; output that does is held to the end, and is content if it turns
  out not to be calls.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class CallStart:
    name: str


@dataclass(frozen=True)
class CallArguments:
    """A fragment of the arguments (JSON text) of the call started last."""

    fragment: str


Event = Text | CallStart | CallArguments


class Extractor(Protocol):
    """Reads one choice's output: ``feed`` each text delta, then ``finish`` once at the end."""

    def feed(self, delta: str) -> list[Event]: ...

    def finish(self) -> list[Event]: ...


class PlainText:
    """No tool calls: the output is content, as it comes."""

    def feed(self, delta: str) -> list[Event]:
        return [Text(delta)] if delta else []

    def finish(self) -> list[Event]:
        return []


def call_events(obj: Any) -> list[Event] | None:
    """The events of one call written as ``{"name": str, "arguments" | "parameters": object}``
    (arguments may also come as a JSON string holding an object); None if ``obj`` is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return [CallStart(obj["name"]), CallArguments(json.dumps(args, ensure_ascii=False))]


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``marker``."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class HermesParser:
    START = "<tool_call>"
    END = "</tool_call>"

    def __init__(self) -> None:
        self._buf = ""
        self._inside = False
        self._gap = ""  # whitespace cut before the open call: content again if the call is malformed
        self._after_call = False  # drop the whitespace that follows a call

    def feed(self, delta: str) -> list[Event]:
        self._buf += delta
        events: list[Event] = []
        while True:
            if self._inside:
                end = self._buf.find(self.END)
                if end < 0:
                    return events
                events += self._close(self._buf[:end], self.END)
                self._buf = self._buf[end + len(self.END) :]
                continue
            if self._after_call:
                self._buf = self._buf.lstrip()
                if not self._buf:
                    return events
                self._after_call = False
            start = self._buf.find(self.START)
            if start < 0:
                held = _partial_suffix(self._buf, self.START)
                text = self._buf[: len(self._buf) - held]
                ready = text.rstrip()  # trailing whitespace may separate text from a call: wait
                if ready:
                    events.append(Text(ready))
                self._buf = self._buf[len(ready) :]
                return events
            before = self._buf[:start]
            if before.rstrip():
                events.append(Text(before.rstrip()))
            self._gap = before[len(before.rstrip()) :]
            self._buf = self._buf[start + len(self.START) :]
            self._inside = True

    def finish(self) -> list[Event]:
        buf, self._buf = self._buf, ""
        if self._inside:  # no closing tag: the output ended (or was cut) inside the call
            return self._close(buf, "")
        return [] if self._after_call or not buf else [Text(buf)]

    def _close(self, block: str, end: str) -> list[Event]:
        self._inside = False
        try:
            events = call_events(json.loads(block))
        except ValueError:
            events = None
        if events is None:
            return [Text(self._gap + self.START + block + end)]
        self._after_call = True
        return events


class JsonParser:
    def __init__(self) -> None:
        self._buf = ""
        self._json: bool | None = None  # undecided until the first non-whitespace character

    def feed(self, delta: str) -> list[Event]:
        if self._json is False:
            return [Text(delta)] if delta else []
        self._buf += delta
        if self._json is None and self._buf.strip():
            self._json = self._buf.lstrip()[0] in "[{"
            if not self._json:
                text, self._buf = self._buf, ""
                return [Text(text)]
        return []

    def finish(self) -> list[Event]:
        text, self._buf = self._buf, ""
        if not self._json:
            return [Text(text)] if text else []
        try:
            value = json.loads(text)
        except ValueError:
            return [Text(text)]
        events: list[Event] = []
        for item in value if isinstance(value, list) else [value]:
            call = call_events(item)
            if call is None:
                return [Text(text)]
            events += call
        return events or [Text(text)]


PARSERS: dict[str, Callable[[], Extractor]] = {"hermes": HermesParser, "json": JsonParser}


def auto_parser(chat_template: str | None, template_renders_tools: bool) -> str:
    """The parser for a chat template: Hermes when the template asks for ``<tool_call>`` tags, or
    when it ignores tools (the server then describes them itself, in the Hermes format); JSON for
    other templates that render tools (they ask for bare JSON, as Llama 3.x's do)."""
    if chat_template is None or "<tool_call>" in chat_template or not template_renders_tools:
        return "hermes"
    return "json"
