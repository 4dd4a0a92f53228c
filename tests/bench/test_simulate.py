"""loom bench simulate: the cost model, and the replay through the real router and scheduler."""

from __future__ import annotations

import json

import pytest

from loom.bench.simulate import CostModel, Simulation, fit_cost_model, prompt_tokens, records
from loom.bench.workload import TraceRequest
from loom.cluster.router import make_router
from loom.engine import engine_config

COST = CostModel(prefill_fixed=0.01, per_prefill_token=1e-4, per_prefill_attention=1e-8, decode_rows=(1, 8, 64),
                 decode_seconds=(0.005, 0.01, 0.04), per_context_token=1e-6, num_blocks=256)


def test_cost_model_interpolates_decode_rows_and_round_trips(tmp_path) -> None:
    assert COST.step_seconds(0, 1, 0) == pytest.approx(0.005)
    assert COST.step_seconds(0, 36, 0) == pytest.approx(0.025)  # between 8 and 64 rows
    assert COST.step_seconds(0, 120, 0) == pytest.approx(0.04 + 0.03 / 56 * 56)  # past 64: the last slope
    assert COST.step_seconds(100, 4, 1000, 5000.0) == pytest.approx(
        0.01 + 0.01 + 5e-5 + COST.step_seconds(0, 4, 0) + 1e-3)
    path = tmp_path / "cost.json"
    COST.save(path)
    assert CostModel.load(path) == COST
    path.write_text(json.dumps({"nope": 1}))
    with pytest.raises(ValueError, match="not a cost model written by --fit"):
        CostModel.load(path)


def test_shared_hash_ids_become_shared_tokens() -> None:
    a, b, c = (TraceRequest(0.0, 40, 4, hash_ids=h, block_tokens=16) for h in ((1, 2, 3), (1, 2, 9), ()))
    ta, tb, tc = prompt_tokens([a, b, c])
    assert len(ta) == len(tb) == len(tc) == 40
    assert ta[:32] == tb[:32] and ta[32:] != tb[32:] and not set(tc) & set(ta)


def _workload(n: int = 24) -> list[TraceRequest]:
    # Three conversations, each growing a shared prefix turn by turn, arriving in turn (round robin over
    # two replicas then sends each conversation to both).
    return [TraceRequest(i * 0.05, 64 + 16 * (i // 3), 6, hash_ids=tuple(100 * (i % 3) + k for k in range(4 + i // 3)),
                         block_tokens=16) for i in range(n)]


def _simulate(router: str, replicas: int = 2, prefill_replicas: int = 0) -> Simulation:
    config = engine_config(None, num_blocks=64, block_size=16, max_num_batched_tokens=256)
    sim = Simulation(config, COST, replicas, prefill_replicas, make_router(router), 64)
    work = _workload()
    sim.run(work, prompt_tokens(work))
    return sim


def test_every_request_finishes_with_its_tokens_in_time_order() -> None:
    sim = _simulate("least_load")
    recs = records(sim.tracks)
    assert len(recs) == 24 and all(r.ok and r.output_tokens == 6 for r in recs)
    assert all(r.chunk_times == tuple(sorted(r.chunk_times)) and r.chunk_times[0] > r.sent for r in recs)


def test_prefix_routing_keeps_more_hits_than_round_robin() -> None:
    def hit_rate(sim: Simulation) -> float:
        cached = sum(r.scheduler.prompt_tokens_cached for r in sim.replicas)
        return cached / sum(r.scheduler.prompt_tokens_admitted for r in sim.replicas)

    assert hit_rate(_simulate("prefix")) > hit_rate(_simulate("round_robin")) + 0.1


def test_prefill_replicas_hand_every_request_off() -> None:
    sim = _simulate("prefix", replicas=3, prefill_replicas=1)
    assert sim.handoffs == 24
    assert all(r.ok and r.output_tokens == 6 for r in records(sim.tracks))
    assert sim.replicas[0].scheduler.prompt_tokens_admitted == sum(r.input_len for r in _workload())


def test_fit_measures_a_model_that_predicts_its_own_points(tiny_model) -> None:
    cost, points = fit_cost_model(str(tiny_model("llama")), dict(dtype="float32", num_threads=1, num_blocks=512,
                                                                  max_num_batched_tokens=128, max_model_len=1024))
    assert cost.decode_rows == (1, 2, 4, 8, 16, 32, 64) and all(s >= 0 for s in cost.decode_seconds)
    assert cost.num_blocks == 512
    decode_short = [p for p in points if p["decode_rows"] and not p["long"]]
    for p in decode_short:  # interpolation through the measured short-context points
        assert p["predicted"] == pytest.approx(p["seconds"], rel=0.5)
