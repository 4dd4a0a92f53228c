"""/v1/chat/completions end to end through the official openai SDK, on the tiny random llama
(which carries the default model's tokenizer and ChatML template)."""

from __future__ import annotations

import json

import pytest
from live_server import TINY
from server_spec import available, spec_errors

from loom.sampling import SamplingParams

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another one?"},
]
GREEDY = dict(temperature=0, extra_body={"ignore_eos": True})


def test_chat_matches_offline_llm_chat(tiny_server, tiny_offline):
    expected = tiny_offline.chat(CONVERSATION, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)[0]
    r = tiny_server.client().chat.completions.create(model=TINY, messages=CONVERSATION, max_completion_tokens=10, **GREEDY)
    c = r.choices[0]
    assert c.message.content == expected.outputs[0].text and c.message.role == "assistant"
    assert c.finish_reason == "length" and c.logprobs is None and c.index == 0
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == TINY
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(expected.prompt_token_ids), 10)
    assert r.usage.total_tokens == r.usage.prompt_tokens + 10


def test_streaming_chat(tiny_server):
    client = tiny_server.client()
    full = client.chat.completions.create(model=TINY, messages=CONVERSATION, max_tokens=12, **GREEDY)
    chunks = list(client.chat.completions.create(model=TINY, messages=CONVERSATION, max_tokens=12, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    body = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in body) == full.choices[0].message.content
    assert body[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in body[:-1])
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert all(c.usage is None for c in body)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_streaming_chat_with_continuous_usage_stats(tiny_server):
    chunks = list(tiny_server.client().chat.completions.create(
        model=TINY, messages=CONVERSATION, max_tokens=6, n=2, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}, **GREEDY))
    body, final = chunks[:-1], chunks[-1]
    assert final.choices == [] and final.usage.completion_tokens == 12
    assert all(c.usage is not None and c.usage.prompt_tokens == final.usage.prompt_tokens for c in body)
    counts = [c.usage.completion_tokens for c in body]
    assert counts[0] == counts[1] <= 2  # the role chunks: the first output holds at most the first tokens
    assert counts == sorted(counts) and counts[-1] == 12


def test_chat_logprobs(tiny_server):
    r = tiny_server.client().chat.completions.create(model=TINY, messages=CONVERSATION, max_tokens=6, logprobs=True,
                                                     top_logprobs=3, **GREEDY)
    content = r.choices[0].logprobs.content
    assert r.choices[0].logprobs.refusal is None
    assert len(content) == 6 and "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token  # greedy: the best token
        assert t.logprob == pytest.approx(t.top_logprobs[0].logprob) and t.logprob <= 0
        assert [x.logprob for x in t.top_logprobs] == sorted((x.logprob for x in t.top_logprobs), reverse=True)
        assert bytes(t.bytes).decode("utf-8", errors="replace") == t.token
    streamed = list(tiny_server.client().chat.completions.create(model=TINY, messages=CONVERSATION, max_tokens=6,
                                                                 logprobs=True, top_logprobs=3, stream=True, **GREEDY))
    tokens = [t.token for c in streamed if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert tokens == [t.token for t in content]


def test_n_choices_stream_with_their_indices(tiny_server):
    kwargs = dict(model=TINY, messages=CONVERSATION, max_tokens=5, n=2, temperature=1.0, seed=3, extra_body={"ignore_eos": True})
    client = tiny_server.client()
    r = client.chat.completions.create(**kwargs)
    assert [c.index for c in r.choices] == [0, 1] and r.usage.completion_tokens == 10
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    for i in range(2):
        own = [c.choices[0] for c in chunks if c.choices[0].index == i]
        assert own[0].delta.role == "assistant" and own[-1].finish_reason == "length"
        assert "".join(ch.delta.content or "" for ch in own) == r.choices[i].message.content


def test_content_parts_developer_role_and_max_tokens_alias(tiny_server):
    client = tiny_server.client()
    plain = client.chat.completions.create(model="tiny-alias", max_tokens=4, **GREEDY, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}])
    parts = client.chat.completions.create(model="tiny-alias", max_completion_tokens=4, **GREEDY, messages=[
        {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}])
    assert parts.choices[0].message.content == plain.choices[0].message.content
    assert parts.usage.prompt_tokens == plain.usage.prompt_tokens and parts.model == "tiny-alias"


def test_user_becomes_the_tenant_and_priority_and_slo_class_pass_through(tiny_server, monkeypatch):
    seen = []
    generate = tiny_server.engine.generate

    def spy(prompt, params, request_id=None, **kwargs):
        seen.append(kwargs)
        return generate(prompt, params, request_id, **kwargs)

    monkeypatch.setattr(tiny_server.engine, "generate", spy)
    tiny_server.client().chat.completions.create(model=TINY, messages=CONVERSATION, max_tokens=2, user="team-a",
                                                 extra_body={"priority": 2, "slo_class": "batch"})
    tiny_server.client().completions.create(model=TINY, prompt="x", max_tokens=2, user="team-b")
    assert seen == [{"priority": 2, "tenant": "team-a", "slo_class": "batch", "session_id": None},
                    {"priority": 0, "tenant": "team-b", "slo_class": None, "session_id": None}]


def test_chat_wire_format_matches_the_openapi_spec(tiny_server):
    assert available(), "the OpenAI spec is missing from shared/data/openai-openapi"
    body = {"model": TINY, "messages": CONVERSATION, "max_tokens": 4, "logprobs": True, "top_logprobs": 2}
    with tiny_server.http() as http:
        full = http.post("/v1/chat/completions", json=body).json()
        assert spec_errors("CreateChatCompletionResponse", full) == []
        plain = http.post("/v1/chat/completions", json={**body, "logprobs": None, "top_logprobs": None}).json()
        assert plain["choices"][0]["logprobs"] is None and spec_errors("CreateChatCompletionResponse", plain) == []
        with http.stream("POST", "/v1/chat/completions",
                         json={**body, "stream": True, "stream_options": {"include_usage": True}}) as resp:
            events = [line for line in resp.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    for e in events[:-1]:
        chunk = json.loads(e.removeprefix("data: "))
        assert spec_errors("CreateChatCompletionStreamResponse", chunk) == [], chunk
