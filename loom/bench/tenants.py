"""Multi-tenant workloads (``--workload tenants:SPEC``): several tenants, each with its own Poisson
rate, lengths, priority and optionally a system prompt shared with other tenants.

A spec is a JSON object (a file, or inline text starting with ``{``)::

    {"duration": 60, "block_tokens": 32,
     "tenants": [
       {"name": "heavy", "rate": 2.0, "input_len": 256, "output_len": 64},
       {"name": "light", "count": 3, "rate": 0.2, "input_len": 256, "output_len": 64,
        "prefix": "support-bot", "prefix_len": 512, "priority": 1}]}

``count`` repeats a tenant as ``light-1`` .. ``light-3``. Tenants naming the same ``prefix`` start
their prompts with the same ``prefix_len`` tokens of text (rounded up to whole ``block_tokens``
blocks); with ``prefix_count`` n, each request draws one of n such prompts (PREFIX-1 .. PREFIX-n).
The rest of each prompt is its own. ``range_ratio`` draws lengths uniformly within that
fraction. Examples ship in ``benchmarks/workloads/``."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from loom.bench.workload import TraceRequest, Workload
from loom.json_source import json_object

MAX_TENANTS = 1000
MAX_REQUESTS = 100_000
_PREFIX_BLOCK_BASE = 1 << 40  # block ids of shared prefixes; unique blocks count up from 0


@dataclass(frozen=True)
class TenantSpec:
    name: str
    rate: float  # requests per second
    input_len: int
    output_len: int
    range_ratio: float = 0.0
    prefix: str | None = None
    prefix_len: int = 0
    prefix_count: int = 1  # distinct system prompts PREFIX-1 .. PREFIX-n, one drawn per request
    priority: int = 0
    slo_class: str | None = None  # sent as ``slo_class`` for loom's slo policy
    count: int = 1

    def __post_init__(self) -> None:
        where = f"tenant {self.name!r}"
        if not self.name:
            raise ValueError("every tenant needs a non-empty name")
        if not (self.rate > 0 and math.isfinite(self.rate)):
            raise ValueError(f"{where}: rate must be a finite number > 0 req/s, got {self.rate}")
        if self.input_len < 1 or self.output_len < 1:
            raise ValueError(f"{where}: input_len and output_len must be >= 1")
        if not 0 <= self.range_ratio < 1:
            raise ValueError(f"{where}: range_ratio must be in [0, 1), got {self.range_ratio}")
        if not 0 <= self.prefix_len < self.input_len * (1 - self.range_ratio):
            raise ValueError(f"{where}: prefix_len must be >= 0 and below every drawn input_len")
        if self.prefix_len and not self.prefix:
            raise ValueError(f"{where}: prefix_len needs a prefix name (tenants with the same name share it)")
        if self.count < 1 or self.prefix_count < 1:
            raise ValueError(f"{where}: count and prefix_count must be >= 1")


@dataclass(frozen=True)
class TenantWorkloadSpec:
    duration: float
    tenants: tuple[TenantSpec, ...]
    block_tokens: int = 32

    def __post_init__(self) -> None:
        if not (self.duration > 0 and math.isfinite(self.duration)):
            raise ValueError(f"tenant workload duration must be a finite number of seconds > 0, got {self.duration}")
        if not self.tenants:
            raise ValueError("the tenant workload names no tenant")
        if self.block_tokens < 1:
            raise ValueError(f"block_tokens must be >= 1, got {self.block_tokens}")
        names = [n for t in self.tenants for n in _names(t)]
        if len(set(names)) != len(names):
            raise ValueError("tenant names must be unique (count expands NAME to NAME-1 .. NAME-count)")
        if len(names) > MAX_TENANTS:
            raise ValueError(f"the workload has {len(names)} tenants; at most {MAX_TENANTS}")
        expected = self.duration * sum(t.rate * t.count for t in self.tenants)
        if expected > MAX_REQUESTS:
            raise ValueError(f"the workload would send about {expected:.0f} requests; at most {MAX_REQUESTS}")


def _names(t: TenantSpec) -> list[str]:
    return [t.name] if t.count == 1 else [f"{t.name}-{i + 1}" for i in range(t.count)]


def _prefixes(t: TenantSpec) -> list[str]:
    if not t.prefix:
        return []
    return [t.prefix] if t.prefix_count == 1 else [f"{t.prefix}-{k + 1}" for k in range(t.prefix_count)]


def build_spec(cls: type, values: Any, where: str) -> Any:
    if not isinstance(values, dict):
        raise ValueError(f"{where} must be a JSON object")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{where}: unknown field {unknown[0]!r} (fields: {', '.join(sorted(known))})")
    try:
        return cls(**values)
    except TypeError as e:
        raise ValueError(f"{where}: {e}") from None


def load_spec(text: str) -> TenantWorkloadSpec:
    """A spec from inline JSON (starting with ``{``) or a JSON file."""
    raw = json_object(text, "tenant workload")
    tenants = raw.get("tenants")
    if not isinstance(tenants, list):
        raise ValueError("tenant workload needs a 'tenants' list")
    built = tuple(build_spec(TenantSpec, t, f"tenant #{i + 1}") for i, t in enumerate(tenants))
    return build_spec(TenantWorkloadSpec, {**raw, "tenants": built}, "tenant workload")


def generate(spec: TenantWorkloadSpec, seed: int = 0) -> Workload:
    """Every tenant's Poisson arrivals over ``spec.duration`` seconds, merged by arrival time."""
    rng = np.random.default_rng(seed)
    bt = spec.block_tokens
    prefix_ids = {name: i for i, name in enumerate(sorted({p for t in spec.tenants for p in _prefixes(t)}))}
    out: list[TraceRequest] = []
    next_block = 0
    for t in spec.tenants:
        prefix_blocks = -(-t.prefix_len // bt)
        prefixes = [tuple(_PREFIX_BLOCK_BASE + prefix_ids[p] * 65536 + b for b in range(prefix_blocks)) for p in _prefixes(t)]
        for name in _names(t):
            now = rng.exponential(1.0 / t.rate)
            while now < spec.duration:
                input_len, output_len = (
                    int(rng.integers(max(1, math.floor(n * (1 - t.range_ratio))), math.ceil(n * (1 + t.range_ratio)) + 1))
                    for n in (t.input_len, t.output_len)
                )
                input_len = max(input_len, prefix_blocks * bt + 1)
                own = -(-(input_len - prefix_blocks * bt) // bt)
                shared = prefixes[int(rng.integers(len(prefixes)))] if prefixes else ()
                hash_ids = shared + tuple(range(next_block, next_block + own))
                next_block += own
                out.append(TraceRequest(arrival=float(now), input_len=input_len, output_len=output_len, hash_ids=hash_ids,
                                        block_tokens=bt, tenant=name, priority=t.priority, slo_class=t.slo_class))
                now += rng.exponential(1.0 / t.rate)
    if not out:
        raise ValueError("the tenant workload sends no request within its duration; raise the rates or the duration")
    return sorted(out, key=lambda r: r.arrival)
