"""JSON objects given on the command line either inline or as a file path (policy options, tenant
weights, workload specs)."""

from __future__ import annotations

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
