"""A replica's actor body in process (no Ray): submit, the batched output stream, reports, refusals."""

from __future__ import annotations

import asyncio

import pytest

from loom.cluster.replica import Refusal, Replica, Report, Submit, refusal_error
from loom.engine import EngineDeadError, EngineOverloadedError, engine_config
from loom.kvcache import chain_hashes
from loom.request import RequestTags
from loom.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def replica(tiny_model):
    r = Replica(engine_config(str(tiny_model("llama")), dtype="float32", num_threads=1, num_blocks=64, block_size=16))
    yield r
    r.shutdown()


async def _collect(replica: Replica, msgs: list[Submit]) -> dict[str, list]:
    got: dict[str, list] = {m.request_id: [] for m in msgs}
    stream = replica.outputs()
    for m in msgs:
        await replica.submit(m)
    while True:
        for request_id, item in await anext(stream):
            got[request_id].append(item)
        if all(items and (isinstance(items[-1], Refusal) or items[-1].finished) for items in got.values()):
            await stream.aclose()
            return got


def test_outputs_come_batched_and_the_prefix_cache_is_reported(replica: Replica) -> None:
    prompt = list(range(3, 3 + 40))
    first = replica.report()
    assert first.prefix.snapshot is not None  # the first read is a snapshot
    msgs = [Submit(f"r{i}", prompt, prompt, GREEDY, RequestTags()) for i in range(3)]
    got = asyncio.run(_collect(replica, msgs))
    for items in got.values():
        assert items[-1].finished and len(items[-1].outputs[0].token_ids) == 4
    report = replica.report()
    assert isinstance(report, Report) and report.epoch == replica.hello().epoch
    stored = {h for is_stored, h in report.prefix.changes if is_stored}
    assert set(chain_hashes(prompt, 16)[:2]) <= stored  # the router computes the same hashes
    assert report.steps and report.stats.generation_tokens >= 12


def test_refusals_carry_the_kind_of_error(replica: Replica) -> None:
    got = asyncio.run(_collect(replica, [Submit("bad", [], [], GREEDY, RequestTags())]))
    refusal = got["bad"][-1]
    assert isinstance(refusal, Refusal) and refusal.kind == "invalid" and "empty" in refusal.message
    assert isinstance(refusal_error(refusal, 0), ValueError)
    assert isinstance(refusal_error(Refusal("overloaded", "full"), 0), EngineOverloadedError)
    dead = refusal_error(Refusal("dead", "boom"), 3)
    assert isinstance(dead, EngineDeadError) and "replica 3" in str(dead)


def test_resync_makes_the_next_report_a_snapshot(replica: Replica) -> None:
    replica.report()
    assert replica.report().prefix.snapshot is None
    replica.resync()
    assert replica.report().prefix.snapshot is not None
