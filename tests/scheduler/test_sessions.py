"""Multi-turn pins (Continuum): a finished turn's blocks wait for the session's next turn, expire on
time, give way under memory pressure, and the TTL follows the session's gaps."""

from __future__ import annotations

import time

from loom.config import SchedulerConfig
from loom.kvcache import KVCacheManager
from loom.request import Request
from loom.sampling import SamplingParams
from loom.scheduler import Scheduler, make_policy
from loom.scheduler.sessions import SessionTTL
from loom.step import RequestResult, StepResult

EOS = 2


def make(num_blocks=16, ttl=30.0):
    kv = KVCacheManager(num_blocks, 4)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8), kv, (EOS,), make_policy("fcfs"),
                      sessions=SessionTTL(ttl, 600.0))
    return sched, kv


def turn(rid, tokens, session, max_tokens=2):
    return Request(rid, list(tokens), SamplingParams(max_tokens=max_tokens, ignore_eos=True), session_id=session,
                   max_total_tokens=len(tokens) + max_tokens)


def drain(sched):
    while sched.running or sched.waiting:
        plan = sched.schedule()
        sched.update(plan, StepResult({s.request.request_id: RequestResult((7,)) for s in plan.scheduled if s.sample},
                                      0.0))


def test_ttl_follows_the_sessions_gaps():
    ttl = SessionTTL(default_ttl=30.0, max_ttl=100.0)
    assert ttl.on_finish("s", 10.0) == 40.0  # no gap seen yet: the default
    assert ttl.on_arrival("s", 14.0) and not ttl.on_arrival("t", 14.0)
    assert ttl.on_finish("s", 20.0) == 20.0 + 1.5 * 4.0
    ttl.on_arrival("s", 20.1)  # quick turns: no shorter than a second
    assert ttl.on_finish("s", 21.0) == 21.0 + 6.0
    quick = SessionTTL(default_ttl=30.0, max_ttl=100.0)
    quick.on_finish("q", 0.0)
    quick.on_arrival("q", 0.1)
    assert quick.on_finish("q", 1.0) == 2.0
    ttl.on_arrival("s", 100.0)  # an 80 s gap
    assert ttl.on_finish("s", 101.0) == 101.0 + 100.0  # capped


def test_a_follow_up_turn_reuses_its_pinned_blocks():
    sched, kv = make()
    first = turn("t1", range(100, 112), "s")
    sched.add(first)
    drain(sched)
    assert kv.num_pinned_blocks == 3 and "s" in kv.pins  # 12 prompt + 1 computed output: 3 full blocks
    assert kv.num_free_blocks == kv.num_blocks - 3
    follow = turn("t2", [*range(100, 112), 7, 7, 55, 56, 57], "s")
    sched.add(follow)
    plan = sched.schedule()
    assert plan.scheduled[0].start == 12 and "s" not in kv.pins and kv.num_pinned_blocks == 0
    assert (sched.session_followups, sched.pinned_hits) == (1, 1)
    drain(sched)


def test_pins_expire():
    sched, kv = make(ttl=0.05)
    sched.add(turn("t1", range(100, 112), "s"))
    drain(sched)
    assert kv.num_pinned_blocks == 3
    time.sleep(0.06)
    sched.schedule()
    assert kv.num_pinned_blocks == 0 and kv.pins_expired == 1 and kv.num_free_blocks == kv.num_blocks


def test_pins_give_way_under_memory_pressure_latest_expiry_first():
    sched, kv = make(num_blocks=10)
    for session in ("a", "b"):
        sched.add(turn(f"{session}1", range(200 if session == "a" else 300, 212 if session == "a" else 312), session))
        drain(sched)
    assert kv.num_pinned_blocks == 6 and kv.num_free_blocks == 4
    big = turn("big", range(500, 520), None)  # 20 tokens + 1: 6 blocks
    sched.add(big)
    plan = sched.schedule()
    assert [s.request for s in plan.scheduled] == [big]
    assert list(kv.pins) == ["a"] and kv.pins_released_for_memory == 1  # b's pin would have lasted longer
    drain(sched)


def test_aborted_turns_and_requests_without_a_session_do_not_pin():
    sched, kv = make()
    sched.add(turn("x", range(100, 112), None))
    drain(sched)
    aborted = turn("y", range(300, 312), "s")
    sched.add(aborted)
    sched.schedule()
    sched.finish(aborted, "abort")
    assert kv.num_pinned_blocks == 0 and kv.num_free_blocks == kv.num_blocks
