"""Disaggregated prefill and decode on a local Ray: every request is handed off with its KV blocks
after its first token, and the output equals one engine's."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

ray = pytest.importorskip("ray", reason="the cluster extra (pip install loom[cluster]) is not installed")

from loom.cluster import ClusterConfig  # noqa: E402
from loom.cluster.client import ClusterClient  # noqa: E402
from loom.cluster.metrics import ClusterCollector  # noqa: E402
from loom.engine import LLM, engine_config  # noqa: E402
from loom.sampling import SamplingParams  # noqa: E402
from loom.server import ServerConfig  # noqa: E402
from tests.server.live_server import serve_engine  # noqa: E402

ENGINE = dict(dtype="float32", num_blocks=256, block_size=16, max_num_seqs=16, max_num_batched_tokens=256)


@pytest.fixture(scope="module")
def split(tiny_model) -> Iterator[ClusterClient]:
    client = ClusterClient(engine_config(str(tiny_model("llama")), **ENGINE),
                           ClusterConfig(replicas=2, prefill_replicas=1, replica_threads=1, report_interval=0.05))
    yield client
    client.shutdown()


def test_handed_off_requests_match_one_engine(split: ClusterClient, tiny_model) -> None:
    prompts = [f"prefill here, decode there {i} " * (i + 1) for i in range(5)]
    params = [SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True),
              SamplingParams(max_tokens=16, temperature=0.8, seed=3, ignore_eos=True, logprobs=1)]
    llm = LLM(str(tiny_model("llama")), num_threads=1, **ENGINE)
    for p in params:
        reference = llm.generate(prompts, p)
        before = len(split.move_records())

        async def collect(prompt: str) -> list:
            return [o async for o in split.generate(prompt, p)]

        async def all_at_once() -> list[list]:
            return await asyncio.gather(*(collect(q) for q in prompts))

        for outs, ref in zip(asyncio.run(all_at_once()), reference, strict=True):
            assert outs[-1].outputs[0].token_ids == ref.outputs[0].token_ids
            assert [t for o in outs for t in o.outputs[0].delta_token_ids] == ref.outputs[0].token_ids
            assert "".join(o.outputs[0].delta_text for o in outs) == ref.outputs[0].text
        moves = split.move_records()[before:]
        assert len(moves) == len(prompts) and {(m.kind, m.source, m.target) for m in moves} == {("handoff", 0, 1)}
        assert all(m.kv_bytes > 0 for m in moves if m.context_tokens >= 16)


def test_what_does_not_hand_off_runs_whole_on_one_side(split: ClusterClient) -> None:
    before = [s.routed for s in split.replica_snapshots()]
    moves = len(split.move_records())

    async def run(params: SamplingParams) -> list:
        return [o async for o in split.generate("one side only", params)]

    one = asyncio.run(run(SamplingParams(max_tokens=1)))  # done at its first token: on the prefill replica
    two = asyncio.run(run(SamplingParams(max_tokens=4, n=2, temperature=1.0)))  # n = 2 cannot move: decode replica
    assert one[-1].finished and len(two[-1].outputs) == 2
    after = [s.routed for s in split.replica_snapshots()]
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 1]
    assert len(split.move_records()) == moves


def test_transfer_metrics_on_the_server(split: ClusterClient) -> None:
    live = serve_engine(split, ServerConfig(served_model_names=("tiny",)), (ClusterCollector(split),))
    try:
        with live.http() as http:
            r = http.post("/v1/completions", json={"model": "tiny", "prompt": "moved " * 40, "max_tokens": 4,
                                                   "stream": True})
            assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
            metrics = http.get("/metrics").text
        assert 'loom_kv_transfer_bytes_total{kind="handoff"}' in metrics
        assert 'loom_move_downtime_seconds_count{kind="handoff"}' in metrics
    finally:
        live.stop()
