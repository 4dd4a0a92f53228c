"""What a request's output must match: a JSON schema, any JSON object, a regex, one of a list of
strings, or a grammar (GBNF / EBNF as llama.cpp writes it, or Lark)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

# Bounds on what one request can ask the grammar compiler to do (hostile sizes get a clear error).
MAX_GRAMMAR_CHARS = 100_000
MAX_CHOICES = 1024

_KINDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True)
class StructuredOutputs:
    """Exactly one of the fields. ``json`` is a JSON schema (a dict, or its text); ``json_object``
    asks for any JSON object; ``choice`` for exactly one of the strings; ``grammar`` is a
    context-free grammar in GBNF (llama.cpp) or Lark syntax. Validated on construction; the
    grammar itself is checked when it is compiled (``Engine.add_request``), and a bad one raises
    ``ValueError`` naming the problem."""

    json: str | dict[str, Any] | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | list[str] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        given = [k for k in _KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"structured_outputs needs exactly one of {', '.join(_KINDS)}; got {given or 'none'}")
        if not isinstance(self.json_object, bool):
            raise ValueError(f"structured_outputs.json_object must be a bool, got {self.json_object!r}")
        if self.json is not None:
            object.__setattr__(self, "json", _schema_text(self.json))
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string")
        if self.choice is not None:
            choices = self.choice
            if not isinstance(choices, (list, tuple)) or not choices or not all(isinstance(c, str) for c in choices):
                raise ValueError("structured_outputs.choice must be a non-empty list of strings")
            if len(choices) > MAX_CHOICES:
                raise ValueError(f"structured_outputs.choice has {len(choices)} entries; at most {MAX_CHOICES} are allowed")
            object.__setattr__(self, "choice", tuple(choices))
        if len(self.source) > MAX_GRAMMAR_CHARS:
            raise ValueError(f"the {self.kind} of structured_outputs is {len(self.source)} characters long; "
                             f"at most {MAX_GRAMMAR_CHARS} are allowed")

    @property
    def kind(self) -> str:
        return next(k for k in _KINDS if getattr(self, k) not in (None, False))

    @property
    def source(self) -> str:
        """The constraint as text (a cache key, and what the compiler reads)."""
        if self.json_object:
            return '{"type": "object"}'
        if self.choice is not None:
            return json.dumps(list(self.choice))
        return getattr(self, self.kind)


def _schema_text(schema: object) -> str:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise ValueError(f"structured_outputs.json is not valid JSON: {e}") from None
    if not isinstance(schema, (dict, bool)):
        raise ValueError(f"structured_outputs.json must be a JSON schema (an object), got {type(schema).__name__}")
    return json.dumps(schema, sort_keys=True, separators=(",", ":"))
