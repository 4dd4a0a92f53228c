"""Router policies on synthetic load, the prefix index, and the router's bookkeeping."""

from __future__ import annotations

import pytest

from loom.cluster.router import (
    D2LPM,
    ROUTERS,
    LeastLoad,
    PrefixAware,
    PrefixIndex,
    PrefixOptions,
    ReplicaState,
    RoundRobin,
    Router,
    RouteRequest,
    Workload,
    make_router,
)
from loom.kvcache import PrefixEvents, chain_hashes

BS = 4


def _req(tokens: list[int], tenant: str = "", matched: dict[int, int] | None = None, predicted: int = 10,
         rid: str = "r") -> RouteRequest:
    return RouteRequest(rid, tenant, len(tokens), chain_hashes(tokens, BS), BS, predicted, dict(matched or {}))


def test_round_robin_cycles_over_the_healthy_replicas() -> None:
    policy = RoundRobin()
    replicas = [ReplicaState(0), ReplicaState(1), ReplicaState(2)]
    assert [policy.choose(_req([1]), replicas).index for _ in range(4)] == [0, 1, 2, 0]


def test_least_load_counts_requests_then_kv_use() -> None:
    a, b, c = ReplicaState(0, in_flight=3), ReplicaState(1, in_flight=1, kv_usage=0.9), ReplicaState(2, in_flight=1)
    assert LeastLoad().choose(_req([1]), [a, b, c]) is c


def test_prefix_picks_the_longest_match_unless_it_is_overloaded() -> None:
    policy = PrefixAware(PrefixOptions(balance_abs=4, balance_rel=2.0))
    a, b = ReplicaState(0, in_flight=3), ReplicaState(1, in_flight=0)
    assert policy.choose(_req([1] * 16, matched={0: 12, 1: 4}), [a, b]) is a
    a.in_flight = 5  # 5 - 0 > 4 and 5 > 2 * 0
    assert policy.choose(_req([1] * 16, matched={0: 12, 1: 4}), [a, b]) is b
    # No match anywhere: the least loaded, and among equals the replica caching least.
    c = ReplicaState(2, in_flight=0, cached_blocks=1)
    b.cached_blocks = 9
    assert policy.choose(_req([1] * 16), [a, b, c]) is c


def test_d2lpm_spills_a_tenant_past_its_deficit_to_another_replica() -> None:
    policy = make_router("d2lpm", '{"quantum": 100, "output_weight": 0}')
    assert isinstance(policy, D2LPM)
    a, b = ReplicaState(0), ReplicaState(1)
    chosen = []
    for _ in range(3):
        req = _req([1] * 60, tenant="heavy", matched={0: 40, 1: 0})
        replica = policy.choose(req, [a, b])
        policy.on_routed(req, replica)
        chosen.append(replica.index)
    # 20 uncached tokens a time on replica 0 (its match), until the tenant's deficit there runs out.
    assert chosen[:2] == [0, 0]
    light = _req([2] * 8, tenant="light", matched={})
    assert policy.choose(light, [a, b]).index in (0, 1)
    for _ in range(4):
        req = _req([1] * 60, tenant="heavy", matched={0: 40, 1: 0})
        replica = policy.choose(req, [a, b])
        policy.on_routed(req, replica)
        chosen.append(replica.index)
    assert 1 in chosen  # it left its locality once the deficit there was spent
    assert policy.tenant_deficit["heavy", 0] <= 100 and policy.replica_deficit[0] <= 100


def test_workload_weighs_queued_prefill_and_predicted_decode() -> None:
    policy = Workload(Workload.Options(decode_weight=10.0))
    busy_decode = ReplicaState(0, decode_tokens=100)  # 1,000 prompt-token equivalents queued
    busy_prefill = ReplicaState(1, prefill_tokens=600)
    assert policy.choose(_req([1] * 100, predicted=5), [busy_decode, busy_prefill]) is busy_prefill
    # A long cached prefix on the decode-heavy replica tips it.
    assert policy.choose(_req([1] * 1000, matched={0: 900}, predicted=5), [busy_decode, busy_prefill]) is busy_decode


def test_make_router_names_bad_input() -> None:
    assert set(ROUTERS) == {"round_robin", "least_load", "prefix", "d2lpm", "workload"}
    with pytest.raises(ValueError, match="unknown router 'nope'"):
        make_router("nope")
    with pytest.raises(ValueError, match="takes no options"):
        make_router("round_robin", '{"x": 1}')
    with pytest.raises(ValueError, match="balance_rel"):
        make_router("prefix", '{"balance_rel": 0.5}')
    with pytest.raises(ValueError, match="must be an integer"):
        make_router("d2lpm", '{"quantum": "big"}')


def test_prefix_index_applies_changes_in_order_and_snapshots() -> None:
    index = PrefixIndex()
    hashes = chain_hashes(list(range(12)), BS)
    index.apply(0, PrefixEvents(((True, hashes[0]), (True, hashes[1]), (False, hashes[1]), (True, hashes[1]))))
    assert index.matched_blocks(0, hashes) == 2
    index.apply(0, PrefixEvents(((True, hashes[2]), (False, hashes[0]))))
    assert index.matched_blocks(0, hashes) == 0  # the chain breaks at the first block
    index.apply(0, PrefixEvents(snapshot=(hashes[0],)))
    assert index.matched_blocks(0, hashes) == 1 and index.size(0) == 1
    index.clear(0)
    assert index.size(0) == 0


def test_router_tracks_work_in_flight_and_learns_lengths() -> None:
    router = Router(LeastLoad(), 2, BS, default_output_tokens=50)
    req = router.request("a", "t", list(range(10)), chain_hashes(list(range(10)), BS), max_tokens=None)
    assert req.predicted_output == 50 and req.matched == {0: 0, 1: 0}
    replica = router.choose(req)
    router.routed(req, replica)
    assert (replica.in_flight, replica.prefill_tokens, replica.decode_tokens) == (1, 10, 50)
    # What was routed is in the index at once: the next request with that prefix matches it.
    again = router.request("b", "t", list(range(10)), chain_hashes(list(range(10)), BS), max_tokens=4)
    assert again.matched[replica.index] == 8 and again.predicted_output == 4
    router.progressed("a", 3)
    assert (replica.prefill_tokens, replica.decode_tokens) == (0, 47)
    router.finished("a", learn=True)
    assert (replica.in_flight, replica.decode_tokens) == (0, 0)
    for i in range(8):  # the predictor needs min_samples lengths
        r = router.request(f"c{i}", "t", list(range(10)), [], None)
        router.routed(r, router.choose(r))
        router.progressed(f"c{i}", 7)
        router.finished(f"c{i}", learn=True)
    assert router.request("d", "t", list(range(10)), [], None).predicted_output == 7


def test_a_refused_request_leaves_no_blocks_in_the_index() -> None:
    router = Router(LeastLoad(), 1, BS)
    held = list(range(8))
    router.index.add(0, chain_hashes(held, BS))  # the replica reported these
    tokens = held + list(range(100, 112))  # shares 2 blocks with what it holds, then 3 new ones
    req = router.request("a", "", tokens, chain_hashes(tokens, BS), None)
    router.routed(req, router.replicas[0])
    assert router.index.size(0) == 5
    router.refused("a")
    assert router.index.size(0) == 2 and router.replicas[0].in_flight == 0
    again = router.request("b", "", tokens, chain_hashes(tokens, BS), None)
    assert again.matched[0] == 8  # the held blocks still match


def test_a_lost_replica_is_skipped_and_its_requests_returned() -> None:
    router = Router(RoundRobin(), 2, BS)
    first = router.request("a", "", [1, 2, 3, 4, 5], chain_hashes([1, 2, 3, 4, 5], BS), None)
    replica = router.choose(first)
    router.routed(first, replica)
    assert router.replica_lost(replica.index) == ["a"]
    assert replica.in_flight == 0 and router.index.size(replica.index) == 0
    assert all(router.choose(first).index != replica.index for _ in range(3))
    router.replicas[1 - replica.index].healthy = False
    assert router.choose(first) is None
