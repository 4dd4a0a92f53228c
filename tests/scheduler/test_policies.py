"""The scheduling policies: options, ordering, victims, priority preemption, fairness bounds."""

from __future__ import annotations

import itertools
import time

import pytest

from loom.config import SchedulerConfig
from loom.kvcache import KVCacheManager
from loom.request import Request
from loom.sampling import SamplingParams
from loom.scheduler import Scheduler, make_policy
from loom.step import RequestResult, StepPlan, StepResult

EOS = 2
_ids = itertools.count(1000)


def make(policy="fcfs", options=None, weights=None, num_blocks=64, block_size=4, budget=16, max_seqs=8):
    kv = KVCacheManager(num_blocks, block_size)
    config = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs)
    return Scheduler(config, kv, (EOS,), make_policy(policy, options, weights)), kv


def req(rid, length, t, priority=0, tenant=None, prompt=None, max_tokens=4):
    tokens = prompt if prompt is not None else [next(_ids) for _ in range(length)]
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return Request(rid, list(tokens), params, arrival_time=t, priority=priority, tenant=tenant,
                   max_total_tokens=len(tokens) + max_tokens)


def run(sched: Scheduler, plan: StepPlan) -> None:
    results = {s.request.request_id: RequestResult((7,)) for s in plan.scheduled if s.sample}
    sched.update(plan, StepResult(results, forward_end_time=0.0))


def drain(sched: Scheduler, steps=10_000) -> None:
    for _ in range(steps):
        if not (sched.running or sched.waiting):
            return
        run(sched, sched.schedule())
    raise AssertionError("the scheduler did not drain")


# -- options -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("policy", "options", "weights", "message"),
    [
        ("vtc", '{"quantum": 1}', None, "unknown option 'quantum' for the vtc policy"),
        ("vtc", {"input_weight": "1"}, None, "option 'input_weight' must be a number"),
        ("vtc", {"input_weight": 0, "output_weight": 0}, None, "cannot both be 0"),
        ("dlpm", {"quantum": 0}, None, "quantum must be a finite number > 0"),
        ("lpm", {"max_scan": 1.5}, None, "max_scan' must be an integer"),
        ("priority", {"aging_seconds": -1}, None, "aging_seconds must be a finite number > 0"),
        ("priority", {"preempt": 1}, None, "must be true or false"),
        ("priority", "[1]", None, "policy options must be a JSON object"),
        ("priority", "/no/such.json", None, "no such file"),
        ("fcfs", None, '{"a": 1}', "tenant weights are used by the vtc and dlpm policies, not fcfs"),
        ("vtc", None, '{"a": 0}', "tenant 'a': weight must be a finite number > 0"),
        ("vtc", None, "{}", "name no tenant"),
        ("vtc", None, "{oops", "not valid JSON"),
    ],
)
def test_bad_policy_options_are_named(policy, options, weights, message):
    with pytest.raises(ValueError, match=message):
        make_policy(policy, options, weights)


def test_options_and_weights_load_from_files(tmp_path):
    (tmp_path / "opts.json").write_text('{"quantum": 64, "max_scan": 8}')
    (tmp_path / "w.json").write_text('{"gold": 3, "*": 1}')
    p = make_policy("dlpm", str(tmp_path / "opts.json"), str(tmp_path / "w.json"))
    assert (p.options.quantum, p.options.max_scan) == (64, 8)
    assert (p.share("gold"), p.share("anyone")) == (3.0, 1.0)


def test_unknown_tenant_is_refused_without_a_default_weight():
    sched, _ = make("vtc", weights='{"a": 1, "b": 2}')
    sched.check(req("x", 4, 0.0, tenant="a"))
    with pytest.raises(ValueError, match=r"unknown tenant 'c': the tenant weights name 'a', 'b' and no '\*'"):
        sched.check(req("y", 4, 0.0, tenant="c"))
    with pytest.raises(ValueError, match="unknown tenant ''"):
        sched.check(req("z", 4, 0.0))


# -- priority -------------------------------------------------------------------------------------
def test_priority_orders_the_queue_by_priority_then_arrival():
    sched, _ = make("priority", max_seqs=1, budget=64)
    for rid, t, prio in (("a", 0.0, 1), ("b", 1.0, 0), ("c", 2.0, 0), ("d", 3.0, 2)):
        sched.add(req(rid, 4, t, prio))
    order = []
    while sched.waiting or sched.running:
        plan = sched.schedule()
        order += [s.request.request_id for s in plan.scheduled if s.start == 0]
        run(sched, plan)
    assert order == ["b", "c", "a", "d"]


def test_important_arrival_preempts_the_least_important_running_request_for_a_seat():
    sched, kv = make("priority", max_seqs=2, budget=64)
    low, mid = req("low", 4, 0.0, priority=5), req("mid", 4, 1.0, priority=3)
    sched.add(low)
    sched.add(mid)
    run(sched, sched.schedule())
    high = req("high", 4, 2.0, priority=0)
    sched.add(high)
    plan = sched.schedule()
    assert plan.preempted == [low] and low in sched.waiting and low.metrics.num_preemptions == 1
    assert {s.request.request_id for s in plan.scheduled} == {"mid", "high"}
    equal = req("equal", 4, 3.0, priority=3)  # not strictly more important than mid: waits
    sched.add(equal)
    assert sched.schedule().preempted == []
    drain(sched)
    assert kv.num_free_blocks == kv.num_blocks and all(r.is_finished for r in (low, mid, high, equal))


def test_important_arrival_preempts_for_blocks():
    sched, kv = make("priority", num_blocks=6, block_size=4, budget=64)
    low = req("low", 16, 0.0, priority=1)
    sched.add(low)
    run(sched, sched.schedule())  # holds 5 of 6 blocks
    high = req("high", 8, 1.0, priority=0)
    sched.add(high)
    plan = sched.schedule()
    assert plan.preempted == [low] and [s.request for s in plan.scheduled] == [high]
    drain(sched)
    assert kv.num_free_blocks == kv.num_blocks and low.output_token_ids == [7] * 4


def test_preempt_false_only_orders_the_queue():
    sched, _ = make("priority", {"preempt": False}, max_seqs=1, budget=64)
    sched.add(req("low", 4, 0.0, priority=1))
    run(sched, sched.schedule())
    sched.add(req("high", 4, 1.0, priority=0))
    assert sched.schedule().preempted == []


def test_aging_lets_old_best_effort_work_overtake_new_important_work():
    policy = make_policy("priority", {"aging_seconds": 10.0})
    old, new = req("old", 4, 0.0, priority=3), req("new", 4, 100.0, priority=0)
    assert policy.effective_priority(old, 25.0) == 1 and policy.effective_priority(old, 100.0) == -7
    assert min((new, old), key=lambda r: policy.sort_key(r, 100.0)) is old
    assert not policy.preempts(new, old, 100.0)  # the aged request is no longer the least important
    assert make_policy("priority").sort_key(old, 100.0) > make_policy("priority").sort_key(new, 100.0)


# -- vtc ------------------------------------------------------------------------------------------
def test_vtc_serves_the_least_served_tenant_first_and_charges_weighted_tokens():
    sched, _ = make("vtc", max_seqs=1, budget=64)
    policy = sched.policy
    sched.add(req("a1", 8, 0.0, tenant="a"))
    sched.add(req("a2", 8, 1.0, tenant="a"))
    sched.add(req("b1", 8, 2.0, tenant="b"))
    plan = sched.schedule()
    assert [s.request.request_id for s in plan.scheduled] == ["a1"]
    assert policy.counters["a"] == 8 * 1.0 + 1 * 2.0  # 8 prompt tokens, the first sampled token
    run(sched, plan)
    for _ in range(3):  # a1's other 3 tokens
        run(sched, sched.schedule())
    plan = sched.schedule()
    assert [s.request.request_id for s in plan.scheduled] == ["b1"]  # b has less service than a


def test_vtc_lifts_a_returning_tenant_to_the_active_minimum():
    policy = make_policy("vtc")
    a, b = req("a", 4, 0.0, tenant="a"), req("b", 4, 0.0, tenant="b")
    policy.on_arrival(a, 0.0)
    policy.on_scheduled(a, 100, 0)
    policy.on_arrival(b, 0.0)
    assert policy.counters["b"] == 100  # joined while a was active: no credit for idle time
    policy.on_finished(a)
    policy.on_scheduled(b, 50, 0)
    policy.on_finished(b)
    late = req("late", 4, 5.0, tenant="c")
    policy.on_arrival(late, 5.0)
    assert policy.counters["c"] == 150  # nobody active: lifted to where the last one left off


def test_vtc_tenant_weights_scale_the_charge():
    policy = make_policy("vtc", None, '{"gold": 2, "*": 1}')
    gold, plain = req("g", 4, 0.0, tenant="gold"), req("p", 4, 0.0, tenant="plain")
    for r in (gold, plain):
        policy.on_arrival(r, 0.0)
    for r in (gold, plain):
        policy.on_scheduled(r, 10, 5)
    assert (policy.counters["gold"], policy.counters["plain"]) == (10.0, 20.0)


def _backlogged_run(policy: str, steps: int, **kw):
    """Tenant a sends 10x the requests of b, c and d, all at once; the counters are sampled while
    everyone still has work waiting."""
    sched, _ = make(policy, num_blocks=64, block_size=4, budget=32, max_seqs=4, **kw)
    t = 0.0
    for tenant, n in (("a", 40), ("b", 4), ("c", 4), ("d", 4)):
        for i in range(n):
            sched.add(req(f"{tenant}{i}", 12, t, tenant=tenant, max_tokens=6))
            t += 0.001
    served: dict[str, int] = {}
    for _ in range(steps):
        plan = sched.schedule()
        for s in plan.scheduled:
            served[s.request.tenant] = served.get(s.request.tenant, 0) + s.num_new_tokens
        run(sched, plan)
    waiting = {r.tenant for r in sched.waiting}
    return sched, served, waiting


def test_vtc_keeps_backlogged_tenants_within_the_paper_bound():
    sched, served, waiting = _backlogged_run("vtc", 12)
    assert waiting == {"a", "b", "c", "d"}  # all still backlogged
    counters = sched.policy.counters
    # Theorem (VTC): backlogged tenants' service differs by at most 2 x (w_in x max input + w_out x M),
    # M the tokens a batch holds.
    bound = 2 * (1.0 * 12 + 2.0 * 64 * 4)
    assert max(counters.values()) - min(counters.values()) <= bound
    assert max(counters.values()) - min(counters.values()) <= 2 * (12 + 2 * 6)  # and far tighter here
    _, fcfs_served, _ = _backlogged_run("fcfs", 12)
    assert set(fcfs_served) == {"a"}  # FCFS serves only the heavy tenant meanwhile


# -- lpm / dlpm -----------------------------------------------------------------------------------
def _warm_prefix(sched: Scheduler, prefix: list[int]) -> None:
    """Compute ``prefix`` + 1 token once, so its blocks sit in the prefix cache."""
    warm = req("warm", 0, 0.0, prompt=prefix + [next(_ids)], max_tokens=1)
    sched.add(warm)
    drain(sched)


def test_lpm_admits_the_longest_cached_prefix_first():
    sched, kv = make("lpm", max_seqs=1, budget=64)
    shared = [next(_ids) for _ in range(16)]
    _warm_prefix(sched, shared)
    cold = req("cold", 20, 1.0)
    hot = req("hot", 0, 2.0, prompt=shared + [next(_ids) for _ in range(4)])
    sched.add(cold)
    sched.add(hot)
    assert kv.cached_prefix_tokens(hot) == 16 and kv.cached_prefix_tokens(cold) == 0
    plan = sched.schedule()
    assert [s.request for s in plan.scheduled] == [hot] and plan.scheduled[0].start == 16


def test_dlpm_prefers_locality_within_a_tenant_deficit_then_rotates():
    sched, _ = make("dlpm", {"quantum": 30}, max_seqs=1, budget=64)
    shared = [next(_ids) for _ in range(16)]
    _warm_prefix(sched, shared)
    for i in range(6):  # tenant a shares the cached prefix; b does not
        sched.add(req(f"a{i}", 0, 1.0 + i, tenant="a", prompt=shared + [next(_ids) for _ in range(4)]))
    for i in range(2):
        sched.add(req(f"b{i}", 20, 1.5 + i, tenant="b"))
    order = []
    while sched.waiting or sched.running:
        plan = sched.schedule()
        order += [s.request.request_id for s in plan.scheduled if s.request.request_id not in order]
        run(sched, plan)
    # Round 1: both get 30. a's requests cost 4 prompt + 4 x 2 output = 12 and share the cached
    # prefix, so they go first (locality) until a's deficit is spent after three; then b's turn.
    assert order == ["a0", "a1", "a2", "b0", "b1", "a3", "a4", "a5"], order


def test_dlpm_bounds_a_heavy_tenant_like_vtc():
    sched, served, waiting = _backlogged_run("dlpm", 12, options={"quantum": 24})
    assert waiting == {"a", "b", "c", "d"}
    assert max(served.values()) <= 2.5 * min(served.values())


# -- slo / sjf ------------------------------------------------------------------------------------
def _finished(length_out, prompt_len=8, tenant=None):
    r = req(f"f{next(_ids)}", prompt_len, 0.0, tenant=tenant, max_tokens=length_out)
    r.output_token_ids = [7] * length_out
    r.finish_reason = "length"
    return r


def test_length_predictor_uses_the_finest_feature_with_history():
    from loom.scheduler.slo import LengthPredictor, PredictorOptions

    p = LengthPredictor(PredictorOptions(length_quantile=0.5, min_samples=2))
    fresh = req("q", 8, 0.0, tenant="a")
    assert p.remaining(fresh) is None  # nothing learned yet
    for n in (10, 20, 30):
        p.observe(_finished(n, tenant="a"))
    for n in (100, 200):
        p.observe(_finished(n, prompt_len=300, tenant="b"))
    assert p.remaining(fresh) == 20  # the median of tenant a's short prompts
    fresh.output_token_ids = [7] * 15  # 15 generated: of the longer ones (20, 30), 5 or 15 remain
    assert p.remaining(fresh) == 5 and p.remaining(fresh, 1.0) == 15
    fresh.output_token_ids = [7] * 40  # longer than anything seen: as many again
    assert p.remaining(fresh) == 40
    other = req("r", 8, 0.0, tenant="c")  # unknown tenant: its prompt-length bucket decides
    assert p.remaining(other) == 20


def test_past_future_peak_and_admission():
    policy = make_policy("slo")
    a, b = req("a", 10, 0.0, max_tokens=5), req("b", 20, 0.0, max_tokens=50)
    # No history: each runs to its cap. Peaks: just before a ends (10+5 + 20+5), before b ends (20+50).
    assert policy.future_peak_tokens([a, b]) == 70
    assert policy.future_peak_tokens([a, b], block_size=4) == 70 + 3
    sched, kv = make("slo", num_blocks=16, block_size=4, budget=64, max_seqs=8)  # 64 tokens
    first, second = req("x", 8, 0.0, max_tokens=40), req("y", 8, 1.0, max_tokens=40)
    sched.add(first)
    sched.add(second)
    plan = sched.schedule()
    assert [s.request for s in plan.scheduled] == [first]  # both would need 96 > 64 tokens at their peak
    assert sched.policy.num_refused >= 1


def test_slo_admission_never_evicts_where_fcfs_does():
    def preemptions(policy):
        sched, kv = make(policy, num_blocks=24, block_size=4, budget=64, max_seqs=8)
        for i in range(10):
            sched.add(req(f"r{i}", 8, float(i), max_tokens=30))
        drain(sched)
        assert kv.num_free_blocks == kv.num_blocks
        return sched.num_preemptions

    assert preemptions("fcfs") > 0
    assert preemptions("slo") == 0


def test_slo_orders_by_slack_then_no_target_then_hopeless():
    policy = make_policy("slo", {"classes": {"interactive": {"ttft": 2.0}, "deadline": {"e2e": 10.0}, "batch": {}}})
    urgent = req("urgent", 4, 0.0)  # interactive: ttft due at 2.0
    relaxed = req("relaxed", 4, 0.0)
    relaxed.slo_class = "deadline"  # due at 10.0
    bulk = req("bulk", 4, 0.0)
    bulk.slo_class = "batch"
    late = req("late", 4, -5.0)  # its 2 s TTFT has passed: hopeless
    now = 1.0
    order = sorted([bulk, late, relaxed, urgent], key=lambda r: policy.sort_key(r, now))
    assert [r.request_id for r in order] == ["urgent", "relaxed", "bulk", "late"]
    assert policy.slack(urgent, now) == pytest.approx(1.0) and policy.slack(bulk, now) == float("inf")
    assert policy.select_victim([urgent, relaxed, bulk], now) is bulk


def test_slo_classes_are_checked_and_reported():
    with pytest.raises(ValueError, match="SLO class 'x': ttft must be a finite number"):
        make_policy("slo", {"classes": {"x": {"ttft": -1}}})
    with pytest.raises(ValueError, match="default_class 'fast' is not one of the classes"):
        make_policy("slo", {"default_class": "fast"})
    with pytest.raises(ValueError, match="length_quantile must be in"):
        make_policy("sjf", {"length_quantile": 0})
    sched, _ = make("slo")
    odd = req("odd", 4, 0.0)
    odd.slo_class = "platinum"
    with pytest.raises(ValueError, match="unknown SLO class 'platinum'"):
        sched.check(odd)
    ok, slow = req("ok", 4, time.monotonic(), max_tokens=2), req("slow", 4, time.monotonic() - 60, max_tokens=2)
    sched.add(ok)
    sched.add(slow)
    drain(sched)
    assert sched.policy.slo_report() == {"interactive": (2, 1)}  # slow arrived 60 s ago: its 2 s TTFT is missed


def test_sjf_runs_the_shortest_predicted_output_first():
    sched, _ = make("sjf", {"min_samples": 1}, max_seqs=1, budget=64)
    for n in (3, 30):
        sched.policy.predictor.observe(_finished(n, prompt_len=4 if n == 3 else 64))
    long_, short = req("long", 64, 0.0, max_tokens=1), req("short", 4, 1.0, max_tokens=1)
    sched.add(long_)
    sched.add(short)
    assert [s.request for s in sched.schedule().scheduled] == [short]


# -- preemption by swapping -----------------------------------------------------------------------
def test_swap_out_then_back_in_a_group_of_blocks_per_step():
    from loom.step import SwitchCosts

    kv = KVCacheManager(6, 4)
    costs = SwitchCosts(1e-6, 1e-3, swap_capacity_blocks=8, mode="swap", blocks_per_step=1)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8), kv, (EOS,), make_policy("fcfs"),
                      costs)
    a, b = req("a", 12, 0.0, max_tokens=8), req("b", 8, 1.0, max_tokens=2)  # 5 + 3 blocks > 6
    sched.add(a)
    run(sched, sched.schedule())  # a holds 4 blocks (13 tokens once its first token is in)
    sched.add(b)
    plan = sched.schedule()  # a grows to its 4th block; b's admission waits
    run(sched, plan)
    for _ in range(4):
        plan = sched.schedule()
        if plan.preempted:
            break
        run(sched, plan)
    assert plan.preempted and plan.swap_out
    victim = plan.preempted[0]
    rid, blocks = plan.swap_out[0]
    assert rid == victim.request_id and len(blocks) == -(-victim.num_swapped_tokens // 4)
    assert sched.num_swap_preemptions == 1 and sched.swap_free_blocks == 8 - len(blocks)
    run(sched, plan)
    loads = []
    for _ in range(40):
        plan = sched.schedule()
        loads += [(s.start, len(s.block_ids), s.last) for s in plan.swap_in if s.request_id == victim.request_id]
        assert not any(s.request is victim for s in plan.scheduled) or victim.swap_in_pending == 0
        run(sched, plan)
        if not (sched.running or sched.waiting):
            break
    n = len(blocks)
    assert loads == [(i, 1, i == n - 1) for i in range(n)]  # a block per step, once: no thrash
    assert a.is_finished and b.is_finished and kv.num_free_blocks == kv.num_blocks and sched.swap_free_blocks == 8


def test_a_request_finished_while_swapped_out_drops_its_host_copy():
    from loom.step import SwitchCosts

    kv = KVCacheManager(16, 4)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8), kv, (EOS,), make_policy("fcfs"),
                      SwitchCosts(1e-6, 1e-3, swap_capacity_blocks=8, mode="swap"))
    a = req("a", 8, 0.0, max_tokens=20)
    sched.add(a)
    run(sched, sched.schedule())
    plan = StepPlan()
    sched._preempt(a, plan)
    assert plan.swap_out == [("a", a.block_ids or plan.swap_out[0][1])] and a.num_swapped_tokens == 8
    sched.finish(a, "abort")
    assert sched.schedule().swap_drop == ["a"] and sched.swap_free_blocks == 8


def test_the_cost_model_picks_the_cheaper_way():
    from loom.step import SwitchCosts

    costs = SwitchCosts(swap_seconds_per_block=0.001, recompute_seconds_per_token=0.0001, swap_capacity_blocks=10)
    assert costs.prefers_swap(4, 64)  # 4 ms to swap vs 6.4 ms to recompute
    assert not costs.prefers_swap(4, 32)
    assert SwitchCosts(1.0, 1e-9, 10, mode="swap").prefers_swap(4, 1)


def test_less_important_prefill_chunks_wait_while_an_important_request_prefills():
    sched, _ = make("priority", budget=16, num_blocks=64)
    low = req("low", 40, 0.0, priority=1)
    sched.add(low)
    run(sched, sched.schedule())  # low is 16 tokens into its 40-token prompt
    high = req("high", 6, 1.0, priority=0)
    sched.add(high)
    plan = sched.schedule()
    assert [(s.request.request_id, s.num_new_tokens) for s in plan.scheduled] == [("high", 6)]
    run(sched, plan)
    assert [s.request.request_id for s in sched.schedule().scheduled] == ["high", "low"]  # high decodes now
    fcfs, _ = make("fcfs", budget=16, num_blocks=64)
    fcfs.add(req("low", 40, 0.0))
    run(fcfs, fcfs.schedule())
    fcfs.add(req("high", 6, 1.0, priority=0))
    assert [s.num_new_tokens for s in fcfs.schedule().scheduled] == [16]
