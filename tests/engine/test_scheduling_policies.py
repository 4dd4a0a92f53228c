"""Scheduling policies on a real (tiny) engine: whatever the order, preemption and prefix reuse,
greedy outputs are those of running each prompt alone, and every block comes back."""

from __future__ import annotations

import pytest

from loom.engine import LLM, Engine, engine_config
from loom.sampling import SamplingParams
from tests.engine.test_engine import GREEDY, prompts


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return str(tiny_model("llama"))


@pytest.fixture(scope="module")
def reference(model_dir):
    return [o.outputs[0].token_ids for o in LLM(model_dir, dtype="float32").generate(prompts(10), GREEDY, use_tqdm=False)]


@pytest.mark.parametrize("policy", ["priority", "vtc", "lpm", "dlpm"])
def test_outputs_are_unchanged_by_the_policy(model_dir, reference, policy):
    engine = Engine(engine_config(model_dir, dtype="float32", policy=policy, max_num_seqs=3, num_blocks=24,
                                  block_size=16, max_num_batched_tokens=32))
    for i, p in enumerate(prompts(10)):
        engine.add_request(str(i), p, GREEDY, priority=i % 3, tenant=f"t{i % 4}")
    got: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                got[out.request_id] = out.outputs[0].token_ids
    assert [got[str(i)] for i in range(10)] == reference
    stats = engine.stats()
    assert stats.num_free_blocks == stats.num_blocks
    assert sum(t.requests for t in stats.tenants.values()) == 10 and set(stats.tenants) == {"t0", "t1", "t2", "t3"}
    assert sum(t.generation_tokens for t in stats.tenants.values()) == 10 * GREEDY.max_tokens


def test_priority_arrival_preempts_and_the_victim_recomputes_the_same_tokens(model_dir, reference):
    engine = Engine(engine_config(model_dir, dtype="float32", policy="priority", max_num_seqs=1))
    low, high = prompts(10)[:2]
    engine.add_request("low", low, GREEDY, priority=5)
    engine.step()
    engine.step()
    engine.add_request("high", high, GREEDY, priority=0)
    finished = []
    while engine.has_unfinished_requests():
        finished += [(o.request_id, o.outputs[0].token_ids, o.metrics.num_preemptions) for o in engine.step() if o.finished]
    assert finished == [("high", reference[1], 0), ("low", reference[0], 1)]


def test_unknown_tenant_is_refused_and_the_engine_keeps_serving(model_dir):
    engine = Engine(engine_config(model_dir, dtype="float32", policy="dlpm", tenant_weights='{"a": 1}'))
    with pytest.raises(ValueError, match="unknown tenant 'b'"):
        engine.add_request("x", [5, 6, 7], SamplingParams(max_tokens=2), tenant="b")
    engine.add_request("y", [5, 6, 7], SamplingParams(max_tokens=2), tenant="a")
    while engine.has_unfinished_requests():
        engine.step()
    assert "x" not in engine.groups and engine.stats().tenants["a"].requests == 1
