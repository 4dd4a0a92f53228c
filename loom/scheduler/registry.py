"""The policies ``--policy`` names, and building one from its options and the tenant weights."""

from __future__ import annotations

import math
from typing import Any

from loom.config import SchedulerConfig
from loom.json_source import json_object, parse_options
from loom.scheduler.fair import DLPMPolicy, LPMPolicy, VTCPolicy
from loom.scheduler.policy import FCFSPolicy, SchedulingPolicy
from loom.scheduler.priority import PriorityPolicy
from loom.scheduler.slo import SJFPolicy, SLOPolicy

POLICIES: dict[str, type[SchedulingPolicy]] = {
    p.name: p for p in (FCFSPolicy, PriorityPolicy, VTCPolicy, LPMPolicy, DLPMPolicy, SLOPolicy, SJFPolicy)
}

MAX_TENANT_WEIGHTS = 10_000
def load_tenant_weights(text: str) -> dict[str, float]:
    """``{"tenant": share, ...}``; ``"*"`` is the share of tenants not named (without it, a
    request from an unnamed tenant is refused)."""
    raw = json_object(text, "tenant weights")
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
    values = options if isinstance(options, dict) else json_object(options, "policy options") if options else {}
    weights = load_tenant_weights(tenant_weights) if tenant_weights else None
    return cls(parse_options(cls.Options, values, f"the {name} policy"), weights)


def policy_from_config(config: SchedulerConfig) -> SchedulingPolicy:
    return make_policy(config.policy, config.policy_config, config.tenant_weights)
