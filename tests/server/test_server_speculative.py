"""Speculative decoding through the server: streamed output equal to the offline engine without
speculation, and /metrics counting drafts."""

from __future__ import annotations

import json

import pytest
from live_server import TINY, TINY_ENGINE, start_server
from prometheus_client.parser import text_string_to_metric_families

from loom.sampling import SamplingParams
from loom.server import ServerConfig

PROMPT = "one two three four one two three four one two three four one two"


@pytest.fixture(scope="module")
def spec_server(tiny_path):
    srv = start_server(tiny_path, ServerConfig(served_model_names=(TINY,)), **TINY_ENGINE, speculative="ngram",
                       speculative_k="4")
    yield srv
    srv.stop()


def test_streamed_speculative_output_equals_plain_decoding(spec_server, tiny_offline):
    want = tiny_offline.generate([PROMPT], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
                                 use_tqdm=False)[0].outputs[0]
    body = {"model": TINY, "prompt": PROMPT, "max_tokens": 40, "ignore_eos": True, "temperature": 0, "stream": True}
    with spec_server.http() as http:
        text = ""
        with http.stream("POST", "/v1/completions", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    text += json.loads(line[6:])["choices"][0]["text"]
        spec_server.wait_idle()
        metrics = {s.name: s.value for f in text_string_to_metric_families(http.get("/metrics").text) for s in f.samples}
    assert text == want.text
    assert metrics["loom_spec_draft_tokens_total"] > 0
    assert 0 < metrics["loom_spec_accepted_tokens_total"] <= metrics["loom_spec_draft_tokens_total"]
    assert metrics["loom_spec_verifications_total"] > 0
