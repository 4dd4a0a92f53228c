"""The per-layer KV cache plan (``--kv-cache-layers FILE``): a JSON object whose ``kv_cache_layers``
is a list of one KV cache format per layer. ``loom bench kv-sensitivity`` writes it, with what it
measured beside (which the engine ignores)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loom.config import KV_CACHE_DTYPES

PLAN_KEY = "kv_cache_layers"


def read_layer_plan(path: str | Path, num_layers: int) -> tuple[str, ...]:
    """The formats of the plan at ``path``; ValueError naming the file when it cannot serve a model
    of ``num_layers`` layers."""
    try:
        plan = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise ValueError(f"--kv-cache-layers {path}: cannot read it ({e.strerror or e})") from None
    except ValueError as e:
        raise ValueError(f"--kv-cache-layers {path}: not JSON ({e})") from None
    formats = plan.get(PLAN_KEY) if isinstance(plan, dict) else None
    if not isinstance(formats, list) or not all(isinstance(f, str) for f in formats):
        raise ValueError(f"--kv-cache-layers {path}: expected an object with {PLAN_KEY!r}, a list of format names")
    if len(formats) != num_layers:
        raise ValueError(f"--kv-cache-layers {path}: {len(formats)} formats for a model of {num_layers} layers")
    unknown = sorted(set(formats) - set(KV_CACHE_DTYPES))
    if unknown:
        raise ValueError(f"--kv-cache-layers {path}: unknown format {unknown[0]!r} (choose {', '.join(KV_CACHE_DTYPES)})")
    return tuple(formats)


def write_layer_plan(path: str | Path, formats: list[str], **about: Any) -> None:
    Path(path).write_text(json.dumps({PLAN_KEY: formats, **about}, indent=1) + "\n", encoding="utf-8")
