"""Fairness across tenants and latency per tenant and per priority class.

Service is weighted tokens, VTC's measure: a prompt token counts 1, an output token 2 (the
defaults of loom's ``vtc`` and ``dlpm`` policies). It is measured over the window in which load
arrives (start to the last arrival), where a fair scheduler has something to be fair about:

- a tenant's *demand* is the service its requests arriving in the window ask for;
- its *fair share* is the max-min fair split of the service delivered in the window: no tenant
  gets more than it asked for, and what a light tenant leaves is split among the rest;
- Jain's index over the normalised service ``x_i = service_i / fair_share_i``
  (Jain, Chiu and Hawe, 1984) is 1 when each tenant got its fair share and ``1/n`` when one got
  everything."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any

from loom.bench.client import RequestRecord
from loom.bench.metrics import SLO, stats

INPUT_WEIGHT, OUTPUT_WEIGHT = 1.0, 2.0


def jain_index(values: Iterable[float]) -> float:
    """(sum x)^2 / (n sum x^2); NaN for no values, 1 when all are 0."""
    xs = list(values)
    if not xs:
        return math.nan
    squares = sum(x * x for x in xs)
    return 1.0 if squares == 0 else sum(xs) ** 2 / (len(xs) * squares)


def max_min_shares(demands: dict[str, float], total: float) -> dict[str, float]:
    """Water-filling: split ``total`` so that no one gets more than its demand and the rest is
    shared equally among those who want more."""
    shares = {k: 0.0 for k in demands}
    left = total
    open_ = sorted(demands, key=lambda k: demands[k])
    while open_ and left > 1e-12:
        level = left / len(open_)
        k = open_[0]
        if demands[k] <= level:
            shares[k] = demands[k]
            left -= demands[k]
            open_.pop(0)
        else:
            for k in open_:
                shares[k] = level
            left = 0.0
    return shares


def _prompt_tokens(r: RequestRecord) -> int:
    return r.prompt_tokens if r.prompt_tokens is not None else r.prompt_len


def service_events(records: Iterable[RequestRecord]) -> tuple[list[float], list[float]]:
    """When the requests received service and how much (weighted tokens): a prompt when its first
    token came, and the output tokens spread evenly over the text chunks. Failed requests got none."""
    times: list[float] = []
    weights: list[float] = []
    for r in records:
        if not r.ok or not r.chunk_times:
            continue
        times.append(r.chunk_times[0])
        weights.append(INPUT_WEIGHT * _prompt_tokens(r))
        times.extend(r.chunk_times)
        weights.extend([OUTPUT_WEIGHT * r.output_tokens / len(r.chunk_times)] * len(r.chunk_times))
    return times, weights


def service_until(records: Iterable[RequestRecord], until: float) -> float:
    times, weights = service_events(records)
    return sum(w for t, w in zip(times, weights) if t <= until)


def demand(r: RequestRecord) -> float:
    return INPUT_WEIGHT * _prompt_tokens(r) + OUTPUT_WEIGHT * r.max_tokens


def tenant_fairness(records: Sequence[RequestRecord]) -> dict[str, Any] | None:
    """Jain's index and each tenant's demand, service and fair share over the arrival window;
    None with fewer than two tenants."""
    by_tenant: dict[str, list[RequestRecord]] = defaultdict(list)
    for r in records:
        if r.tenant is not None:
            by_tenant[r.tenant].append(r)
    if len(by_tenant) < 2:
        return None
    window = max(r.scheduled for r in records)
    if window <= 0:
        return None
    demands = {t: sum(demand(r) for r in rs if r.scheduled <= window) for t, rs in by_tenant.items()}
    served = {t: service_until(rs, window) for t, rs in by_tenant.items()}
    fair = max_min_shares(demands, sum(served.values()))
    normalised = {t: served[t] / fair[t] if fair[t] > 0 else 1.0 for t in by_tenant}
    return {
        "window_s": window,
        "jain_index": jain_index(normalised.values()),
        "tenants": {t: {"demand": demands[t], "service": served[t], "fair_share": fair[t],
                        "normalised_service": normalised[t]} for t in sorted(by_tenant)},
    }


def group_latency(records: Sequence[RequestRecord], key: Callable[[RequestRecord], Hashable], slo: SLO,
                  duration: float) -> dict[str, dict[str, Any]]:
    """Per group (tenant or priority class): counts, tokens, TTFT and E2E percentiles, goodput."""
    groups: dict[Hashable, list[RequestRecord]] = defaultdict(list)
    for r in records:
        groups[key(r)].append(r)
    out = {}
    for name in sorted(groups, key=str):
        rs = groups[name]
        ok = [r for r in rs if r.ok]
        out[str(name)] = {
            "requests": len(rs),
            "completed": len(ok),
            "output_tokens": sum(r.output_tokens for r in ok),
            "ttft": stats([r.ttft for r in ok if r.ttft is not None]),
            "e2e": stats([r.e2e for r in ok]),
            "slo_met": sum(1 for r in rs if slo.met(r)),
            "goodput": sum(1 for r in rs if slo.met(r)) / duration,
        }
    return out


def _turn_kind(r: RequestRecord) -> str:
    if r.session_id is None:
        return "one-off"
    return "first" if r.turn == 0 else "follow-up"


def summarize_groups(records: Sequence[RequestRecord], slo: SLO, duration: float) -> dict[str, Any]:
    """The summary's per-tenant and per-priority parts, present only when the workload has them."""
    out: dict[str, Any] = {}
    if any(r.tenant is not None for r in records):
        out["tenants"] = group_latency(records, lambda r: r.tenant or "", slo, duration)
        fairness = tenant_fairness(records)
        if fairness is not None:
            out["fairness"] = fairness
    if len({r.priority for r in records}) > 1:
        out["priorities"] = group_latency(records, lambda r: r.priority, slo, duration)
    if any(r.session_id is not None for r in records):
        out["turns"] = group_latency(records, _turn_kind, slo, duration)
    if any(r.slo_class is not None for r in records):
        out["slo_classes"] = group_latency(records, lambda r: r.slo_class or "", slo, duration)
    return out
