"""Moving a running request from one engine to another: same output, KV blocks adopted as prefix hits."""

from __future__ import annotations

import pytest

from loom.engine import Engine, engine_config
from loom.sampling import SamplingParams

OPTS = dict(dtype="float32", num_threads=1, num_blocks=64, block_size=4, max_num_batched_tokens=64)


@pytest.fixture(scope="module")
def engines(tiny_model):
    path = str(tiny_model("llama"))
    return Engine(engine_config(path, **OPTS)), Engine(engine_config(path, **OPTS))


def _run(engine: Engine, request_id: str) -> list:
    outs = []
    while engine.has_unfinished_requests():
        outs += [o for o in engine.step() if o.request_id == request_id]
    return outs


def _steps(engine: Engine, n: int) -> list:
    outs = []
    for _ in range(n):
        outs += engine.step()
    return outs


@pytest.mark.parametrize("params", [SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True),
                                    SamplingParams(max_tokens=20, temperature=1.0, seed=7, ignore_eos=True,
                                                   logprobs=2, stop=["zzz"])])
def test_a_request_moved_mid_decode_continues_as_if_it_had_not(engines, params) -> None:
    source, target = engines
    prompt = list(range(5, 40))
    source.add_request("ref", prompt, params)
    (reference,) = [o for o in _run(source, "ref") if o.finished]

    source.add_request("moving", prompt, params)
    before = _steps(source, 4)
    handoff = source.export_request("moving", stop=True)
    assert not source.has_unfinished_requests()
    assert handoff.num_blocks == (len(prompt) + len(handoff.output_token_ids) - 1) // 4  # computed full blocks
    assert handoff.kv_bytes > 0 and 0 < len(handoff.output_token_ids) < 20
    target.adopt_request(handoff)
    after = _run(target, "moving")
    final = after[-1]
    assert final.finished and final.outputs[0].token_ids == reference.outputs[0].token_ids
    assert final.outputs[0].text == reference.outputs[0].text
    # Nothing is computed again (the partial last block moves too), so even the logprobs are equal.
    assert final.outputs[0].logprobs == reference.outputs[0].logprobs
    assert handoff.tail is not None
    # The client sees each token once: the source's deltas, then the target's.
    streamed = [t for o in before + after for t in o.outputs[0].delta_token_ids]
    assert streamed == reference.outputs[0].token_ids
    assert "".join(o.outputs[0].delta_text for o in before + after) == reference.outputs[0].text


def test_blocks_move_in_stages_and_are_found_as_prefix_hits(engines) -> None:
    source, target = engines
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    prompt = list(range(50, 90))
    source.add_request("staged", prompt, params)
    _steps(source, 2)
    first = source.export_request("staged")  # while it keeps running
    assert target.import_blocks(first) == first.num_blocks > 0
    _steps(source, 3)
    last = source.export_request("staged", start_block=first.num_blocks, stop=True)
    assert last.start_block == first.num_blocks
    target.adopt_request(last)
    steps_before = target.stats().steps
    outs = _run(target, "staged")
    source.add_request("whole", prompt, params)
    (reference,) = [o for o in _run(source, "whole") if o.finished]
    assert outs[-1].outputs[0].token_ids == reference.outputs[0].token_ids
    assert target.stats().steps - steps_before <= 12  # no long recompute of the context


def test_what_cannot_move_is_refused(engines) -> None:
    source, target = engines
    with pytest.raises(ValueError, match="no request 'nope'"):
        source.export_request("nope")
    source.add_request("two", [1, 2, 3], SamplingParams(n=2, max_tokens=3))
    with pytest.raises(ValueError, match="single-sample"):
        source.export_request("two")
    source.abort_request("two")
    source.add_request("dup", [1, 2, 3], SamplingParams(max_tokens=3))
    target.add_request("dup", [1, 2, 3], SamplingParams(max_tokens=3))
    h = source.export_request("dup", stop=True)
    with pytest.raises(ValueError, match="already in use"):
        target.adopt_request(h)
    target.abort_request("dup")


def test_a_cache_with_a_residual_does_not_move_its_blocks(tiny_model, engines) -> None:
    kivi = Engine(engine_config(str(tiny_model("llama")), **{**OPTS, "block_size": 16}, kv_cache_dtype="int4",
                                kv_residual_tokens=16))
    assert "residual (int4/int2)" in kivi.blocks_cannot_move and engines[0].blocks_cannot_move is None
    kivi.add_request("r", list(range(5, 30)), SamplingParams(max_tokens=8))
    kivi.step()
    with pytest.raises(ValueError, match="residual"):
        kivi.export_request("r")
    source, _ = engines
    source.add_request("k", list(range(5, 30)), SamplingParams(max_tokens=8))
    source.step()
    handoff = source.export_request("k", stop=True)
    with pytest.raises(ValueError, match="residual"):  # checked before the block size
        kivi.import_blocks(handoff)


def test_metrics_move_onto_the_target_machines_clock(engines) -> None:
    import dataclasses
    import time

    source, _ = engines
    source.add_request("clock", [1, 2, 3, 4, 5], SamplingParams(max_tokens=8, ignore_eos=True))
    _steps(source, 2)
    here = source.export_request("clock", stop=True)
    assert here.local_metrics() == here.metrics  # the same machine: no shift
    # A source whose monotonic clock ran 100 s ahead of this one's, against the same wall clock.
    there = dataclasses.replace(here, clock_offset=here.clock_offset + 100.0)
    moved = there.local_metrics()
    assert moved.arrival_time == pytest.approx(here.metrics.arrival_time - 100.0, abs=0.01)
    assert moved.first_token_time - moved.arrival_time == pytest.approx(
        here.metrics.first_token_time - here.metrics.arrival_time)
    assert moved.finished_time is None and time.monotonic() > moved.arrival_time
