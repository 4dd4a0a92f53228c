"""Many clients at once share the engine's steps and each gets its own exact answer; a client
that goes away mid-request has its request aborted and its KV blocks freed."""

from __future__ import annotations

import asyncio
import time

import httpx
from live_server import TINY

from loom.sampling import SamplingParams


def greedy(method, prompt, max_tokens: int) -> str:
    """The offline reference: ``LLM.generate`` or ``LLM.chat`` on one prompt."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return method([prompt], params, use_tqdm=False)[0].outputs[0].text


def test_32_concurrent_streaming_clients_get_complete_correct_answers(tiny_server, tiny_offline):
    prompts = [f"Request number {i} says" + " hello" * (i % 5) for i in range(32)]
    max_tokens = [8 + i % 9 for i in range(32)]
    expected = [greedy(tiny_offline.generate, p, m) for p, m in zip(prompts, max_tokens)]
    steps_before = tiny_server.engine.stats().steps

    async def one(client, i: int) -> tuple[str, str | None, int]:
        kwargs = dict(model=TINY, max_tokens=max_tokens[i], temperature=0, stream=True,
                      stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        if i % 2:
            stream = await client.chat.completions.create(messages=[{"role": "user", "content": prompts[i]}], **kwargs)
        else:
            stream = await client.completions.create(prompt=prompts[i], **kwargs)
        text, finish, usage = [], None, 0
        async for chunk in stream:
            if chunk.usage:
                usage = chunk.usage.completion_tokens
            for c in chunk.choices:
                text.append(c.delta.content or "" if i % 2 else c.text)
                finish = c.finish_reason or finish
        return "".join(text), finish, usage

    async def run() -> list[tuple[str, str | None, int]]:
        client = tiny_server.async_client()
        return await asyncio.gather(*(one(client, i) for i in range(32)))

    results = asyncio.run(run())
    chat_expected = {
        i: greedy(tiny_offline.chat, [{"role": "user", "content": prompts[i]}], max_tokens[i]) for i in range(1, 32, 2)
    }
    for i, (text, finish, usage) in enumerate(results):
        assert text == (chat_expected[i] if i % 2 else expected[i]), i
        assert (finish, usage) == ("length", max_tokens[i]), i
    # batched: far fewer steps than the 32 requests' tokens one after another
    assert tiny_server.engine.stats().steps - steps_before < sum(max_tokens) // 2
    tiny_server.wait_idle()


def _blocks_back(server, free_before: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = server.engine.stats()
        if s.num_running == 0 and s.num_waiting == 0 and s.num_free_blocks == free_before:
            return
        time.sleep(0.02)
    raise AssertionError(f"blocks not freed: {server.engine.stats()} (free before: {free_before})")


def test_disconnect_mid_stream_aborts_and_frees_blocks(tiny_server):
    tiny_server.wait_idle()
    free_before = tiny_server.engine.stats().num_free_blocks
    aborted_before = _finished(tiny_server, "abort")
    body = {"model": TINY, "prompt": "a long story " * 40, "max_tokens": 400, "ignore_eos": True, "stream": True}
    with tiny_server.http() as http, http.stream("POST", "/v1/completions", json=body) as resp:
        lines = resp.iter_lines()
        got = [next(lines) for _ in range(6)]  # a few chunks: the request is running and holds blocks
        assert all(not line or line.startswith("data: {") for line in got)
        assert tiny_server.engine.stats().num_free_blocks < free_before
    _blocks_back(tiny_server, free_before)
    assert _finished(tiny_server, "abort") == aborted_before + 1  # cut short, not run to its 400 tokens


def test_disconnect_while_waiting_for_a_non_streamed_answer_aborts(tiny_server):
    tiny_server.wait_idle()
    free_before = tiny_server.engine.stats().num_free_blocks
    aborted_before = _finished(tiny_server, "abort")
    body = {"model": TINY, "messages": [{"role": "user", "content": "go on " * 50}], "max_tokens": 450, "ignore_eos": True}
    with tiny_server.http() as http:
        try:
            http.post("/v1/chat/completions", json=body, timeout=httpx.Timeout(60, read=0.3))
            raise AssertionError("expected the client to time out first")
        except httpx.ReadTimeout:
            pass
    _blocks_back(tiny_server, free_before)
    assert _finished(tiny_server, "abort") == aborted_before + 1


def _finished(server, reason: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    with server.http() as http:
        text = http.get("/metrics").text
    for family in text_string_to_metric_families(text):
        if family.name == "loom_request_finished":
            return sum(s.value for s in family.samples if s.name.endswith("_total") and s.labels["finish_reason"] == reason)
    return 0.0
