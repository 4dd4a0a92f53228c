import pytest

from loom.config import SchedulerConfig
from loom.kvcache import KVCacheManager
from loom.request import Request, RequestStatus
from loom.sampling import SamplingParams
from loom.scheduler import Scheduler, make_policy
from loom.step import RequestResult, StepPlan, StepResult

EOS = 2


def make(num_blocks=64, block_size=4, budget=16, max_seqs=8):
    kv = KVCacheManager(num_blocks, block_size)
    return Scheduler(SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs), kv, (EOS,)), kv


def req(rid, length, t, priority=0, **params):
    return Request(rid, list(range(100 * len(rid), 100 * len(rid) + length)), SamplingParams(**params), arrival_time=t,
                   priority=priority, max_total_tokens=1000)


def run(sched: Scheduler, plan: StepPlan, tokens=(7,)) -> list[Request]:
    """Pretend the worker ran: each sampling request (and fork) gets ``tokens``."""
    results = {}
    for s in plan.scheduled:
        if s.sample:
            for r in (s.request, *s.forks):
                results[r.request_id] = RequestResult(tuple(tokens))
    return sched.update(plan, StepResult(results, forward_end_time=0.0))


def test_chunked_prefill_respects_budget_and_decodes_go_first():
    sched, _ = make(budget=16)
    a = req("a", 4, 0.0)
    sched.add(a)
    run(sched, sched.schedule())  # a prefilled, has 1 output token
    b = req("bb", 40, 1.0)
    sched.add(b)
    plan = sched.schedule()
    assert [(s.request, s.num_new_tokens, s.sample) for s in plan.scheduled] == [(a, 1, True), (b, 15, False)]
    run(sched, plan)
    plan = sched.schedule()
    assert [(s.request, s.start, s.num_new_tokens) for s in plan.scheduled] == [(a, 5, 1), (b, 15, 15)]


def test_prefill_backlog_counts_unfinished_prefills_and_waiting_prompts_for_free_seats():
    sched, _ = make(budget=16, max_seqs=3)
    a = req("a", 4, 0.0)
    sched.add(a)
    run(sched, sched.schedule())  # a decodes now
    b, c, d = req("bb", 40, 1.0), req("c", 10, 2.0), req("d", 30, 3.0)  # c starts with a's prompt
    for r in (b, c, d):
        sched.add(r)
    assert sched.prefill_backlog() == 40 + 6  # two free seats, d waits for one; a's first block is cached
    run(sched, sched.schedule())  # a's token and 15 of b's
    assert sched.prefill_backlog() == 25 + 6
    assert sched.prefill_backlog() == 31  # asking changes nothing


def test_scheduled_request_records_its_start():
    sched, _ = make(budget=8)
    a = req("a", 20, 0.0)
    sched.add(a)
    plan = sched.schedule()
    (s,) = plan.scheduled
    run(sched, plan)
    assert (s.start, s.end) == (0, 8) and a.num_computed_tokens == 8  # unchanged by the update


def test_update_appends_tokens_and_finishes_on_eos_and_length():
    sched, kv = make()
    a, b = req("a", 3, 0.0), req("bb", 3, 1.0, max_tokens=2, ignore_eos=True)
    b.max_total_tokens = 5
    sched.add(a)
    sched.add(b)
    changed = run(sched, sched.schedule())
    assert changed == [a, b] and a.output_token_ids == [7] and a.num_computed_tokens == 3
    assert a.metrics.first_token_time is not None
    run(sched, sched.schedule(), tokens=(EOS,))
    assert a.is_finished and a.finish_reason == "stop" and a.block_ids == []
    assert b.is_finished and b.finish_reason == "length" and b.output_token_ids == [7, EOS]
    assert sched.running == [] and kv.num_free_blocks == kv.num_blocks


def test_update_accepts_drafts_and_rolls_back_the_rest():
    sched, kv = make(budget=16, block_size=4)
    a = req("a", 3, 0.0)
    sched.add(a)
    run(sched, sched.schedule())  # 3 prompt tokens computed, 1 output token
    a.draft_token_ids = [11, 12, 13, 14, 15, 16]
    plan = sched.schedule()
    (s,) = plan.scheduled
    assert s.draft_token_ids == (11, 12, 13, 14, 15, 16) and s.num_query_tokens == 7
    assert len(a.block_ids) == 3  # room for positions 3..9
    # The worker accepted 11 and 12, then sampled 20 where 13 was proposed.
    sched.update(plan, StepResult({"a": RequestResult((11, 12, 20))}, forward_end_time=0.0))
    assert a.output_token_ids == [7, 11, 12, 20] and a.num_computed_tokens == 6  # 3 prompt + 7, 11, 12
    assert len(a.block_ids) == 2 and a.draft_token_ids == []
    assert len(a.block_hashes) == 1  # only the full block of accepted tokens is hashed
    assert kv.num_free_blocks == kv.num_blocks - 2
    plan = sched.schedule()
    assert [(x.start, x.num_new_tokens, x.draft_token_ids) for x in plan.scheduled] == [(6, 1, ())]


def test_drafts_are_cut_to_the_token_budget():
    sched, _ = make(budget=4)
    a = req("a", 3, 0.0)
    sched.add(a)
    run(sched, sched.schedule())
    a.draft_token_ids = [1, 2, 3, 4, 5]
    (s,) = sched.schedule().scheduled
    assert s.draft_token_ids == (1, 2, 3)


@pytest.mark.parametrize(("budget", "parents", "is_decode"), [
    (8, (-1, 0, -1, 2, 0), False),  # the whole tree: a chunk with a tree mask
    (5, (-1, 0, -1, 2), False),
    (3, (), True),  # cut to (-1, 0): the first branch's start, a chain again
])
def test_a_tree_of_drafts_is_cut_with_its_parents(budget, parents, is_decode):
    sched, _ = make(budget=budget)
    a = req("a", 3, 0.0)
    sched.add(a)
    run(sched, sched.schedule())
    a.draft_token_ids = [1, 2, 3, 4, 5]
    a.draft_parents = [-1, 0, -1, 2, 0]
    (s,) = sched.schedule().scheduled
    assert s.draft_parents == parents and len(s.draft_token_ids) == min(5, budget - 1) and s.is_decode == is_decode


def test_eos_among_accepted_drafts_finishes_and_drops_the_rest():
    sched, kv = make()
    a = req("a", 3, 0.0)
    sched.add(a)
    run(sched, sched.schedule())
    a.draft_token_ids = [11, EOS, 13]
    plan = sched.schedule()
    sched.update(plan, StepResult({"a": RequestResult((11, EOS, 13))}, forward_end_time=0.0))
    assert a.is_finished and a.output_token_ids == [7, 11, EOS] and kv.num_free_blocks == kv.num_blocks


def prefill_with_fork(sched: Scheduler) -> tuple[Request, Request, list[Request]]:
    """A 6-token request with n=2 prefilled: its first token 5, its fork's 6."""
    parent = req("p", 6, 0.0, n=2)
    child = Request("p#1", parent.prompt_token_ids, parent.params, arrival_time=0.0, sample_index=1,
                    max_total_tokens=1000)
    parent.forks = [child]
    sched.add(parent)
    plan = sched.schedule()
    assert plan.scheduled[0].forks == (child,)
    changed = sched.update(plan, StepResult({"p": RequestResult((5,)), "p#1": RequestResult((6,))}, 0.0))
    return parent, child, changed


def test_forks_share_prompt_blocks_and_copy_the_partial_one():
    sched, kv = make(block_size=4)
    parent, child, changed = prefill_with_fork(sched)
    assert changed == [parent, child] and parent.forks == []
    assert child.output_token_ids == [6] and child.num_computed_tokens == 6 and child in sched.running
    assert child.block_ids[0] == parent.block_ids[0] and child.block_ids[1] != parent.block_ids[1]
    assert sched.schedule().block_copies == [(parent.block_ids[1], child.block_ids[1])]


def test_fork_without_a_free_block_recomputes_on_its_own():
    sched, kv = make(num_blocks=2, block_size=4, budget=64)
    _, child, _ = prefill_with_fork(sched)
    assert child in sched.waiting and child.output_token_ids == [6] and child.block_ids == []


def test_prompt_logprobs_only_request_finishes_when_computed():
    sched, _ = make(budget=4)
    a = req("a", 6, 0.0, max_tokens=0, prompt_logprobs=0)
    sched.add(a)
    plan = sched.schedule()
    assert not plan.scheduled[0].sample
    assert run(sched, plan) == []
    assert run(sched, sched.schedule()) == [a] and a.is_finished and a.finish_reason == "length"


def test_max_num_seqs_caps_running():
    sched, _ = make(budget=100, max_seqs=2)
    for i, rid in enumerate(["a", "bb", "ccc"]):
        sched.add(req(rid, 3, float(i)))
    plan = sched.schedule()
    assert len(plan.scheduled) == 2 and len(sched.waiting) == 1


def test_preemption_picks_lowest_priority_latest_arrival_and_keeps_outputs():
    sched, kv = make(num_blocks=4, block_size=4, budget=64)
    a = req("a", 8, 0.0, priority=0)
    b = req("bb", 8, 1.0, priority=0)
    sched.add(a)
    sched.add(b)
    run(sched, sched.schedule())  # each holds 2 blocks (8 slots) and now has 9 tokens
    plan = sched.schedule()  # both need a third block: b (latest) is preempted
    assert plan.preempted == [b]
    assert b.status is RequestStatus.PREEMPTED and b.output_token_ids == [7] and b.num_computed_tokens == 0
    assert [s.request for s in plan.scheduled] == [a]
    assert b in sched.waiting and sched.num_preemptions == 1


def test_preemption_prefers_lower_priority_over_later_arrival():
    sched, kv = make(num_blocks=4, block_size=4, budget=64)
    a = req("a", 8, 0.0, priority=5)  # less important, arrived first
    b = req("bb", 8, 1.0, priority=0)
    sched.add(a)
    sched.add(b)
    run(sched, sched.schedule())
    assert sched.schedule().preempted == [a]


def test_preempted_request_is_recomputed_with_its_outputs():
    sched, kv = make(num_blocks=4, block_size=4, budget=64)
    a, b = req("a", 8, 0.0), req("bb", 8, 1.0)
    sched.add(a)
    sched.add(b)
    run(sched, sched.schedule())
    run(sched, sched.schedule())  # b preempted, a decodes
    sched.finish(a, "abort")
    plan = sched.schedule()
    (s,) = plan.scheduled
    assert s.request is b and s.start + s.num_new_tokens == b.num_tokens == 9 and s.sample


def test_prefix_hits_skip_computation_and_count_once_per_request():
    sched, kv = make(budget=64, num_blocks=4, block_size=4)
    a = req("a", 9, 0.0)
    sched.add(a)
    run(sched, sched.schedule())
    b = Request("b", list(a.prompt_token_ids), SamplingParams(), arrival_time=1.0, max_total_tokens=1000)
    big = req("cc", 9, 2.0)  # does not fit beside a and b: blocked at the head of the queue
    sched.add(b)
    sched.add(big)
    plan = sched.schedule()
    sb = next(s for s in plan.scheduled if s.request is b)
    assert sb.start == 8 and sb.num_new_tokens == 1 and b.num_cached_tokens == 8
    for _ in range(3):  # retries of the blocked request count nothing
        run(sched, plan)
        plan = sched.schedule()
    assert big in sched.waiting
    assert (sched.prompt_tokens_admitted, sched.prompt_tokens_cached) == (18, 8)


def test_unknown_policy_is_rejected():
    with pytest.raises(ValueError, match="policy .--policy. must be one of"):
        make_policy("nope")
