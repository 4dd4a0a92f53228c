"""/v1/completions end to end through the official openai SDK (and raw HTTP where the SDK would
hide the wire format), on the tiny random llama."""

from __future__ import annotations

import json

import pytest
from live_server import TINY
from server_spec import available, spec_errors

from loom.sampling import SamplingParams

PROMPTS = ["Hello, my name is", "The quick brown fox", "Once upon a time", "1 2 3 4"]
GREEDY = dict(temperature=0, extra_body={"ignore_eos": True})


def offline_greedy(llm, prompts, max_tokens):
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True), use_tqdm=False)
    return [o.outputs[0].text for o in outs]


def test_greedy_completion_matches_offline_llm(tiny_server, tiny_offline):
    client = tiny_server.client()
    expected = offline_greedy(tiny_offline, PROMPTS, 12)
    r = client.completions.create(model=TINY, prompt=PROMPTS, max_tokens=12, **GREEDY)
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == expected
    assert r.id.startswith("cmpl-") and r.object == "text_completion" and r.model == TINY
    assert r.system_fingerprint.startswith("fp_") and isinstance(r.created, int)
    assert all(c.finish_reason == "length" for c in r.choices)
    prompt_tokens = sum(len(tiny_offline.tokenizer.encode(p)) for p in PROMPTS)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (prompt_tokens, 48, prompt_tokens + 48)


def test_token_id_prompts(tiny_server, tiny_offline):
    client = tiny_server.client()
    ids = [tiny_offline.tokenizer.encode(p) for p in PROMPTS[:2]]
    expected = [o.outputs[0].text for o in tiny_offline.generate(
        ids, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)]
    one = client.completions.create(model=TINY, prompt=ids[0], max_tokens=6, **GREEDY)
    many = client.completions.create(model=TINY, prompt=ids, max_tokens=6, **GREEDY)
    assert one.choices[0].text == expected[0]
    assert [c.text for c in many.choices] == expected
    assert one.usage.prompt_tokens == len(ids[0])


def test_stream_equals_non_stream_and_reports_usage(tiny_server):
    client = tiny_server.client()
    full = client.completions.create(model=TINY, prompt=PROMPTS[0], max_tokens=16, **GREEDY)
    chunks = list(client.completions.create(model=TINY, prompt=PROMPTS[0], max_tokens=16, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    text_chunks = [c for c in chunks if c.choices]
    assert len(text_chunks) > 1
    assert "".join(c.choices[0].text for c in text_chunks) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("cmpl-")
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == 16
    assert usage_chunk.usage.prompt_tokens == full.usage.prompt_tokens


def test_n_samples_are_distinct_and_reproducible_with_a_seed(tiny_server):
    client = tiny_server.client()
    kwargs = dict(model=TINY, prompt=PROMPTS[1], max_tokens=10, n=3, temperature=1.0, seed=7, extra_body={"ignore_eos": True})
    a = client.completions.create(**kwargs)
    b = client.completions.create(**kwargs)
    assert sorted(c.index for c in a.choices) == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1
    assert a.usage.completion_tokens == 30
    streamed = list(client.completions.create(stream=True, **kwargs))
    texts = {i: "".join(c.choices[0].text for c in streamed if c.choices and c.choices[0].index == i) for i in range(3)}
    assert [texts[i] for i in range(3)] == [c.text for c in a.choices]


def test_best_of_returns_the_n_most_likely_samples_and_counts_them_all(tiny_server, tiny_offline):
    sampling = dict(temperature=1.0, seed=5, max_tokens=6, ignore_eos=True)
    every = tiny_offline.generate(PROMPTS[2], SamplingParams(n=4, logprobs=0, **sampling), use_tqdm=False)[0]
    ranked = sorted(every.outputs, key=lambda c: c.cumulative_logprob, reverse=True)
    client = tiny_server.client()
    r = client.completions.create(model=TINY, prompt=PROMPTS[2], n=2, best_of=4, max_tokens=6, temperature=1.0, seed=5,
                                  extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == [c.text for c in ranked[:2]]
    assert r.usage.completion_tokens == 4 * 6  # like OpenAI: every sample is billed
    two_prompts = client.completions.create(model=TINY, prompt=PROMPTS[2:4], best_of=3, max_tokens=2)
    assert [c.index for c in two_prompts.choices] == [0, 1] and two_prompts.usage.completion_tokens == 2 * 3 * 2
    with tiny_server.http() as http:
        streamed = http.post("/v1/completions", json={"prompt": "x", "best_of": 2, "stream": True})
        assert streamed.status_code == 400 and streamed.json()["error"]["param"] == "best_of"
        fewer = http.post("/v1/completions", json={"prompt": "x", "n": 3, "best_of": 2})
        assert fewer.status_code == 400 and fewer.json()["error"]["param"] == "best_of"
        assert http.post("/v1/completions", json={"prompt": "x", "best_of": 2, "n": 2, "stream": True,
                                                  "max_tokens": 1}).status_code == 200  # nothing to rank


def test_continuous_usage_stats_put_the_usage_so_far_in_every_chunk(tiny_server):
    client = tiny_server.client()
    kwargs = dict(model=TINY, prompt=PROMPTS[:2], max_tokens=5, stream=True, **GREEDY)
    chunks = list(client.completions.create(stream_options={"include_usage": True, "continuous_usage_stats": True},
                                            **kwargs))
    text_chunks, final = chunks[:-1], chunks[-1]
    assert final.choices == [] and final.usage.completion_tokens == 10
    assert all(c.choices and c.usage is not None for c in text_chunks)
    assert all(c.usage.prompt_tokens == final.usage.prompt_tokens for c in text_chunks)
    counts = [c.usage.completion_tokens for c in text_chunks]
    assert counts == sorted(counts) and 1 <= counts[0] < 10 and counts[-1] == 10
    assert all(c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens for c in text_chunks)
    plain = list(client.completions.create(stream_options={"include_usage": True}, **kwargs))
    assert all(c.usage is None for c in plain[:-1])
    alone = list(client.completions.create(stream_options={"continuous_usage_stats": True}, **kwargs))
    assert all(c.usage is None for c in alone)  # only together with include_usage, as in vLLM


def test_several_prompts_with_n_index_choices_prompt_major(tiny_server):
    r = tiny_server.client().completions.create(model=TINY, prompt=PROMPTS[:2], max_tokens=4, n=2, **GREEDY)
    choices = sorted(r.choices, key=lambda c: c.index)
    assert [c.index for c in choices] == [0, 1, 2, 3]
    assert choices[0].text == choices[1].text != choices[2].text == choices[3].text  # greedy: samples agree


def test_stop_string_cuts_the_text(tiny_server):
    client = tiny_server.client()
    full = client.completions.create(model=TINY, prompt=PROMPTS[2], max_tokens=24, **GREEDY).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    cut = full[: full.index(stop)]
    r = client.completions.create(model=TINY, prompt=PROMPTS[2], max_tokens=24, stop=[stop, "zzzz"], **GREEDY)
    assert (r.choices[0].text, r.choices[0].finish_reason) == (cut, "stop")
    streamed = list(client.completions.create(model=TINY, prompt=PROMPTS[2], max_tokens=24, stop=stop, stream=True, **GREEDY))
    assert "".join(c.choices[0].text for c in streamed) == cut
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_logprobs_legacy_format(tiny_server):
    r = tiny_server.client().completions.create(model=TINY, prompt=PROMPTS[0], max_tokens=5, logprobs=3, **GREEDY)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0 and 3 <= len(top) <= 4
        assert top[token] == pytest.approx(logprob) == pytest.approx(max(top.values()))  # greedy picks the top token


def test_echo_with_max_tokens_0_scores_the_prompt_like_lm_eval(tiny_server, tiny_offline):
    """lm-evaluation-harness loglikelihood: echo=True, max_tokens=0, logprobs=1; sum the
    continuation's token_logprobs and check it is greedy against top_logprobs."""
    prompt = "The quick brown fox jumps over the lazy dog"
    ids = tiny_offline.tokenizer.encode(prompt)
    ref = tiny_offline.generate([ids], SamplingParams(max_tokens=0, prompt_logprobs=1), use_tqdm=False)[0].prompt_logprobs
    r = tiny_server.client().completions.create(model=TINY, prompt=prompt, max_tokens=0, echo=True, logprobs=1, temperature=0)
    c = r.choices[0]
    assert c.text == prompt and c.finish_reason == "length"
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(ids)
    lp = c.logprobs
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx([e.logprob for e in ref[1:]], abs=1e-5)
    for token, logprob, top in zip(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert top[token] == pytest.approx(logprob) and max(top.values()) >= logprob
    # the newer harness asks for one token more and drops it: the prompt part must be the same
    r1 = tiny_server.client().completions.create(model=TINY, prompt=prompt, max_tokens=1, echo=True, logprobs=1, temperature=0)
    lp1 = r1.choices[0].logprobs
    assert len(lp1.tokens) == len(ids) + 1 and lp1.token_logprobs[:-1] == lp.token_logprobs
    assert r1.choices[0].text.startswith(prompt) and lp1.text_offset[len(ids)] == len(prompt)


def test_echo_streams_the_prompt_first(tiny_server):
    chunks = list(tiny_server.client().completions.create(model=TINY, prompt=PROMPTS[3], max_tokens=3, echo=True,
                                                          stream=True, **GREEDY))
    assert chunks[0].choices[0].text.startswith(PROMPTS[3])


def test_wire_format_matches_the_openapi_spec(tiny_server):
    """Keys the SDK would paper over: ``logprobs: null`` present, no unknown finish reasons."""
    assert available(), "the OpenAI spec is missing from shared/data/openai-openapi"
    with tiny_server.http() as http:
        body = http.post("/v1/completions", json={"model": TINY, "prompt": "hi", "max_tokens": 3}).json()
        assert body["choices"][0]["logprobs"] is None
        assert spec_errors("CreateCompletionResponse", body) == []
        body = http.post("/v1/completions", json={"model": TINY, "prompt": "hi", "max_tokens": 3, "logprobs": 2}).json()
        assert spec_errors("CreateCompletionResponse", body) == []
        with http.stream("POST", "/v1/completions", json={"model": TINY, "prompt": "hi", "max_tokens": 3, "stream": True,
                                                          "stream_options": {"include_usage": True}}) as resp:
            assert resp.headers["content-type"].startswith("text/event-stream")
            events = [line for line in resp.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert all(e.startswith("data: ") for e in events)
    final = chunks[-2]  # the last text chunk carries the finish reason; the spec's finish_reason is not nullable
    assert spec_errors("CreateCompletionResponse", final) == [] and final["choices"][0]["finish_reason"] == "length"
    assert spec_errors("CreateCompletionResponse", chunks[-1]) == [] and chunks[-1]["usage"]["completion_tokens"] == 3
