"""Per-replica and router metrics for ``/metrics`` (``loom_replica_*``, ``loom_router_*``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, SummaryMetricFamily
from prometheus_client.registry import Collector

from loom.cluster.client import ClusterClient


class ClusterCollector(Collector):
    def __init__(self, client: ClusterClient) -> None:
        self._client = client

    def collect(self) -> Iterator[Metric]:
        snapshots = self._client.replica_snapshots()
        families: tuple[tuple[type, str, str, Callable], ...] = (
            (GaugeMetricFamily, "loom_replica_up", "1 while the replica serves, 0 while it is down or restarting.",
             lambda s: int(s.up)),
            (GaugeMetricFamily, "loom_replica_draining", "1 while the replica takes no new requests (drained).",
             lambda s: int(s.draining)),
            (CounterMetricFamily, "loom_replica_restarts", "Times the replica came back after dying.",
             lambda s: s.restarts),
            (CounterMetricFamily, "loom_replica_requests_routed", "Requests the router sent to the replica.",
             lambda s: s.routed),
            (GaugeMetricFamily, "loom_replica_requests_in_flight", "Requests routed to the replica and not finished.",
             lambda s: s.in_flight),
            (GaugeMetricFamily, "loom_replica_kv_cache_usage_ratio", "Fraction of the replica's KV blocks in use.",
             lambda s: 1 - s.stats.num_free_blocks / max(s.stats.num_blocks, 1)),
            (GaugeMetricFamily, "loom_replica_prefix_cache_hit_rate",
             "Fraction of the replica's admitted prompt tokens served from its prefix cache.",
             lambda s: s.stats.prefix_cache_hit_rate),
        )
        for kind, name, doc, value in families:
            family = kind(name, doc, labels=["replica"])
            for s in snapshots:
                family.add_metric([str(s.index)], value(s))
            yield family
        moves = self._client.move_totals
        for name, doc, column in (
            ("loom_kv_transfer_bytes", "KV cache bytes moved between replicas, by kind (handoff: prefill to decode; "
                                       "migration).", 1),
            ("loom_kv_transfer_tokens", "Context tokens of the requests moved, by kind.", 4),
        ):
            family = CounterMetricFamily(name, doc, labels=["kind"])
            for kind, totals in moves.items():
                family.add_metric([kind], totals[column])
            yield family
        for name, doc, column in (
            ("loom_kv_transfer_seconds", "Seconds to move a request's KV blocks: copy out, fetch, write in (a "
                                         "migration's final stage), by kind.", 2),
            ("loom_move_downtime_seconds", "Seconds from the source being asked to stop a moved request to the target "
                                           "taking the handoff, by kind.", 3),
        ):
            family = SummaryMetricFamily(name, doc, labels=["kind"])
            for kind, totals in moves.items():
                family.add_metric([kind], count_value=totals[0], sum_value=totals[column])
            yield family
        router = self._client.router
        yield CounterMetricFamily("loom_router_prompt_tokens", "Prompt tokens of the requests routed.",
                                  value=router.prompt_tokens)
        yield CounterMetricFamily("loom_router_matched_tokens",
                                  "Prompt tokens the chosen replica's prefix cache held when routed, per the "
                                  "router's index.", value=router.matched_tokens)
