import json

import pytest

from loom.bench.client import CHAT, COMPLETIONS, ClientConfig, RequestRecord, _Stream, chunk_text, request_body
from loom.bench.prompts import PreparedRequest

REQ = PreparedRequest(index=3, arrival=1.0, prompt="hello there", prompt_len=2, max_tokens=5)


def test_request_body_completions_and_chat():
    body = request_body(ClientConfig("http://x", "m"), REQ)
    assert body == {
        "model": "m",
        "prompt": "hello there",
        "max_tokens": 5,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    chat = request_body(ClientConfig("http://x", "m", endpoint=CHAT, ignore_eos=False, extra_body={"top_k": 1}), REQ)
    assert chat["messages"] == [{"role": "user", "content": "hello there"}]
    assert "prompt" not in chat and "ignore_eos" not in chat and chat["top_k"] == 1


def test_client_config_errors():
    with pytest.raises(ValueError, match="endpoint"):
        ClientConfig("http://x", "m", endpoint="/v1/embeddings")
    with pytest.raises(ValueError, match="concurrency"):
        ClientConfig("http://x", "m", max_concurrency=0)
    assert ClientConfig("http://x", "m", api_key="k").headers == {"Authorization": "Bearer k"}


def test_chunk_text_shapes():
    assert chunk_text({"choices": [{"text": "a"}]}) == "a"
    assert chunk_text({"choices": [{"delta": {"role": "assistant", "content": ""}}]}) == ""
    assert chunk_text({"choices": [{"delta": {"content": "b"}}]}) == "b"
    assert chunk_text({"choices": [{"delta": {"reasoning_content": "c"}}]}) == "c"
    assert chunk_text({"choices": [], "usage": {}}) == ""


def data(obj) -> str:
    return json.dumps(obj)


def test_stream_feed_counts_text_chunks_and_usage():
    s = _Stream()
    assert s.feed(data({"choices": [{"delta": {"role": "assistant", "content": ""}}]}), 0.1)
    assert s.feed(data({"choices": [{"delta": {"content": "Hi"}, "finish_reason": None}]}), 0.2)
    assert s.feed(data({"choices": [{"delta": {"content": "!"}, "finish_reason": "stop"}]}), 0.3)
    assert s.feed(data({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}}), 0.4)
    assert not s.feed("[DONE]", 0.5)
    assert s.chunk_times == [0.2, 0.3]
    assert (s.prompt_tokens, s.completion_tokens, s.finish_reason, s.error) == (7, 3, "stop", None)


def test_stream_feed_errors():
    s = _Stream()
    assert not s.feed("{not json", 0.1)
    assert "bad SSE payload" in s.error
    s = _Stream()
    assert not s.feed(data({"error": {"message": "out of memory"}}), 0.1)
    assert "out of memory" in s.error


def test_record_json_roundtrip():
    r = RequestRecord(
        index=1, scheduled=0.5, sent=0.6, finished=2.0, chunk_times=(1.0, 1.5), prompt_len=10, max_tokens=2,
        prompt_tokens=11, output_tokens=2, usage_reported=True, finish_reason="length", error=None,
    )  # fmt: skip
    j = json.loads(json.dumps(r.to_json()))
    assert j["ttft"] == pytest.approx(0.4) and j["tpot"] == pytest.approx(1.0) and j["ok"] is True
    assert RequestRecord.from_json(j) == r


def test_endpoints():
    assert (COMPLETIONS, CHAT) == ("/v1/completions", "/v1/chat/completions")
