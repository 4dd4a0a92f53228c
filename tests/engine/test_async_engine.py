"""AsyncEngine: the step loop on a background thread, per-request asyncio streams."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from loom.engine import LLM, AsyncEngine, Engine, EngineDeadError, EngineOverloadedError, engine_config
from loom.sampling import SamplingParams

OPTIONS = dict(dtype="float32", num_threads=1, num_blocks=128, block_size=16)
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
PROMPTS = ["Hello, my name is", "The capital of France is", "1 2 3", "Once upon a time there was"]


def make_engine(path, **overrides) -> AsyncEngine:
    return AsyncEngine(Engine(engine_config(str(path), **{**OPTIONS, **overrides})))


@pytest.fixture(scope="module")
def path(tiny_model):
    return tiny_model("llama")


@pytest.fixture(scope="module")
def aengine(path):
    engine = make_engine(path)
    yield engine
    engine.shutdown()


async def collect(engine: AsyncEngine, prompt, params=GREEDY, **kwargs):
    outs = [out async for out in engine.generate(prompt, params, **kwargs)]
    return outs


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_an_engine_built_on_the_engine_thread_serves_and_its_build_errors_reach_the_caller(path):
    """``AsyncEngine(factory)`` builds the engine on its own thread (so that one thread runs every
    OpenMP region); a factory that raises makes the constructor raise the same error."""
    built_on: list[str] = []

    def build() -> Engine:
        built_on.append(threading.current_thread().name)
        return Engine(engine_config(str(path), **OPTIONS))

    engine = AsyncEngine(build)
    try:
        assert built_on == ["loom-engine"]
        outs = asyncio.run(collect(engine, PROMPTS[0]))
        assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 12
    finally:
        engine.shutdown()

    def broken() -> Engine:
        raise ValueError("no such model: nowhere.gguf")

    with pytest.raises(ValueError, match="no such model"):
        AsyncEngine(broken)


def test_concurrent_requests_match_the_offline_engine(aengine, path):
    expected = LLM(str(path), **OPTIONS).generate(PROMPTS, GREEDY, use_tqdm=False)
    steps_before = aengine.stats().steps

    async def run():
        return await asyncio.gather(*(collect(aengine, p) for p in PROMPTS))

    for outs, ref in zip(asyncio.run(run()), expected):
        assert outs[-1].finished and not any(o.finished for o in outs[:-1])
        final = outs[-1].outputs[0]
        assert final.token_ids == ref.outputs[0].token_ids and final.text == ref.outputs[0].text
        assert "".join(o.outputs[0].delta_text for o in outs) == final.text
        assert sum(len(o.outputs[0].delta_token_ids) for o in outs) == 12
    assert aengine.stats().steps - steps_before < 20  # the four requests shared their steps (not 4 x 12)


@pytest.mark.parametrize(
    ("prompt", "params", "match"),
    [
        ("", GREEDY, "empty"),
        ([], GREEDY, "empty"),
        ([10**9], GREEDY, "vocabulary"),
        ([5] * 600, GREEDY, "context"),
        (None, GREEDY, "prompt must be"),
        ([1, "a"], GREEDY, "prompt must be"),
        ("hi", {"temperature": 0}, "SamplingParams"),
    ],
)
def test_bad_input_raises_value_error_before_anything_is_yielded(aengine, prompt, params, match):
    async def run():
        gen = aengine.generate(prompt, params)
        with pytest.raises(ValueError, match=match):
            await anext(gen)

    asyncio.run(run())
    assert asyncio.run(collect(aengine, "still serving"))[-1].finished


def test_duplicate_request_id_is_refused(aengine):
    async def run():
        first = aengine.generate("a", SamplingParams(max_tokens=200, ignore_eos=True), "same-id")
        await anext(first)
        with pytest.raises(ValueError, match="already in use"):
            await anext(aengine.generate("b", GREEDY, "same-id"))
        await first.aclose()

    asyncio.run(run())
    wait_for(lambda: aengine.stats().num_running == 0)


def test_abort_ends_the_stream_and_frees_blocks(aengine):
    wait_for(lambda: aengine.stats().num_running == 0)
    free = aengine.stats().num_free_blocks

    async def run():
        outs = []
        async for out in aengine.generate("a long one " * 20, SamplingParams(max_tokens=400, ignore_eos=True), "victim"):
            outs.append(out)
            if len(outs) == 2:
                await aengine.abort("victim")
        return outs

    outs = asyncio.run(run())
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"
    assert len(outs[-1].outputs[0].token_ids) < 400
    assert aengine.stats().num_free_blocks == free and aengine.stats().num_running == 0
    asyncio.run(aengine.abort("no-such-request"))  # a no-op


@pytest.mark.parametrize("how", ["break", "cancel"])
def test_a_caller_that_goes_away_aborts_its_request(aengine, how):
    wait_for(lambda: aengine.stats().num_running == 0)
    free = aengine.stats().num_free_blocks
    params = SamplingParams(max_tokens=450, ignore_eos=True)
    seen = []

    async def consume():
        async for out in aengine.generate("go on " * 30, params):
            seen.append(out)
            if how == "break" and len(seen) == 3:
                break

    async def run():
        task = asyncio.create_task(consume())
        if how == "cancel":
            while len(seen) < 3:
                await asyncio.sleep(0.001)
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(run())
    wait_for(lambda: aengine.stats().num_running == 0 and aengine.stats().num_free_blocks == free)
    assert len(seen[-1].outputs[0].token_ids) < 450


def test_callers_on_different_event_loops(aengine):
    results = {}

    def worker(i: int) -> None:
        results[i] = asyncio.run(collect(aengine, PROMPTS[i]))[-1].outputs[0].text

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    single = {i: asyncio.run(collect(aengine, PROMPTS[i]))[-1].outputs[0].text for i in range(3)}
    assert results == single


def test_the_engine_thread_sleeps_when_idle(aengine):
    """No busy-waiting: an idle engine thread uses (almost) no CPU."""
    stat = f"/proc/self/task/{aengine._thread.native_id}/stat"
    wait_for(lambda: aengine.stats().num_running == 0)

    def cpu_ticks() -> int:
        fields = open(stat).read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime

    before = cpu_ticks()
    time.sleep(0.5)
    assert cpu_ticks() - before <= 2  # clock ticks (1/100 s)
    assert asyncio.run(collect(aengine, "wakes up"))[-1].finished


def test_listeners_see_every_output_and_cannot_break_the_loop(aengine):
    seen = []

    def broken(outputs):
        raise RuntimeError("listener bug")

    aengine.add_listener(broken)
    aengine.add_listener(seen.extend)
    outs = asyncio.run(collect(aengine, "listen"))
    assert [o.request_id for o in seen] == [o.request_id for o in outs] and seen[-1].finished


def test_full_waiting_queue_is_refused(path):
    engine = make_engine(path, max_num_seqs=1, max_waiting=1)
    params = SamplingParams(max_tokens=300, ignore_eos=True)

    async def run():
        running = engine.generate("first", params)
        await anext(running)
        waiting = asyncio.create_task(anext(engine.generate("second", params)))
        while engine.stats().num_waiting < 1:
            await asyncio.sleep(0.001)
        with pytest.raises(EngineOverloadedError, match="max_waiting=1"):
            await anext(engine.generate("third", params))
        waiting.cancel()
        await running.aclose()

    try:
        asyncio.run(run())
    finally:
        engine.shutdown()
    with pytest.raises(ValueError, match="max_waiting"):
        make_engine(path, max_waiting=0)


def test_shutdown_aborts_in_flight_requests_and_refuses_new_ones(path):
    engine = make_engine(path)

    async def run():
        gen = engine.generate("never finishes", SamplingParams(max_tokens=450, ignore_eos=True))
        await anext(gen)
        await asyncio.to_thread(engine.shutdown)
        rest = [out async for out in gen]
        assert rest[-1].finished and rest[-1].outputs[0].finish_reason == "abort"
        with pytest.raises(EngineDeadError):
            await anext(engine.generate("too late", GREEDY))

    asyncio.run(run())
    assert not engine.is_running and not engine._thread.is_alive()
    engine.shutdown()  # idempotent


def test_a_failing_step_fails_the_streams_instead_of_hanging(path, monkeypatch):
    engine = make_engine(path)

    def broken_step():
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(engine.engine, "step", broken_step)

    async def run():
        with pytest.raises(EngineDeadError, match="kernel exploded"):
            await collect(engine, "boom")
        with pytest.raises(EngineDeadError):
            await collect(engine, "after")

    asyncio.run(run())
    assert not engine.is_running
