from loom.config import SchedulerConfig
from loom.kvcache import KVCacheManager
from loom.request import Request, RequestStatus
from loom.sampling import SamplingParams
from loom.scheduler import Scheduler, make_policy

import pytest


def make(num_blocks=64, block_size=4, budget=16, max_seqs=8):
    kv = KVCacheManager(num_blocks, block_size)
    return Scheduler(SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs), kv), kv


def req(rid, n, t, priority=0):
    return Request(rid, list(range(100 * len(rid), 100 * len(rid) + n)), SamplingParams(), arrival_time=t, priority=priority)


def complete(sched_out):
    """Pretend the model ran: advance computed tokens and append a token to finished prefills."""
    for s in sched_out.scheduled:
        r = s.request
        done = s.completes
        r.num_computed_tokens += s.num_new_tokens
        if done:
            r.output_token_ids.append(7)


def test_chunked_prefill_respects_budget_and_decodes_go_first():
    sched, _ = make(budget=16)
    a = req("a", 4, 0.0)
    sched.add(a)
    complete(sched.schedule())  # a prefilled, has 1 output token
    b = req("bb", 40, 1.0)
    sched.add(b)
    out = sched.schedule()
    assert [(s.request, s.num_new_tokens) for s in out.scheduled] == [(a, 1), (b, 15)]
    complete(out)
    out = sched.schedule()
    assert [(s.request, s.num_new_tokens) for s in out.scheduled] == [(a, 1), (b, 15)]


def test_max_num_seqs_caps_running():
    sched, _ = make(budget=100, max_seqs=2)
    for i, rid in enumerate(["a", "bb", "ccc"]):
        sched.add(req(rid, 3, float(i)))
    out = sched.schedule()
    assert len(out.scheduled) == 2 and len(sched.waiting) == 1


def test_preemption_picks_lowest_priority_latest_arrival_and_keeps_outputs():
    sched, kv = make(num_blocks=4, block_size=4, budget=64)
    a = req("a", 8, 0.0, priority=0)
    b = req("bb", 8, 1.0, priority=0)
    sched.add(a)
    sched.add(b)
    complete(sched.schedule())  # each holds 2 blocks (8 slots) and now has 9 tokens
    out = sched.schedule()  # both need a third block: b (latest) is preempted
    assert out.preempted == [b]
    assert b.status is RequestStatus.PREEMPTED and b.output_token_ids == [7] and b.num_computed_tokens == 0
    assert [s.request for s in out.scheduled] == [a]
    assert b in sched.waiting and sched.num_preemptions == 1


def test_preemption_prefers_lower_priority_over_later_arrival():
    sched, kv = make(num_blocks=4, block_size=4, budget=64)
    a = req("a", 8, 0.0, priority=5)  # less important, arrived first
    b = req("bb", 8, 1.0, priority=0)
    sched.add(a)
    sched.add(b)
    complete(sched.schedule())
    out = sched.schedule()
    assert out.preempted == [a]


def test_preempted_request_is_recomputed_with_its_outputs():
    sched, kv = make(num_blocks=4, block_size=4, budget=64)
    a, b = req("a", 8, 0.0), req("bb", 8, 1.0)
    sched.add(a)
    sched.add(b)
    complete(sched.schedule())
    complete(sched.schedule())  # b preempted, a decodes
    sched.remove(a)
    a.status = RequestStatus.FINISHED
    out = sched.schedule()
    (s,) = out.scheduled
    assert s.request is b and s.start + s.num_new_tokens == b.num_tokens == 9


def test_prefix_hits_skip_computation():
    sched, kv = make(budget=64)
    a = req("a", 9, 0.0)
    sched.add(a)
    complete(sched.schedule())
    kv.cache_full_blocks(a)
    b = Request("b", list(a.prompt_token_ids), SamplingParams(), arrival_time=1.0)
    sched.add(b)
    out = sched.schedule()
    sb = next(s for s in out.scheduled if s.request is b)
    assert sb.start == 8 and sb.num_new_tokens == 1 and b.num_cached_tokens == 8


def test_unknown_policy_is_rejected():
    with pytest.raises(ValueError, match="unknown scheduling policy"):
        make_policy("nope")
