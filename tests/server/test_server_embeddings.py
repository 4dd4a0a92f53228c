"""/v1/embeddings through the openai SDK (which asks for base64) and raw HTTP (floats): the
engine's pooled embeddings, every input shape, usage, and the 400s."""

from __future__ import annotations

import base64
import struct

import pytest
from live_server import TINY

TEXTS = ["The quick brown fox", "Once upon a time there was a tiny model"]


def test_embeddings_equal_the_offline_ones_in_both_encodings(tiny_server, tiny_offline):
    expected = tiny_offline.embed(TEXTS, use_tqdm=False)
    ids = [tiny_offline.tokenizer.encode(t) for t in TEXTS]
    r = tiny_server.client().embeddings.create(model=TINY, input=TEXTS)  # base64 on the wire
    assert r.object == "list" and r.model == TINY and [d.index for d in r.data] == [0, 1]
    for d, e in zip(r.data, expected):
        assert d.object == "embedding" and d.embedding == pytest.approx(e, abs=1e-5)
    assert (r.usage.prompt_tokens, r.usage.total_tokens) == (sum(map(len, ids)),) * 2
    with tiny_server.http() as http:
        body = http.post("/v1/embeddings", json={"input": TEXTS[0], "encoding_format": "float"}).json()
        raw = http.post("/v1/embeddings", json={"input": TEXTS[0], "encoding_format": "base64",
                                                "dimensions": len(expected[0])}).json()
    assert body["data"][0]["embedding"] == pytest.approx(expected[0], abs=1e-5)
    decoded = base64.b64decode(raw["data"][0]["embedding"])
    assert list(struct.unpack(f"<{len(decoded) // 4}f", decoded)) == pytest.approx(body["data"][0]["embedding"], abs=1e-6)
    assert body["usage"] == {"prompt_tokens": len(ids[0]), "total_tokens": len(ids[0])}


def test_token_id_inputs(tiny_server, tiny_offline):
    ids = [tiny_offline.tokenizer.encode(t) for t in TEXTS]
    expected = tiny_offline.embed(TEXTS, use_tqdm=False)
    client = tiny_server.client()
    one = client.embeddings.create(model=TINY, input=ids[0], encoding_format="float")
    many = client.embeddings.create(model=TINY, input=ids, encoding_format="float")
    assert one.data[0].embedding == pytest.approx(expected[0], abs=1e-5)
    assert [d.embedding for d in many.data][1] == pytest.approx(expected[1], abs=1e-5)
    assert many.usage.prompt_tokens == sum(map(len, ids))


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": "x", "dimensions": 8}, "dimensions"),
        ({"input": []}, "input"),
        ({"input": ""}, "input"),
        ({"input": ["fine", ""]}, "input"),
        ({"input": [10**9]}, "input"),
        ({"input": "word " * 600}, "input"),  # longer than the context (512)
        ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
        ({}, "input"),
    ],
)
def test_bad_embedding_requests_are_400(tiny_server, body, param):
    with tiny_server.http() as http:
        resp = http.post("/v1/embeddings", json=body)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param
    tiny_server.wait_idle()


def test_unknown_model_is_404(tiny_server):
    with tiny_server.http() as http:
        assert http.post("/v1/embeddings", json={"model": "nope", "input": "x"}).status_code == 404
