"""Prometheus metrics (``loom_*``) for ``/metrics``.

Per-request latencies are observed from the engine's outputs (an AsyncEngine listener on the
engine thread; prometheus-client is thread-safe). Engine-wide state (queues, KV blocks, token and
preemption totals) is read from the engine's latest stats snapshot at scrape time. Each app has
its own registry, so several servers can live in one process (tests)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from loom.engine import EngineStats
from loom.outputs import RequestOutput

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
REQUEST_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                   480.0, 960.0)


class _EngineCollector(Collector):
    def __init__(self, stats: Callable[[], EngineStats]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        gauges = (
            ("loom_num_requests_running", "Requests in the running batch.", s.num_running),
            ("loom_num_requests_waiting", "Requests waiting to be scheduled.", s.num_waiting),
            ("loom_kv_cache_blocks_used", "KV cache blocks in use.", s.num_blocks - s.num_free_blocks),
            ("loom_kv_cache_blocks_free", "KV cache blocks free (including evictable prefix-cache blocks).", s.num_free_blocks),
            ("loom_kv_cache_usage_ratio", "Fraction of KV cache blocks in use.", 1 - s.num_free_blocks / max(s.num_blocks, 1)),
            ("loom_prefix_cache_hit_rate", "Fraction of looked-up prompt blocks found in the prefix cache.",
             s.prefix_cache_hit_rate),
        )
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=value)
        counters = (
            ("loom_num_preemptions", "Requests preempted (KV cache full).", s.num_preemptions),
            ("loom_prompt_tokens", "Prompt tokens received.", s.prompt_tokens),
            ("loom_generation_tokens", "Tokens generated.", s.generation_tokens),
            ("loom_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache.", s.prefix_cache_hit_tokens),
            ("loom_engine_steps", "Engine steps (forward passes).", s.steps),
        )
        for name, doc, value in counters:
            yield CounterMetricFamily(name, doc, value=value)


class ServerMetrics:
    def __init__(self, stats: Callable[[], EngineStats]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.finished = Counter("loom_request_finished", "Finished completions (each of a request's n choices) by finish reason.",
                                ["finish_reason"], registry=r)
        self.ttft = Histogram("loom_time_to_first_token_seconds", "Time from arrival to the first generated token.",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("loom_inter_token_latency_seconds", "Time between successive tokens of a request.",
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("loom_e2e_request_latency_seconds", "Time from arrival to the last token.",
                             buckets=REQUEST_BUCKETS, registry=r)
        self.queue = Histogram("loom_request_queue_time_seconds", "Time from arrival to first being scheduled.",
                               buckets=REQUEST_BUCKETS, registry=r)
        r.register(_EngineCollector(stats))
        self._last_token_time: dict[str, float] = {}  # engine thread only

    def observe(self, outputs: list[RequestOutput]) -> None:
        """AsyncEngine listener: called on the engine thread with each batch of outputs."""
        for out in outputs:
            m = out.metrics
            if m.last_token_time is not None and any(c.delta_token_ids for c in out.outputs):
                previous = self._last_token_time.get(out.request_id)
                if previous is None:
                    if m.ttft is not None:
                        self.ttft.observe(m.ttft)
                elif m.last_token_time > previous:
                    self.itl.observe(m.last_token_time - previous)
                self._last_token_time[out.request_id] = m.last_token_time
            if out.finished:
                self._last_token_time.pop(out.request_id, None)
                for c in out.outputs:
                    self.finished.labels(finish_reason=c.finish_reason).inc()
                if m.e2e is not None:
                    self.e2e.observe(m.e2e)
                if m.queue_time is not None:
                    self.queue.observe(m.queue_time)

    def render(self) -> bytes:
        return generate_latest(self.registry)
