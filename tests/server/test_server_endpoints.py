"""/v1/models, /health, /version, /tokenize, /detokenize and the Prometheus /metrics."""

from __future__ import annotations

from live_server import TINY
from prometheus_client.parser import text_string_to_metric_families

import loom


def test_models_health_version(tiny_server):
    models = tiny_server.client().models.list()
    assert [m.id for m in models] == [TINY, "tiny-alias"]
    assert all(m.object == "model" and m.owned_by == "loom" and isinstance(m.created, int) for m in models)
    assert tiny_server.client().models.retrieve(TINY).id == TINY
    with tiny_server.http() as http:
        assert http.get("/health").status_code == 200
        assert http.get("/version").json() == {"version": loom.__version__}


def test_every_get_route_answers_head_without_a_body(tiny_server):
    with tiny_server.http() as http:
        for path in ("/health", "/v1/models", f"/v1/models/{TINY}", "/version", "/metrics"):
            get, head = http.get(path), http.head(path)
            assert (head.status_code, head.content) == (200, b""), path
            assert head.headers.get("content-type") == get.headers.get("content-type"), path
        assert http.head("/v1/models/nope").status_code == 404
        assert http.head("/v1/completions").status_code == 405


def test_tokenize_and_detokenize(tiny_server, tiny_offline):
    tok = tiny_offline.tokenizer
    messages = [{"role": "user", "content": "Hi"}]
    with tiny_server.http() as http:
        r = http.post("/tokenize", json={"model": TINY, "prompt": "Hello world", "return_token_strs": True}).json()
        assert r["tokens"] == tok.encode("Hello world") and r["count"] == len(r["tokens"]) and r["max_model_len"] == 512
        assert r["token_strs"] == tok.convert_ids_to_tokens(r["tokens"])
        chat = http.post("/tokenize", json={"messages": messages}).json()
        assert chat["tokens"] == tok.encode(tok.apply_chat_template(messages), add_special_tokens=False)
        assert http.post("/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": "Hello world"}
        assert http.post("/detokenize", json={"tokens": [-1]}).status_code == 400
        assert http.post("/tokenize", json={"prompt": "x", "messages": messages}).status_code == 400
        assert http.post("/tokenize", json={"model": "nope", "prompt": "x"}).status_code == 404


def test_metrics(tiny_server):
    client = tiny_server.client()
    prompt = "count: " + " ".join(map(str, range(40)))  # several full KV blocks
    client.completions.create(model=TINY, prompt=prompt, max_tokens=6, extra_body={"ignore_eos": True})
    client.completions.create(model=TINY, prompt=prompt, max_tokens=6, n=2, extra_body={"ignore_eos": True})
    with tiny_server.http() as http:
        resp = http.get("/metrics")
    assert resp.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(resp.text)}
    values = {s.name + str(sorted(s.labels.items())): s.value for f in families.values() for s in f.samples}
    expected = {
        "loom_request_finished": "counter",
        "loom_time_to_first_token_seconds": "histogram",
        "loom_inter_token_latency_seconds": "histogram",
        "loom_e2e_request_latency_seconds": "histogram",
        "loom_request_queue_time_seconds": "histogram",
        "loom_time_to_first_token_split_seconds": "histogram",
        "loom_step_phase_seconds": "histogram",
        "loom_kv_cache_capacity_tokens": "gauge",
        "loom_num_requests_running": "gauge",
        "loom_num_requests_waiting": "gauge",
        "loom_kv_cache_blocks_used": "gauge",
        "loom_kv_cache_blocks_free": "gauge",
        "loom_kv_cache_usage_ratio": "gauge",
        "loom_prefix_cache_hit_rate": "gauge",
        "loom_num_preemptions": "counter",
        "loom_prompt_tokens": "counter",
        "loom_generation_tokens": "counter",
        "loom_prefix_cache_hit_tokens": "counter",
        "loom_engine_steps": "counter",
    }
    assert {name: families[name].type for name in expected if name in families} == expected
    assert values["loom_request_finished_total[('finish_reason', 'length')]"] >= 3
    assert values["loom_time_to_first_token_seconds_count[]"] >= 2
    assert values["loom_inter_token_latency_seconds_count[]"] >= 10  # 5 gaps per request at least
    assert values["loom_e2e_request_latency_seconds_count[]"] >= 2
    assert values["loom_generation_tokens_total[]"] >= 18
    assert values["loom_prefix_cache_hit_tokens_total[]"] > 0  # the second prompt's blocks were cached
    assert values["loom_kv_cache_blocks_used[]"] + values["loom_kv_cache_blocks_free[]"] == 512
    assert values["loom_kv_cache_capacity_tokens[]"] == 512 * 16
    steps = values["loom_engine_steps_total[]"]
    for phase in ("schedule", "execute", "update"):
        assert values[f"loom_step_phase_seconds_count[('phase', '{phase}')]"] == steps
    assert values["loom_step_phase_seconds_sum[('phase', 'execute')]"] > 0
    ttft_count = values["loom_time_to_first_token_seconds_count[]"]
    parts = {p: values[f"loom_time_to_first_token_split_seconds_sum[('part', '{p}')]"] for p in ("queue", "prefill", "first_token")}
    for p in parts:
        assert values[f"loom_time_to_first_token_split_seconds_count[('part', '{p}')]"] == ttft_count
    # The three parts add up to the time to first token.
    assert abs(sum(parts.values()) - values["loom_time_to_first_token_seconds_sum[]"]) < 1e-6 * ttft_count + 1e-9
    assert parts["prefill"] > 0
    assert values["loom_num_requests_running[]"] == 0 and values["loom_num_requests_waiting[]"] == 0
