"""Check response bodies against the OpenAI OpenAPI spec's component schemas (JSON Schema 2020-12;
the spec's OpenAPI-3.0 ``nullable: true`` is rewritten as "or null")."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jsonschema_rs
import yaml

# shared/ sits beside the repository (here and in CI).
SPEC_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "openai-openapi"
SUBSET = SPEC_DIR / "openapi.subset-completions-chat-models.yaml"


def _nullable(node: Any) -> Any:
    if isinstance(node, list):
        return [_nullable(n) for n in node]
    if not isinstance(node, dict):
        return node
    node = {k: _nullable(v) for k, v in node.items()}
    if node.pop("nullable", False):
        return {"anyOf": [node, {"type": "null"}]}
    return node


@functools.cache
def _components() -> dict[str, Any]:
    spec = yaml.safe_load(SUBSET.read_text())
    return _nullable(spec["components"])


@functools.cache
def _validator(name: str) -> Any:
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", "components": _components(),
              "$ref": f"#/components/schemas/{name}"}
    return jsonschema_rs.Draft202012Validator(schema)


def spec_errors(name: str, instance: Any) -> list[str]:
    """Why ``instance`` is not a valid ``components.schemas[name]`` (empty if it is)."""
    return [f"{'/'.join(map(str, e.instance_path))}: {e.message}" for e in _validator(name).iter_errors(instance)]


def available() -> bool:
    return SUBSET.is_file()
