"""Per-tenant fairness and prefix locality: ``vtc``, ``lpm`` and ``dlpm``.

Service is weighted tokens: ``input_weight`` per prompt position computed (the first time; a
recompute after preemption is not charged again, nor are prompt tokens served from the prefix
cache) plus ``output_weight`` per token sampled, divided by the tenant's share (``--tenant-weights``).

- ``vtc`` (Sheng et al., "Fairness in Serving Large Language Models", OSDI 2024): a virtual token
  counter per tenant; the tenant with the least service goes next. A tenant that becomes active
  (no request waiting or running before this one) is lifted to the least counter among active
  tenants, or to the last such minimum when none is active, so idle time cannot be banked.
- ``lpm`` (SGLang's cache-aware order): the waiting request with the longest prefix-cache match
  goes next; locality only, no fairness.
- ``dlpm`` (Cao et al., "Locality-aware Fair Scheduling in LLM Serving", 2025): deficit round robin
  over tenants with longest-prefix-match inside it. Among requests of tenants with a positive
  deficit, the longest prefix match goes next; service is charged against the deficit; when no
  waiting tenant has a positive deficit, every waiting tenant gets ``quantum`` x its share (as many
  rounds as it takes for one to turn positive). A tenant that becomes inactive drops any credit
  left (its deficit is capped at 0), so credit cannot be banked either.

``lpm`` and ``dlpm`` look at the ``max_scan`` oldest waiting requests only (SGLang falls back to
FCFS above 128): matching every waiting prompt against the prefix cache on every step costs time."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from loom.request import Request
from loom.scheduler.policy import QueueState, SchedulingPolicy, tenant_of


def _check_weights(policy: str, input_weight: float, output_weight: float) -> None:
    for key, value in (("input_weight", input_weight), ("output_weight", output_weight)):
        if not (value >= 0 and math.isfinite(value)):
            raise ValueError(f"{policy} policy option {key} must be a finite number >= 0, got {value}")
    if input_weight == output_weight == 0:
        raise ValueError(f"{policy} policy: input_weight and output_weight cannot both be 0")


def _check_scan(policy: str, max_scan: int) -> None:
    if max_scan < 1:
        raise ValueError(f"{policy} policy option max_scan must be >= 1, got {max_scan}")


@dataclass(frozen=True)
class VTCOptions:
    input_weight: float = 1.0
    output_weight: float = 2.0  # the paper's default: an output token costs twice an input token

    def __post_init__(self) -> None:
        _check_weights("vtc", self.input_weight, self.output_weight)


@dataclass(frozen=True)
class LPMOptions:
    max_scan: int = 256

    def __post_init__(self) -> None:
        _check_scan("lpm", self.max_scan)


@dataclass(frozen=True)
class DLPMOptions:
    input_weight: float = 1.0
    output_weight: float = 2.0
    quantum: float = 2048.0  # weighted tokens a tenant may use per round before others go
    max_scan: int = 256

    def __post_init__(self) -> None:
        _check_weights("dlpm", self.input_weight, self.output_weight)
        _check_scan("dlpm", self.max_scan)
        if not (self.quantum > 0 and math.isfinite(self.quantum)):
            raise ValueError(f"dlpm policy option quantum must be a finite number > 0, got {self.quantum}")


class _TenantPolicy(SchedulingPolicy):
    """Tracks which tenants are active (a request waiting or running) and charges service."""

    uses_tenant_weights = True

    def __init__(self, options: Any = None, tenant_weights: dict[str, float] | None = None) -> None:
        super().__init__(options, tenant_weights)
        self.live: dict[str, set[str]] = defaultdict(set)  # tenant -> ids of its live requests

    def sort_key(self, req: Request, now: float) -> Any:
        return (req.arrival_time, req.sample_index)

    def on_arrival(self, req: Request, now: float) -> None:
        tenant = tenant_of(req)
        if not self.live[tenant]:
            self.on_active(tenant)
        self.live[tenant].add(req.request_id)

    def on_finished(self, req: Request) -> None:
        tenant = tenant_of(req)
        ids = self.live.get(tenant)
        if ids is None or req.request_id not in ids:
            return
        ids.discard(req.request_id)
        if not ids:
            del self.live[tenant]
            self.on_inactive(tenant)

    def on_scheduled(self, req: Request, prompt_tokens: int, output_tokens: int) -> None:
        o = self.options
        cost = o.input_weight * prompt_tokens + o.output_weight * output_tokens
        if cost:
            self.charge(tenant_of(req), cost / self.share(tenant_of(req)))

    def on_active(self, tenant: str) -> None: ...

    def on_inactive(self, tenant: str) -> None: ...

    def charge(self, tenant: str, service: float) -> None: ...


class VTCPolicy(_TenantPolicy):
    name = "vtc"
    Options = VTCOptions

    def __init__(self, options: Any = None, tenant_weights: dict[str, float] | None = None) -> None:
        super().__init__(options, tenant_weights)
        self.counters: dict[str, float] = defaultdict(float)
        self._floor = 0.0  # the least counter among active tenants, when last there were any

    def on_active(self, tenant: str) -> None:
        active = [self.counters[t] for t in self.live if self.live[t]]
        if active:
            self._floor = min(active)
        self.counters[tenant] = max(self.counters[tenant], self._floor)

    def on_inactive(self, tenant: str) -> None:
        active = [self.counters[t] for t in self.live if self.live[t]]
        self._floor = min(active) if active else self.counters[tenant]

    def charge(self, tenant: str, service: float) -> None:
        self.counters[tenant] += service

    def next_request(self, waiting: Sequence[Request], state: QueueState) -> Request | None:
        return min(waiting, key=lambda r: (self.counters[tenant_of(r)], r.arrival_time, r.sample_index), default=None)

    def select_victim(self, candidates: Sequence[Request], now: float) -> Request:
        """The most served tenant's latest request."""
        return max(candidates, key=lambda r: (self.counters[tenant_of(r)], r.arrival_time, r.sample_index))


def _oldest(waiting: Sequence[Request], n: int) -> Sequence[Request]:
    return waiting if len(waiting) <= n else sorted(waiting, key=lambda r: r.arrival_time)[:n]


class LPMPolicy(SchedulingPolicy):
    name = "lpm"
    Options = LPMOptions

    def sort_key(self, req: Request, now: float) -> Any:
        return (req.arrival_time, req.sample_index)

    def next_request(self, waiting: Sequence[Request], state: QueueState) -> Request | None:
        candidates = _oldest(waiting, self.options.max_scan)
        return max(candidates, key=lambda r: (state.cached_tokens(r), -r.arrival_time), default=None)


class DLPMPolicy(_TenantPolicy):
    name = "dlpm"
    Options = DLPMOptions

    def __init__(self, options: Any = None, tenant_weights: dict[str, float] | None = None) -> None:
        super().__init__(options, tenant_weights)
        self.deficits: dict[str, float] = defaultdict(float)

    def on_inactive(self, tenant: str) -> None:
        self.deficits[tenant] = min(self.deficits[tenant], 0.0)

    def charge(self, tenant: str, service: float) -> None:
        self.deficits[tenant] -= service

    def next_request(self, waiting: Sequence[Request], state: QueueState) -> Request | None:
        candidates = _oldest(waiting, self.options.max_scan)
        if not candidates:
            return None
        tenants = {tenant_of(r) for r in candidates}
        if all(self.deficits[t] <= 0 for t in tenants):
            self._replenish(tenants)
        eligible = [r for r in candidates if self.deficits[tenant_of(r)] > 0]
        return max(eligible, key=lambda r: (state.cached_tokens(r), -r.arrival_time))

    def _replenish(self, tenants: set[str]) -> None:
        """Add whole quanta to every waiting tenant until one has a positive deficit."""
        quanta = {t: self.options.quantum * self.share(t) for t in tenants}
        rounds = min(math.floor(-self.deficits[t] / quanta[t]) + 1 for t in tenants)
        for t in tenants:
            self.deficits[t] += rounds * quanta[t]

    def select_victim(self, candidates: Sequence[Request], now: float) -> Request:
        """The latest request of the tenant deepest in deficit (the most served this round)."""
        return max(candidates, key=lambda r: (-self.deficits[tenant_of(r)], r.arrival_time, r.sample_index))
