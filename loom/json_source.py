"""JSON objects given on the command line either inline or as a file path (policy options, tenant
weights, workload specs)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

MAX_JSON_BYTES = 1 << 20


def json_object(text: str, what: str) -> dict[str, Any]:
    """A JSON object from inline text (starting with ``{`` or ``[``) or from the file ``text`` names.
    ValueError naming ``what`` for a missing or oversized file, bad JSON, or a non-object."""
    source = text.strip()
    if not source.startswith(("{", "[")):
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"{what}: no such file {source!r} (give a JSON file or an inline JSON object)")
        if path.stat().st_size > MAX_JSON_BYTES:
            raise ValueError(f"{what}: {source} is larger than {MAX_JSON_BYTES} bytes")
        source = path.read_text(encoding="utf-8", errors="replace")
    try:
        value = json.loads(source)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def parse_options(cls: type, values: dict[str, Any], owner: str) -> Any:
    """``cls`` (a frozen dataclass of options) from a JSON object, naming unknown keys and mistyped
    values; ``owner`` names what the options are for in errors, e.g. "the vtc policy"."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        listed = ", ".join(known) or "none"
        raise ValueError(f"unknown option {unknown[0]!r} for {owner} (its options: {listed})")
    for key, value in values.items():
        expected = str(known[key].type)  # annotations are strings here (postponed evaluation)
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if expected in ("float", "float | None") and not (numeric or (value is None and expected.endswith("None"))):
            raise ValueError(f"{owner}: option {key!r} must be a number, got {value!r}")
        if expected == "int" and not (isinstance(value, int) and not isinstance(value, bool)):
            raise ValueError(f"{owner}: option {key!r} must be an integer, got {value!r}")
        if expected == "bool" and not isinstance(value, bool):
            raise ValueError(f"{owner}: option {key!r} must be true or false, got {value!r}")
        if expected == "str" and not isinstance(value, str):
            raise ValueError(f"{owner}: option {key!r} must be a string, got {value!r}")
    return cls(**values)
