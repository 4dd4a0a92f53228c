"""Prometheus metrics (``loom_*``) for ``/metrics``.

Per-request latencies are observed from the engine's outputs, and step-phase times from its step
timings (EngineClient listeners, called on the engine thread; prometheus-client is thread-safe). Engine-wide state (queues, KV blocks, token and
preemption totals) is read from the engine's latest stats snapshot at scrape time. Each app has
its own registry, so several servers can live in one process (tests)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from loom.engine import EngineStats, StepTiming
from loom.outputs import RequestOutput

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
STEP_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0,
                2.5)
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
            ("loom_kv_cache_capacity_tokens", "Tokens the KV cache holds (blocks x block size).", s.kv_cache_tokens),
            ("loom_swap_blocks_used", "KV blocks of swapped-out requests held in the swap tier.", s.swap_blocks_used),
            ("loom_swap_blocks_total", "KV blocks the swap tier holds (0: no swap tier, --swap-space).",
             s.swap_blocks_total),
            ("loom_pinned_blocks", "KV blocks pinned for sessions' next turns (--session-ttl).", s.pinned_blocks),
            ("loom_pinned_sessions", "Sessions whose last turn's KV is pinned.", s.pinned_sessions),
            ("loom_prefix_cache_hit_rate",
             "Fraction of the prompt tokens of admitted requests that were served from the prefix cache "
             "(each request counted once, at its first admission).", s.prefix_cache_hit_rate),
        )
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=value)
        counters = (
            ("loom_num_preemptions", "Requests preempted (KV cache full), by swapping or by recompute.", s.num_preemptions),
            ("loom_num_swap_preemptions", "Requests preempted by swapping their KV blocks out (the rest recompute).",
             s.num_swap_preemptions),
            ("loom_prompt_tokens", "Prompt tokens received.", s.prompt_tokens),
            ("loom_generation_tokens", "Tokens generated.", s.generation_tokens),
            ("loom_prefix_cache_hit_tokens",
             "Prompt tokens served from the prefix cache (each request counted once, at its first admission).",
             s.prefix_cache_hit_tokens),
            ("loom_engine_steps", "Engine steps (forward passes).", s.steps),
            ("loom_session_followups", "Turns of a session that had finished a turn before.", s.session_followups),
            ("loom_pinned_hits", "Follow-up turns admitted while their session's pin held.", s.pinned_hits),
            ("loom_pins_expired", "Session pins released when their time-to-live ran out.", s.pins_expired),
            ("loom_pins_released_for_memory", "Session pins released early because KV blocks ran short.",
             s.pins_released_for_memory),
        )
        if s.spec is not None:
            counters += (
                ("loom_spec_draft_tokens", f"Draft tokens verified ({s.spec.method} speculative decoding).",
                 s.spec.draft_tokens),
                ("loom_spec_accepted_tokens", "Draft tokens accepted.", s.spec.accepted_tokens),
                ("loom_spec_verifications", "Request-steps that verified drafts.", s.spec.verifications),
                ("loom_spec_skipped", "Decode request-steps the controller gave no drafts (k = 0).",
                 s.spec.steps_without_drafts),
            )
        if "all_reduce" in s.phase_seconds:
            counters += (("loom_tensor_parallel_all_reduce_seconds",
                          "Seconds rank 0 spent in the all-reduces of tensor-parallel forward passes (waiting for "
                          "the other ranks included).", s.phase_seconds["all_reduce"]),)
        for name, doc, value in counters:
            yield CounterMetricFamily(name, doc, value=value)
        yield from _tenant_families(s)
        finished = CounterMetricFamily("loom_slo_requests", "Requests finished, by SLO class (slo policy).", labels=["slo_class"])
        met = CounterMetricFamily("loom_slo_met", "Requests that met their SLO class's targets (slo policy).",
                                  labels=["slo_class"])
        for name, (done, good) in s.slo_classes.items():
            finished.add_metric([name], done)
            met.add_metric([name], good)
        yield finished
        yield met


def _tenant_families(s: EngineStats) -> Iterator[Metric]:
    """Per-tenant counters (tenant "" is requests without one; at most MAX_TENANTS by name)."""
    families = (
        ("loom_tenant_requests", "Requests received, by tenant.", "requests"),
        ("loom_tenant_prompt_tokens", "Prompt tokens received, by tenant.", "prompt_tokens"),
        ("loom_tenant_cached_prompt_tokens", "Prompt tokens served from the prefix cache, by tenant.",
         "cached_prompt_tokens"),
        ("loom_tenant_generation_tokens", "Tokens generated, by tenant.", "generation_tokens"),
        ("loom_tenant_queue_seconds", "Seconds requests waited from arrival to first being scheduled, by tenant.",
         "queue_seconds"),
    )
    for name, doc, attr in families:
        family = CounterMetricFamily(name, doc, labels=["tenant"])
        for tenant, t in s.tenants.items():
            family.add_metric([tenant], getattr(t, attr))
        yield family


class ServerMetrics:
    def __init__(self, stats: Callable[[], EngineStats], collectors: Sequence[Collector] = ()) -> None:
        """``collectors``: more metrics to serve (a cluster's per-replica ones)."""
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
        self.ttft_split = Histogram(
            "loom_time_to_first_token_split_seconds",
            "Time to first token in three parts: queue (arrival to first scheduled), prefill (first scheduled "
            "to the end of the forward pass of the prompt's last chunk), first_token (from there until the "
            "sampled token is appended: logits, sampling, bookkeeping).",
            ["part"], buckets=LATENCY_BUCKETS, registry=r)
        self.step_phase = Histogram("loom_step_phase_seconds",
                                    "Seconds per engine step phase: schedule, execute (forward pass and sampling), "
                                    "update (request bookkeeping, detokenizing, outputs).",
                                    ["phase"], buckets=STEP_BUCKETS, registry=r)
        r.register(_EngineCollector(stats))
        for collector in collectors:
            r.register(collector)
        self._last_token_time: dict[str, float] = {}  # engine thread only

    def observe(self, outputs: list[RequestOutput]) -> None:
        """Output listener: called on the engine thread with each batch of outputs."""
        for out in outputs:
            m = out.metrics
            if m.last_token_time is not None and any(c.delta_token_ids for c in out.outputs):
                previous = self._last_token_time.get(out.request_id)
                if previous is None:
                    if m.ttft is not None:
                        self.ttft.observe(m.ttft)
                        self._observe_ttft_split(out)
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

    def _observe_ttft_split(self, out: RequestOutput) -> None:
        m = out.metrics
        for part, value in (("queue", m.queue_time), ("prefill", m.prefill_time), ("first_token", m.first_token_latency)):
            if value is not None:
                self.ttft_split.labels(part=part).observe(value)

    def observe_step(self, timing: StepTiming) -> None:
        """Step listener: called on the engine thread after each step."""
        self.step_phase.labels(phase="schedule").observe(timing.schedule)
        self.step_phase.labels(phase="execute").observe(timing.execute)
        self.step_phase.labels(phase="update").observe(timing.update)

    def render(self) -> bytes:
        return generate_latest(self.registry)
