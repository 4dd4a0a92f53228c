"""Settings of a cluster of replicas (``loom serve --replicas N``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ClusterConfig:
    """``replicas``: engine replicas, each a Ray actor in its own process. ``router``: the routing
    policy (``loom.cluster.router.ROUTERS``), with options from ``router_config`` (a JSON file or
    inline object). ``ray_address``: a running Ray cluster to join (None: start a local Ray with
    this machine's cores). ``replica_threads``: compute threads (and Ray CPUs) per replica (None:
    the cores divided among the replicas). ``max_restarts``: times Ray restarts a replica that
    died. ``report_interval``: seconds between the router's reads of each replica's stats and
    prefix-cache changes. ``prefill_replicas``: of the replicas, how many only compute prompts and
    hand each request off after its first token to the others, which decode (DistServe,
    Splitwise); 0: every replica does both. ``rebalance``: migrate running requests from the
    busiest replica to the least busy when they differ by ``rebalance_gap`` requests or more."""

    replicas: int = 2
    router: str = "prefix"
    router_config: str | None = None
    ray_address: str | None = None
    replica_threads: int | None = None
    max_restarts: int = 3
    report_interval: float = 0.25
    prefill_replicas: int = 0
    rebalance: bool = False
    rebalance_gap: int = 4

    def __post_init__(self) -> None:
        from loom.cluster.router import make_router

        if self.replicas < 1:
            raise ValueError(f"replicas (--replicas) must be >= 1, got {self.replicas}")
        if self.replica_threads is not None and self.replica_threads < 1:
            raise ValueError(f"replica_threads (--replica-threads) must be >= 1, got {self.replica_threads}")
        if self.max_restarts < 0:
            raise ValueError(f"max_restarts (--max-restarts) must be >= 0, got {self.max_restarts}")
        if not self.report_interval > 0:
            raise ValueError(f"report_interval must be > 0 seconds, got {self.report_interval}")
        if not 0 <= self.prefill_replicas < self.replicas:
            raise ValueError(f"prefill_replicas (--prefill-replicas) must leave at least one decode replica: got "
                             f"{self.prefill_replicas} of {self.replicas} replicas")
        if self.rebalance_gap < 2:
            raise ValueError(f"rebalance_gap must be >= 2 requests, got {self.rebalance_gap}")
        make_router(self.router, self.router_config)  # names a bad router or option now

    @property
    def disaggregated(self) -> bool:
        return self.prefill_replicas > 0

    @property
    def prefill(self) -> range:
        """The replicas that take new requests first: the prefill ones, or all."""
        return range(self.prefill_replicas or self.replicas)

    @property
    def decode(self) -> range:
        """The replicas requests are handed off to (those that decode), or all."""
        return range(self.prefill_replicas, self.replicas)
