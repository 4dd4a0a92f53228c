"""The policies ``--policy`` names, and building one from its options and the tenant weights."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from loom.config import SchedulerConfig
from loom.scheduler.fair import DLPMPolicy, LPMPolicy, VTCPolicy
from loom.scheduler.policy import FCFSPolicy, SchedulingPolicy, parse_options
from loom.scheduler.priority import PriorityPolicy

POLICIES: dict[str, type[SchedulingPolicy]] = {
    p.name: p for p in (FCFSPolicy, PriorityPolicy, VTCPolicy, LPMPolicy, DLPMPolicy)
}

MAX_TENANT_WEIGHTS = 10_000
MAX_JSON_BYTES = 1 << 20


def _json_object(text: str, what: str) -> dict[str, Any]:
    """A JSON object from inline text (starting with ``{``) or a file path."""
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


def load_tenant_weights(text: str) -> dict[str, float]:
    """``{"tenant": share, ...}``; ``"*"`` is the share of tenants not named (without it, a
    request from an unnamed tenant is refused)."""
    raw = _json_object(text, "tenant weights")
    if not raw:
        raise ValueError("tenant weights name no tenant")
    if len(raw) > MAX_TENANT_WEIGHTS:
        raise ValueError(f"tenant weights name {len(raw)} tenants; at most {MAX_TENANT_WEIGHTS}")
    weights = {}
    for tenant, share in raw.items():
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not (share > 0 and math.isfinite(share)):
            raise ValueError(f"tenant {tenant!r}: weight must be a finite number > 0, got {share!r}")
        weights[tenant] = float(share)
    return weights


def make_policy(name: str, options: str | dict[str, Any] | None = None, tenant_weights: str | None = None) -> SchedulingPolicy:
    """The policy ``name`` with its options (a dict, inline JSON or a JSON file) and tenant weights
    (inline JSON or a JSON file). ValueError naming any bad part."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"policy (--policy) must be one of {', '.join(POLICIES)}; got {name!r}") from None
    values = options if isinstance(options, dict) else _json_object(options, "policy options") if options else {}
    weights = load_tenant_weights(tenant_weights) if tenant_weights else None
    return cls(parse_options(cls.Options, values, name), weights)


def policy_from_config(config: SchedulerConfig) -> SchedulingPolicy:
    return make_policy(config.policy, config.policy_config, config.tenant_weights)
