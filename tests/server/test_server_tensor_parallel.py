"""A server over a tensor-parallel engine: the same streamed greedy text as one process, the
all-reduce time in /metrics, and the peer processes gone after shutdown."""

from __future__ import annotations

import os

import pytest

from live_server import TINY, TINY_ENGINE, start_server

from loom.server import ServerConfig

GREEDY = dict(temperature=0, extra_body={"ignore_eos": True})


def test_a_tensor_parallel_server_streams_the_text_of_one_process(tiny_path, tiny_offline):
    from loom.sampling import SamplingParams

    prompt = "Write a haiku about the sea"
    (expected,) = [o.outputs[0].text for o in tiny_offline.generate(
        [prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)]
    srv = start_server(tiny_path, ServerConfig(served_model_names=(TINY,)), **TINY_ENGINE, tensor_parallel_size=2)
    try:
        chunks = srv.client().completions.create(model=TINY, prompt=prompt, max_tokens=16, stream=True, **GREEDY)
        assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
        metrics = srv.http().get("/metrics").text
        (line,) = [m for m in metrics.splitlines() if m.startswith("loom_tensor_parallel_all_reduce_seconds_total")]
        assert float(line.split()[-1]) > 0
    finally:
        srv.stop()  # the app's shutdown stops the engine thread, which stops the peers
    for pid in srv.engine.engine.worker.group.peer_pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
