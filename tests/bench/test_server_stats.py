"""The /metrics sampler of `loom bench serve`: loom's and vLLM's names, peaks, and preemptions
counted from the first scrape; a server without known metrics gives no figures."""

from __future__ import annotations

from loom.bench.server_stats import ServerStats, scrape_values

LOOM_PAGE = """# HELP loom_num_requests_running Requests in the running batch.
# TYPE loom_num_requests_running gauge
loom_num_requests_running {running}
# TYPE loom_kv_cache_usage_ratio gauge
loom_kv_cache_usage_ratio {usage}
# TYPE loom_num_preemptions counter
loom_num_preemptions_total {preempted}
# TYPE loom_prompt_tokens counter
loom_prompt_tokens_total {prompt}
# TYPE loom_prefix_cache_hit_tokens counter
loom_prefix_cache_hit_tokens_total {hits}
"""

VLLM_PAGE = """# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{{engine="0",model_name="m"}} {running}
# TYPE vllm:num_preemptions counter
vllm:num_preemptions_total{{engine="0",model_name="m"}} {preempted}
"""


def test_peaks_preemptions_and_prefix_hits_during_the_run():
    stats = ServerStats()
    for running, usage, preempted, prompt, hits in [(0, 0.0, 5, 100, 50), (7, 0.5, 5, 300, 50), (12, 0.9, 8, 500, 150),
                                                    (3, 0.2, 9, 900, 250)]:
        stats.add(scrape_values(LOOM_PAGE.format(running=running, usage=usage, preempted=preempted, prompt=prompt,
                                                 hits=hits)))
    assert stats.to_json() == {"scrapes": 4, "peak_running": 12, "peak_kv_usage": 0.9, "preemptions": 4,
                               "prefix_cache_hit_rate": 0.25, "spec_acceptance_rate": None, "spec_mean_accepted": None,
                               "spec_draft_tokens": None}


def test_speculation_during_the_run():
    page = ("# TYPE {p}draft_tokens counter\n{p}draft_tokens_total {d}\n# TYPE {p}accepted_tokens counter\n"
            "{p}accepted_tokens_total {a}\n# TYPE {p}verifications counter\n{p}verifications_total {v}\n")
    stats = ServerStats()
    for d, a, v in [(100, 50, 20), (300, 170, 60), (500, 250, 100)]:
        stats.add(scrape_values(page.format(p="loom_spec_", d=d, a=a, v=v)))
    assert (stats.spec_draft_tokens, stats.spec_acceptance_rate, stats.spec_mean_accepted) == (400, 0.5, 2.5)


def test_vllm_names_and_unknown_servers():
    stats = ServerStats()
    for running, preempted in [(2, 0), (40, 3)]:
        stats.add(scrape_values(VLLM_PAGE.format(running=running, preempted=preempted)))
    assert (stats.peak_running, stats.preemptions, stats.peak_kv_usage) == (40, 3, None)
    other = ServerStats()
    other.add(scrape_values("# TYPE llamacpp:requests_processing gauge\nllamacpp:requests_processing 3\n"))
    assert other.to_json() == {"scrapes": 1, "peak_running": None, "peak_kv_usage": None, "preemptions": None,
                               "prefix_cache_hit_rate": None, "spec_acceptance_rate": None, "spec_mean_accepted": None,
                               "spec_draft_tokens": None}
