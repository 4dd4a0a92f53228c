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


@pytest.mark.parametrize("policy", ["priority", "vtc", "lpm", "dlpm", "slo", "sjf"])
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


def _run_all(engine: Engine, n: int = 10) -> list[list[int]]:
    for i, p in enumerate(prompts(n)):
        engine.add_request(str(i), p, GREEDY)
    got: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                got[out.request_id] = out.outputs[0].token_ids
    return [got[str(i)] for i in range(n)]


TIGHT = dict(dtype="float32", max_num_seqs=6, num_blocks=14, block_size=16, max_num_batched_tokens=64)


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
def test_swap_in_gives_the_same_tokens_as_recompute(model_dir, kv_cache_dtype):
    recompute = Engine(engine_config(model_dir, kv_cache_dtype=kv_cache_dtype, preemption_mode="recompute", **TIGHT))
    swap = Engine(engine_config(model_dir, kv_cache_dtype=kv_cache_dtype, preemption_mode="swap",
                                swap_space=64 << 20, swap_blocks_per_step=2, **TIGHT))
    assert _run_all(swap) == _run_all(recompute)
    stats = swap.stats()
    assert stats.num_swap_preemptions > 0 and stats.num_swap_preemptions == stats.num_preemptions
    assert stats.num_free_blocks == stats.num_blocks and stats.swap_blocks_used == 0 and len(swap.worker.swap) == 0
    assert recompute.stats().num_preemptions > 0 and recompute.stats().num_swap_preemptions == 0


def test_int8_swap_compresses_and_auto_measures_costs(model_dir):
    engine = Engine(engine_config(model_dir, preemption_mode="swap", swap_space=64 << 20, swap_dtype="int8", **TIGHT))
    lossless = Engine(engine_config(model_dir, preemption_mode="swap", swap_space=64 << 20, **TIGHT))
    assert engine.worker.swap.bytes_per_block < lossless.worker.swap.bytes_per_block / 3  # fp32 -> int8 + scales
    assert len(_run_all(engine)) == 10 and engine.stats().num_swap_preemptions > 0
    assert engine.stats().num_free_blocks == engine.stats().num_blocks
    auto = Engine(engine_config(model_dir, swap_space=64 << 20, **TIGHT)).worker.switch_costs
    assert auto.mode == "auto" and auto.swap_seconds_per_block > 0 and auto.recompute_seconds_per_token > 0
    assert auto.swap_capacity_blocks == (64 << 20) // lossless.worker.swap.bytes_per_block


def test_swap_needs_space_and_a_cache_without_a_residual(model_dir):
    with pytest.raises(ValueError, match="--preemption-mode swap needs --swap-space"):
        engine_config(model_dir, preemption_mode="swap")
    with pytest.raises(ValueError, match="the swap tier needs a KV cache without a residual"):
        Engine(engine_config(model_dir, kv_cache_dtype="int4", swap_space=1 << 20, num_blocks=64))


def test_a_pinned_session_turn_gives_the_same_tokens_and_its_blocks_come_back(model_dir, reference):
    engine = Engine(engine_config(model_dir, dtype="float32", session_ttl=0.2))
    first = prompts(10)[0]
    engine.add_request("t1", first, GREEDY, session_id="chat-1")
    out = [o for _ in range(40) for o in engine.step() if o.finished][0]
    assert out.outputs[0].token_ids == reference[0] and engine.stats().pinned_blocks > 0
    follow = first + out.outputs[0].token_ids + [11, 12, 13]
    engine.add_request("t2", follow, GREEDY, session_id="chat-1")
    second = [o for _ in range(40) for o in engine.step() if o.finished][0]
    plain = LLM(model_dir, dtype="float32", enable_prefix_caching=False).generate([follow], GREEDY, use_tqdm=False)
    assert second.outputs[0].token_ids == plain[0].outputs[0].token_ids
    assert second.metrics.num_cached_prompt_tokens >= len(first) // 16 * 16
    stats = engine.stats()
    assert (stats.session_followups, stats.pinned_hits, stats.pinned_sessions) == (1, 1, 1)
    import time

    time.sleep(0.4)  # 1.5 x the gap between the turns, at least the 0.2 s default: expired by now
    engine.step()
    stats = engine.stats()
    assert stats.pinned_blocks == 0 and stats.pins_expired == 1 and stats.num_free_blocks == stats.num_blocks
