from loom.cluster.stats import empty_stats, merge_stats
from loom.engine.engine import TenantStats
from loom.spec import SpecStats


def test_merge_sums_counters_and_computes_the_hit_rate_over_all_replicas():
    a, b = empty_stats(), empty_stats()
    a.num_running, b.num_running = 2, 3
    a.prompt_tokens, b.prompt_tokens = 100, 300
    a.prefix_cache_queried_tokens, b.prefix_cache_queried_tokens = 100, 300
    a.prefix_cache_hit_tokens, b.prefix_cache_hit_tokens = 50, 30
    a.phase_seconds, b.phase_seconds = {"execute": 1.0}, {"execute": 2.0, "schedule": 0.5}
    a.tenants = {"x": TenantStats(requests=1, prompt_tokens=10)}
    b.tenants = {"x": TenantStats(requests=2, prompt_tokens=5), "y": TenantStats(requests=1)}
    a.slo_classes, b.slo_classes = {"interactive": (2, 1)}, {"interactive": (3, 3)}
    a.spec = SpecStats("ngram", draft_tokens=10, accepted_tokens=5)
    m = merge_stats([a, b])
    assert m.num_running == 5 and m.prompt_tokens == 400
    assert abs(m.prefix_cache_hit_rate - (50 + 30) / 400) < 1e-12
    assert m.phase_seconds == {"execute": 3.0, "schedule": 0.5}
    assert m.tenants["x"].requests == 3 and m.tenants["x"].prompt_tokens == 15 and m.tenants["y"].requests == 1
    assert m.slo_classes == {"interactive": (5, 4)}
    assert m.spec == SpecStats("ngram", draft_tokens=10, accepted_tokens=5)
    assert merge_stats([]) == empty_stats()
