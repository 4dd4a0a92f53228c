"""Engine stats summed over replicas: what ``/metrics`` shows for a cluster as a whole."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence

from loom.engine import EngineStats
from loom.engine.engine import TenantStats
from loom.spec import SpecStats

_SUMMED = tuple(f.name for f in dataclasses.fields(EngineStats) if f.type in ("int", int))


def empty_stats() -> EngineStats:
    return EngineStats(**{name: 0 for name in _SUMMED}, prefix_cache_hit_rate=0.0)


def merge_stats(stats: Sequence[EngineStats]) -> EngineStats:
    """Counters and gauges summed; the prefix hit rate over all replicas' admitted prompt tokens."""
    if not stats:
        return empty_stats()
    queried = sum(s.prefix_cache_queried_tokens for s in stats)
    rate = sum(s.prefix_cache_hit_tokens for s in stats) / queried if queried else 0.0
    phases: Counter[str] = Counter()
    tenants: dict[str, TenantStats] = {}
    slo: dict[str, tuple[int, int]] = {}
    specs = [s.spec for s in stats if s.spec is not None]
    spec = None
    if specs:
        counts = {f.name: sum(getattr(x, f.name) for x in specs) for f in dataclasses.fields(SpecStats) if f.name != "method"}
        spec = SpecStats(specs[0].method, **counts)
    for s in stats:
        phases.update(s.phase_seconds)
        for name, t in s.tenants.items():
            into = tenants.setdefault(name, TenantStats())
            for f in dataclasses.fields(TenantStats):
                setattr(into, f.name, getattr(into, f.name) + getattr(t, f.name))
        for name, (done, met) in s.slo_classes.items():
            d, m = slo.get(name, (0, 0))
            slo[name] = (d + done, m + met)
    return EngineStats(**{name: sum(getattr(s, name) for s in stats) for name in _SUMMED},
                       prefix_cache_hit_rate=rate, phase_seconds=dict(phases), tenants=tenants, slo_classes=slo,
                       spec=spec)
