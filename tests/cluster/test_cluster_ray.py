"""Replicas on a local Ray (two CPUs) behind the router: outputs equal one engine's, routing by
prefix, the server on top, and a replica killed mid-stream."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

ray = pytest.importorskip("ray", reason="the cluster extra (pip install loom[cluster]) is not installed")

from loom.cluster import ClusterConfig  # noqa: E402
from loom.cluster.admin import admin_routes  # noqa: E402
from loom.cluster.client import ClusterClient  # noqa: E402
from loom.cluster.metrics import ClusterCollector  # noqa: E402
from loom.engine import LLM, EngineDeadError, engine_config  # noqa: E402
from loom.sampling import SamplingParams  # noqa: E402
from loom.server import ServerConfig  # noqa: E402
from tests.server.live_server import serve_engine  # noqa: E402

ENGINE = dict(dtype="float32", num_blocks=256, block_size=16, max_num_seqs=16, max_num_batched_tokens=256)
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def cluster(tiny_model) -> Iterator[ClusterClient]:
    client = ClusterClient(engine_config(str(tiny_model("llama")), **ENGINE),
                           ClusterConfig(replicas=2, replica_threads=1, report_interval=0.05, router="prefix"))
    yield client
    client.shutdown()
    assert not ray.is_initialized()  # it started Ray, so it stopped it


async def _run(client: ClusterClient, prompt: str | list[int], params: SamplingParams = GREEDY, **kw) -> list:
    return [out async for out in client.generate(prompt, params, **kw)]


def _wait(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_outputs_equal_one_engine(cluster: ClusterClient, tiny_model) -> None:
    prompts = [f"the weaver {i} threads the loom" for i in range(6)] + [[5, 6, 7, 8, 9] * 4]
    reference = LLM(str(tiny_model("llama")), num_threads=1, **ENGINE).generate(prompts, GREEDY)

    async def all_at_once() -> list[list]:
        return await asyncio.gather(*(_run(cluster, p) for p in prompts))

    streams = asyncio.run(all_at_once())
    for stream, ref in zip(streams, reference, strict=True):
        assert stream[-1].finished
        assert stream[-1].outputs[0].token_ids == ref.outputs[0].token_ids
        assert "".join(o.outputs[0].delta_text for o in stream) == ref.outputs[0].text
    assert {s.routed > 0 for s in cluster.replica_snapshots()} == {True}  # both replicas served


def test_prefix_router_sends_a_shared_prefix_to_one_replica(cluster: ClusterClient) -> None:
    shared = list(range(10, 10 + 64))  # four full blocks
    before = [s.routed for s in cluster.replica_snapshots()]
    asyncio.run(_run(cluster, shared + [1, 2]))
    _wait(lambda: all(s.in_flight == 0 for s in cluster.replica_snapshots()))
    first = [s.routed - b for s, b in zip(cluster.replica_snapshots(), before, strict=True)].index(1)
    for tail in range(3):
        asyncio.run(_run(cluster, shared + [3, 4, tail]))

    def routed() -> list[int]:
        return [s.routed - b for s, b in zip(cluster.replica_snapshots(), before, strict=True)]

    _wait(lambda: sum(routed()) == 4)  # snapshots are published at each report
    assert routed()[first] == 4
    final = asyncio.run(_run(cluster, shared + [3, 4, 9]))[-1]
    assert final.num_cached_tokens == 64


def test_bad_requests_are_refused_by_the_replica(cluster: ClusterClient) -> None:
    with pytest.raises(ValueError, match="max_model_len|context"):
        asyncio.run(_run(cluster, [1] * 100_000))
    with pytest.raises(ValueError, match="empty"):
        asyncio.run(_run(cluster, []))


def _stream_tokens(outputs: list) -> list[int]:
    return [t for o in outputs for t in o.outputs[0].delta_token_ids]


def test_migration_moves_a_running_request_without_losing_a_token(cluster: ClusterClient, tiny_model) -> None:
    params = SamplingParams(max_tokens=150, temperature=0.0, ignore_eos=True)
    prompt = list(range(100, 180))
    (reference,) = LLM(str(tiny_model("llama")), num_threads=1, **ENGINE).generate([prompt], params)

    async def migrate_mid_stream() -> tuple[list, object]:
        outs, record = [], None
        async for out in cluster.generate(prompt, params, request_id="moving"):
            outs.append(out)
            if len(outs) == 3:
                record = await cluster.migrate("moving")
        return outs, record

    outs, record = asyncio.run(migrate_mid_stream())
    assert record is not None and record.kind == "migration" and record.source != record.target
    assert record.staged_blocks >= 5 and record.context_tokens > 80  # most blocks moved while it ran
    assert outs[-1].outputs[0].token_ids == reference.outputs[0].token_ids
    assert _stream_tokens(outs) == reference.outputs[0].token_ids  # none lost, none twice
    assert "".join(o.outputs[0].delta_text for o in outs) == reference.outputs[0].text
    assert cluster.move_records()[-1] == record


def test_drain_migrates_everything_away_and_resume_takes_work_again(cluster: ClusterClient) -> None:
    params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)

    async def drain_under_load() -> tuple[list, list]:
        streams = [cluster.generate(f"request {i} " * 8, params) for i in range(4)]
        firsts = [await anext(s) for s in streams]
        busy = max(cluster.replica_snapshots(), key=lambda s: s.in_flight).index
        records = await cluster.drain(busy)
        async def rest(stream) -> list:
            return [o async for o in stream]

        rests = await asyncio.gather(*(rest(s) for s in streams))
        return [[f, *r] for f, r in zip(firsts, rests, strict=True)], [busy, records]

    finals, (busy, records) = asyncio.run(drain_under_load())
    assert records and all(r.source == busy and r.target != busy for r in records)
    for outs in finals:
        assert outs[-1].finished and len(_stream_tokens(outs)) == 200
    assert cluster.replica_snapshots()[busy].draining
    routed = cluster.replica_snapshots()[busy].routed
    asyncio.run(_run(cluster, "goes elsewhere"))
    assert cluster.replica_snapshots()[busy].routed == routed
    asyncio.run(cluster.resume(busy))
    assert not cluster.replica_snapshots()[busy].draining
    with pytest.raises(ValueError, match="no replica 7"):
        asyncio.run(cluster.drain(7))
    with pytest.raises(ValueError, match="no request 'gone'"):
        asyncio.run(cluster.migrate("gone"))


def test_rebalance_moves_requests_to_an_idle_replica(cluster: ClusterClient) -> None:
    params = SamplingParams(max_tokens=300, temperature=0.0, ignore_eos=True)
    before = len(cluster.move_records())

    async def imbalanced() -> list[list]:
        await cluster.drain(1)  # everything lands on replica 0 ...
        streams = [cluster.generate(f"busy {i} " * 6, params) for i in range(4)]
        firsts = [await anext(s) for s in streams]
        await cluster.resume(1)  # ... then replica 1 is idle, and the poller rebalances
        cluster.cluster = dataclasses.replace(cluster.cluster, rebalance=True, rebalance_gap=2)

        async def rest(stream) -> list:
            return [o async for o in stream]

        try:
            rests = await asyncio.gather(*(rest(s) for s in streams))
        finally:
            cluster.cluster = dataclasses.replace(cluster.cluster, rebalance=False)
        return [[f, *r] for f, r in zip(firsts, rests, strict=True)]

    for outs in asyncio.run(imbalanced()):
        assert outs[-1].finished and len(_stream_tokens(outs)) == 300
    moved = cluster.move_records()[before:]
    assert moved and all(m.kind == "migration" for m in moved)
    assert (moved[0].source, moved[0].target) == (0, 1)
    assert all(m.context_tokens < 300 for m in moved)  # none in its last 32 tokens


def test_killed_replica_fails_its_requests_and_comes_back(cluster: ClusterClient) -> None:
    long = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)

    async def kill_mid_stream() -> tuple[BaseException | None, int]:
        stream = cluster.generate("a long story about looms", long)
        first = await anext(stream)
        victim = next(s.index for s in cluster.replica_snapshots() if s.in_flight)
        ray.kill(cluster._handles[victim].actor, no_restart=False)
        try:
            async for _ in stream:
                pass
        except EngineDeadError as e:
            return e, victim
        return None, victim

    error, victim = asyncio.run(kill_mid_stream())
    assert error is not None and f"replica {victim} stopped serving" in str(error)
    assert not cluster.replica_snapshots()[victim].up
    # The router stops sending it work: everything goes to the other replica meanwhile.
    out = asyncio.run(_run(cluster, "still served"))
    assert out[-1].finished
    _wait(lambda: cluster.replica_snapshots()[victim].up, timeout=120)
    assert cluster.replica_snapshots()[victim].restarts == 1
    assert cluster.is_running


def test_server_streams_and_reports_replicas(cluster: ClusterClient) -> None:
    live = serve_engine(cluster, ServerConfig(served_model_names=("tiny",)), (ClusterCollector(cluster),),
                        (admin_routes(cluster),))
    try:
        with live.http() as http:
            r = http.post("/v1/completions", json={"model": "tiny", "prompt": "hello loom", "max_tokens": 5,
                                                   "temperature": 0, "stream": True})
            assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
            _wait(lambda: "loom_replica_up" in http.get("/metrics").text)
            metrics = http.get("/metrics").text
            assert 'loom_replica_up{replica="0"} 1.0' in metrics and 'loom_replica_up{replica="1"} 1.0' in metrics
            assert "loom_router_prompt_tokens_total" in metrics
            assert http.get("/health").status_code == 200
            replicas = http.get("/admin/replicas").json()["replicas"]
            assert [(r["replica"], r["up"], r["role"]) for r in replicas] == [(0, True, "both"), (1, True, "both")]
            assert http.post("/admin/drain/9").status_code == 404
            r = http.post("/admin/drain/1")
            assert r.status_code == 200 and r.json()["replica"] == 1
            assert http.get("/admin/replicas").json()["replicas"][1]["draining"]
            assert http.post("/admin/resume/1").json() == {"replica": 1, "draining": False}

            # A replica killed under a non-streaming request: a clear 503, and the other one serves on.
            def long_request() -> httpx.Response:
                return http.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 400,
                                                          "temperature": 0, "ignore_eos": True})

            with ThreadPoolExecutor(1) as pool:
                pending = pool.submit(long_request)
                _wait(lambda: any(s.in_flight for s in cluster.replica_snapshots()))
                victim = next(s.index for s in cluster.replica_snapshots() if s.in_flight)
                ray.kill(cluster._handles[victim].actor, no_restart=False)
                r = pending.result(timeout=60)
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "engine_unavailable"
            assert f"replica {victim} stopped serving" in r.json()["error"]["message"]
            r = http.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 3})
            assert r.status_code == 200
    finally:
        live.stop()  # the app's shutdown stops the cluster: this test runs last
    assert not cluster.is_running
