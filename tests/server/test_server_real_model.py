"""Real text from the default model (SmolLM2-135M-Instruct): its chat template and stop strings
through the server. Kept to a few short greedy answers."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from live_server import LiveServer, start_server

from loom.server import ServerConfig
from loom.server.config import DEFAULT_MODEL_NAME


@pytest.fixture(scope="module")
def smol() -> Iterator[LiveServer]:
    srv = start_server(None, ServerConfig(), num_threads=1, num_blocks=64)
    yield srv
    srv.stop()


QUESTION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
]


def test_chat_template_turns_and_a_real_answer(smol):
    turns = [*QUESTION, {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Italy?"}]
    with smol.http() as http:
        ids = http.post("/tokenize", json={"messages": turns}).json()["tokens"]
        text = http.post("/detokenize", json={"tokens": ids}).json()["prompt"]
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                    "<|im_start|>assistant\nParis.<|im_end|>\n"
                    "<|im_start|>user\nAnd of Italy?<|im_end|>\n<|im_start|>assistant\n")
    r = smol.client().chat.completions.create(model=DEFAULT_MODEL_NAME, messages=QUESTION, max_tokens=20, temperature=0)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"  # the model ended its turn (<|im_end|>)


def test_stop_strings_on_real_text(smol):
    client = smol.client()
    r = client.completions.create(model=DEFAULT_MODEL_NAME, prompt="The capital of France is", max_tokens=8,
                                  temperature=0, stop=["."])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (" Paris", "stop")
    r = client.completions.create(model=DEFAULT_MODEL_NAME, prompt="The capital of France is", max_tokens=8,
                                  temperature=0, stop=["."], extra_body={"include_stop_str_in_output": True})
    assert r.choices[0].text == " Paris."
    chunks = list(client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=QUESTION, max_tokens=20,
                                                 temperature=0, stop="Paris", stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == "The capital of France is " and chunks[-1].choices[0].finish_reason == "stop"
