"""Which replica serves a request: the router's view of each replica and the routing policies.

Everything here runs on the cluster client's one thread and knows nothing of Ray: the client
feeds it what it routed, what came back and what the replicas reported, and asks for a choice.
Policies (``--router``):

- ``round_robin``: each healthy replica in turn.
- ``least_load``: the fewest requests in flight (routed and unfinished), then the lowest KV use.
- ``prefix``: the replica whose prefix cache holds the longest start of the prompt, from an index
  of the block hashes replicas report (and the router adds as it routes); least load on a tie or
  no match, and least load too when the best match's replica is overloaded against the others.
- ``d2lpm``: D^2LPM (Cao et al., "Locality-aware Fair Scheduling in LLM Serving"): longest
  prefix match among the replicas that have deficit left, both the replica's (load balance) and
  the tenant's on that replica (a tenant's locality may not take more than its share of one
  replica); deficits are charged the predicted cost of each request and refilled by a quantum.
- ``workload``: in the spirit of the Intelligent Router (Jain et al.): the replica whose queued
  work plus this request's cost there is least, counting uncached prompt tokens (prefill) and
  predicted output tokens (decode, weighted by their measured relative cost on a CPU).
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from loom.json_source import json_object, parse_options
from loom.kvcache import PrefixEvents
from loom.scheduler.slo import LengthPredictor, PredictorOptions


@dataclass
class ReplicaState:
    """The router's view of one replica: what it routed there, and the replica's latest report."""

    index: int
    healthy: bool = True
    draining: bool = False  # takes no new requests (POST /admin/drain); its requests migrate away
    in_flight: int = 0  # requests routed here and not finished
    prefill_tokens: int = 0  # uncached prompt tokens of in-flight requests that have no token yet
    decode_tokens: float = 0.0  # predicted output tokens its in-flight requests still make
    kv_usage: float = 0.0  # fraction of KV blocks in use (reported)
    cached_blocks: int = 0  # blocks its prefix cache holds (the index's count)
    routed: int = 0  # requests routed here, ever


@dataclass
class RouteRequest:
    """What a policy knows of a request it routes."""

    request_id: str
    tenant: str
    num_prompt_tokens: int
    block_hashes: list[int]  # of the prompt's full blocks (``loom.kvcache.chain_hashes``)
    block_size: int
    predicted_output: int  # tokens it is predicted to make
    matched: dict[int, int] = field(default_factory=dict)  # replica -> prompt tokens its cache holds
    max_tokens: int | None = None

    def uncached(self, replica: ReplicaState) -> int:
        return self.num_prompt_tokens - self.matched.get(replica.index, 0)


class PrefixIndex:
    """Per replica, the hashes of the blocks its prefix cache holds: what replicas report (in
    order, or a snapshot), plus what the router routed there since (it will be cached soon)."""

    def __init__(self) -> None:
        self._held: dict[int, set[int]] = defaultdict(set)

    def add(self, replica: int, hashes: Sequence[int]) -> list[int]:
        """Hold ``hashes`` too; the ones that were not held already."""
        held = self._held[replica]
        new = [h for h in hashes if h not in held]
        held.update(new)
        return new

    def discard(self, replica: int, hashes: Sequence[int]) -> None:
        held = self._held.get(replica)
        if held:
            held.difference_update(hashes)

    def apply(self, replica: int, events: PrefixEvents) -> None:
        held = self._held[replica]
        if events.snapshot is not None:
            held.clear()
            held.update(events.snapshot)
        for stored, h in events.changes:
            if stored:
                held.add(h)
            else:
                held.discard(h)

    def clear(self, replica: int) -> None:
        self._held.pop(replica, None)

    def matched_blocks(self, replica: int, hashes: Sequence[int]) -> int:
        """How many leading blocks of ``hashes`` the replica holds."""
        held = self._held.get(replica)
        if not held:
            return 0
        n = 0
        for h in hashes:
            if h not in held:
                break
            n += 1
        return n

    def size(self, replica: int) -> int:
        return len(self._held.get(replica, ()))


class RouterPolicy(ABC):
    """Chooses one of the healthy replicas for each request."""

    name: ClassVar[str]
    Options: ClassVar[type] = type(None)  # a frozen dataclass of the policy's --router-config options

    def __init__(self, options: Any = None) -> None:
        self.options = options if options is not None else self.Options()

    @abstractmethod
    def choose(self, request: RouteRequest, replicas: Sequence[ReplicaState]) -> ReplicaState:
        """``replicas``: the healthy ones, never empty."""

    def on_routed(self, request: RouteRequest, replica: ReplicaState) -> None:
        """Called once the request was handed to ``replica``."""


def least_load(replicas: Sequence[ReplicaState]) -> ReplicaState:
    return min(replicas, key=lambda r: (r.in_flight, r.kv_usage, r.index))


class RoundRobin(RouterPolicy):
    name = "round_robin"

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self._turn = itertools.count()

    def choose(self, request: RouteRequest, replicas: Sequence[ReplicaState]) -> ReplicaState:
        return replicas[next(self._turn) % len(replicas)]


class LeastLoad(RouterPolicy):
    name = "least_load"

    def choose(self, request: RouteRequest, replicas: Sequence[ReplicaState]) -> ReplicaState:
        return least_load(replicas)


@dataclass(frozen=True)
class PrefixOptions:
    # The best match's replica is skipped for the least loaded one when it has more than
    # balance_abs requests in flight beyond the least loaded's and more than balance_rel times them.
    balance_abs: int = 8
    balance_rel: float = 2.0

    def __post_init__(self) -> None:
        if self.balance_abs < 0 or self.balance_rel < 1:
            raise ValueError("the prefix router's balance_abs must be >= 0 and balance_rel >= 1")


class PrefixAware(RouterPolicy):
    name = "prefix"
    Options = PrefixOptions

    def choose(self, request: RouteRequest, replicas: Sequence[ReplicaState]) -> ReplicaState:
        least = least_load(replicas)
        best = max(replicas, key=lambda r: (request.matched.get(r.index, 0), -r.in_flight, -r.index))
        if not request.matched.get(best.index):
            # No replica holds any of it: the least loaded, and among equals the one caching least.
            return min(replicas, key=lambda r: (r.in_flight, r.kv_usage, r.cached_blocks, r.index))
        o = self.options
        if best.in_flight - least.in_flight > o.balance_abs and best.in_flight > o.balance_rel * least.in_flight:
            return least
        return best


@dataclass(frozen=True)
class D2LPMOptions:
    quantum: int = 4096  # tokens of deficit each refill adds (a replica's, and a tenant's on it)
    output_weight: float = 2.0  # an output token's charge against a prompt token's (VTC's weights)

    def __post_init__(self) -> None:
        if self.quantum < 1 or self.output_weight < 0:
            raise ValueError("the d2lpm router's quantum must be >= 1 and output_weight >= 0")


class D2LPM(RouterPolicy):
    """Two deficits, each charged the request's cost (uncached prompt tokens + weighted predicted
    output): the replica's, which spreads load, and the tenant's on that replica, which caps how
    much of one replica a tenant's locality takes. A replica is eligible while both are positive;
    the eligible replica with the longest prefix match wins (then the largest deficit). When none
    is eligible, the exhausted deficits are refilled by a quantum (never above one quantum)."""

    name = "d2lpm"
    Options = D2LPMOptions

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self.replica_deficit: dict[int, float] = defaultdict(lambda: float(self.options.quantum))
        self.tenant_deficit: dict[tuple[str, int], float] = defaultdict(lambda: float(self.options.quantum))

    def _eligible(self, request: RouteRequest, replicas: Sequence[ReplicaState]) -> list[ReplicaState]:
        return [r for r in replicas
                if self.replica_deficit[r.index] > 0 and self.tenant_deficit[request.tenant, r.index] > 0]

    def choose(self, request: RouteRequest, replicas: Sequence[ReplicaState]) -> ReplicaState:
        eligible = self._eligible(request, replicas)
        if not eligible:
            q = self.options.quantum
            if all(self.replica_deficit[r.index] <= 0 for r in replicas):
                for r in replicas:
                    self.replica_deficit[r.index] = min(self.replica_deficit[r.index] + q, q)
            if all(self.tenant_deficit[request.tenant, r.index] <= 0 for r in replicas):
                for r in replicas:
                    key = (request.tenant, r.index)
                    self.tenant_deficit[key] = min(self.tenant_deficit[key] + q, q)
            eligible = self._eligible(request, replicas) or list(replicas)
        return max(eligible, key=lambda r: (request.matched.get(r.index, 0), self.replica_deficit[r.index], -r.index))

    def on_routed(self, request: RouteRequest, replica: ReplicaState) -> None:
        cost = request.uncached(replica) + self.options.output_weight * request.predicted_output
        self.replica_deficit[replica.index] -= cost
        self.tenant_deficit[request.tenant, replica.index] -= cost


@dataclass(frozen=True)
class WorkloadOptions:
    # A decoded token's cost in prompt tokens' (prefill) time. Default measured on this project's
    # CPU with the default model: a batch-16 decode step makes 16 tokens in about the time a
    # prefill chunk computes 160 prompt tokens.
    decode_weight: float = 10.0

    def __post_init__(self) -> None:
        if self.decode_weight < 0:
            raise ValueError("the workload router's decode_weight must be >= 0")


class Workload(RouterPolicy):
    name = "workload"
    Options = WorkloadOptions

    def choose(self, request: RouteRequest, replicas: Sequence[ReplicaState]) -> ReplicaState:
        w = self.options.decode_weight

        def work(r: ReplicaState) -> float:
            queued = r.prefill_tokens + w * r.decode_tokens
            return queued + request.uncached(r) + w * request.predicted_output

        return min(replicas, key=lambda r: (work(r), r.index))


ROUTERS: dict[str, type[RouterPolicy]] = {cls.name: cls for cls in (RoundRobin, LeastLoad, PrefixAware, D2LPM, Workload)}


def make_router(name: str, config: str | None = None) -> RouterPolicy:
    """The policy ``name`` with options from ``config`` (a JSON file or inline object);
    ValueError for an unknown name or bad options."""
    cls = ROUTERS.get(name)
    if cls is None:
        raise ValueError(f"unknown router {name!r} (known: {', '.join(ROUTERS)})")
    values = json_object(config, "--router-config") if config else {}
    if cls.Options is type(None):
        if values:
            raise ValueError(f"the {name} router takes no options, got {', '.join(sorted(values))}")
        return cls()
    return cls(parse_options(cls.Options, values, f"the {name} router"))


@dataclass
class _Routed:
    replica: ReplicaState
    tenant: str
    num_prompt_tokens: int
    uncached: int
    predicted: int
    max_tokens: int | None
    provisional: list[int]  # block hashes the index holds for the replica only because this was routed there
    produced: int = 0


class Router:
    """A policy plus the bookkeeping it reads: the prefix index, the work in flight per replica
    and an output-length predictor learned from finished requests."""

    def __init__(self, policy: RouterPolicy, num_replicas: int, block_size: int,
                 default_output_tokens: int = 128) -> None:
        self.policy = policy
        self.replicas = [ReplicaState(i) for i in range(num_replicas)]
        self.block_size = block_size
        self.index = PrefixIndex()
        self.predictor = LengthPredictor(PredictorOptions(length_quantile=0.5))
        self.default_output_tokens = default_output_tokens
        self._routed: dict[str, _Routed] = {}
        self.matched_tokens = 0  # prompt tokens the chosen replica's cache held, per the index
        self.prompt_tokens = 0

    def request(self, request_id: str, tenant: str | None, prompt_ids: Sequence[int], hashes: list[int],
                max_tokens: int | None) -> RouteRequest:
        tenant = tenant or ""
        predicted = self.predictor.remaining_for(tenant, len(prompt_ids), 0)
        if predicted is None:
            predicted = self.default_output_tokens
        if max_tokens is not None:
            predicted = min(predicted, max_tokens)
        req = RouteRequest(request_id, tenant, len(prompt_ids), hashes, self.block_size, predicted, max_tokens=max_tokens)
        for r in self.replicas:
            if r.healthy:
                # The last prompt token is always computed, so a whole-prompt match counts one less.
                blocks = self.index.matched_blocks(r.index, hashes)
                req.matched[r.index] = min(blocks * self.block_size, len(prompt_ids) - 1)
        return req

    def open(self, among: range | None = None) -> list[ReplicaState]:
        """The replicas that take new requests (healthy, not draining), of ``among`` if given."""
        return [r for r in self.replicas if r.healthy and not r.draining and (among is None or r.index in among)]

    def choose(self, request: RouteRequest, exclude: frozenset[int] = frozenset(),
               among: range | None = None) -> ReplicaState | None:
        candidates = [r for r in self.open(among) if r.index not in exclude]
        return self.policy.choose(request, candidates) if candidates else None

    def replica_of(self, request_id: str) -> ReplicaState | None:
        r = self._routed.get(request_id)
        return None if r is None else r.replica

    def context_tokens(self, request_id: str) -> int:
        r = self._routed[request_id]
        return r.num_prompt_tokens + r.produced

    def remaining_tokens(self, request_id: str) -> int:
        """Output tokens the request is predicted still to make (its length so far says the most)."""
        r = self._routed[request_id]
        left = self.predictor.remaining_for(r.tenant, r.num_prompt_tokens, r.produced)
        if left is None:
            left = max(self.default_output_tokens - r.produced, 1)
        return left if r.max_tokens is None else min(left, r.max_tokens - r.produced)

    def in_flight_on(self, replica: int) -> list[str]:
        return [rid for rid, r in self._routed.items() if r.replica.index == replica]

    def moved(self, request_id: str, to: ReplicaState) -> None:
        """The request continues on ``to``: its remaining work moves with it."""
        r = self._routed.get(request_id)
        if r is None or r.replica is to:
            return
        old = r.replica
        left = max(r.predicted - r.produced, 0)
        old.in_flight -= 1
        old.decode_tokens -= left
        if r.produced == 0:
            old.prefill_tokens -= r.uncached
            r.uncached = 0
        to.in_flight += 1
        to.decode_tokens += left
        r.replica = to

    def routed(self, request: RouteRequest, replica: ReplicaState) -> None:
        self.policy.on_routed(request, replica)
        uncached = request.uncached(replica)
        provisional = self.index.add(replica.index, request.block_hashes)
        self._routed[request.request_id] = _Routed(replica, request.tenant, request.num_prompt_tokens, uncached,
                                                   request.predicted_output, request.max_tokens, provisional)
        replica.in_flight += 1
        replica.routed += 1
        replica.prefill_tokens += uncached
        replica.decode_tokens += request.predicted_output
        self.matched_tokens += request.matched.get(replica.index, 0)
        self.prompt_tokens += request.num_prompt_tokens

    def progressed(self, request_id: str, num_generated: int) -> None:
        """The request has made ``num_generated`` tokens in all."""
        r = self._routed.get(request_id)
        if r is None or num_generated <= r.produced:
            return
        if r.produced == 0:
            r.replica.prefill_tokens -= r.uncached
        made = num_generated - r.produced
        r.replica.decode_tokens -= min(made, max(r.predicted - r.produced, 0))
        r.produced = num_generated

    def finished(self, request_id: str, learn: bool) -> None:
        """The request is done (``learn``: it ended on its own, so its length is a sample)."""
        r = self._routed.pop(request_id, None)
        if r is None:
            return
        if r.produced == 0:
            r.replica.prefill_tokens -= r.uncached
        r.replica.decode_tokens -= max(r.predicted - r.produced, 0)
        r.replica.in_flight -= 1
        if learn:
            self.predictor.observe_length(r.tenant, r.num_prompt_tokens, r.produced)

    def refused(self, request_id: str) -> None:
        """The replica refused the request: it will not cache its prompt, so the index drops the
        blocks it assumed at routing (a block another request stored there meanwhile goes too, and
        comes back with the replica's next snapshot)."""
        r = self._routed.get(request_id)
        if r is not None:
            self.index.discard(r.replica.index, r.provisional)
            self.finished(request_id, learn=False)

    def replica_lost(self, index: int) -> list[str]:
        """Mark a replica down and forget its cache; the ids of the requests it had in flight."""
        replica = self.replicas[index]
        replica.healthy = False
        self.index.clear(index)
        replica.cached_blocks = 0
        lost = [rid for rid, r in self._routed.items() if r.replica is replica]
        for rid in lost:
            self.finished(rid, learn=False)
        return lost

    def reported(self, index: int, kv_usage: float, events: PrefixEvents) -> None:
        replica = self.replicas[index]
        replica.kv_usage = kv_usage
        self.index.apply(index, events)
        replica.cached_blocks = self.index.size(index)
