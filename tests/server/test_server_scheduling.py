"""Tenants and priorities through the server: ``user`` or ``X-Tenant`` picks the tenant, an unknown
tenant or an oversized one is a 400, and /metrics counts per tenant."""

from __future__ import annotations

import pytest
from live_server import TINY, TINY_ENGINE, start_server
from prometheus_client.parser import text_string_to_metric_families

from loom.server import ServerConfig


@pytest.fixture(scope="module")
def vtc_server(tiny_path):
    srv = start_server(tiny_path, ServerConfig(served_model_names=(TINY,)), **TINY_ENGINE, policy="vtc",
                       tenant_weights='{"alice": 1, "bob": 2}')
    yield srv
    srv.stop()


def _tenant_counters(http) -> dict[tuple[str, str], float]:
    text = http.get("/metrics").text
    return {(s.name, s.labels["tenant"]): s.value for f in text_string_to_metric_families(text)
            for s in f.samples if "tenant" in s.labels}


def test_tenants_from_user_and_header_are_served_and_counted(vtc_server):
    body = {"model": TINY, "prompt": "one two three", "max_tokens": 3, "ignore_eos": True}
    with vtc_server.http() as http:
        assert http.post("/v1/completions", json={**body, "user": "alice"}).status_code == 200
        # The gateway's header wins over the body's user.
        r = http.post("/v1/completions", json={**body, "user": "mallory"}, headers={"X-Tenant": "bob"})
        assert r.status_code == 200
        chat = {"model": TINY, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "user": "bob"}
        assert http.post("/v1/chat/completions", json=chat).status_code == 200
        vtc_server.wait_idle()
        counters = _tenant_counters(http)
    assert counters[("loom_tenant_requests_total", "alice")] == 1
    assert counters[("loom_tenant_requests_total", "bob")] == 2
    assert counters[("loom_tenant_generation_tokens_total", "alice")] == 3
    assert counters[("loom_tenant_generation_tokens_total", "bob")] == 5
    assert counters[("loom_tenant_prompt_tokens_total", "bob")] > 3
    assert ("loom_tenant_queue_seconds_total", "alice") in counters


def test_unknown_and_oversized_tenants_are_refused(vtc_server):
    body = {"model": TINY, "prompt": "x", "max_tokens": 1}
    with vtc_server.http() as http:
        r = http.post("/v1/completions", json={**body, "user": "mallory"})
        assert r.status_code == 400 and "unknown tenant 'mallory'" in r.json()["error"]["message"]
        r = http.post("/v1/completions", json=body)  # no tenant, and the weights have no "*"
        assert r.status_code == 400 and "unknown tenant ''" in r.json()["error"]["message"]
        r = http.post("/v1/completions", json={**body, "user": "a" * 300})
        assert r.status_code == 400 and "at most 256" in r.json()["error"]["message"]
        r = http.post("/v1/completions", json=body, headers={"X-Tenant": "b" * 300})
        assert r.status_code == 400 and r.json()["error"]["param"] == "X-Tenant"
        vtc_server.wait_idle()
    assert vtc_server.engine.stats().num_free_blocks == vtc_server.engine.stats().num_blocks


def test_slo_classes_through_the_server(tiny_path):
    srv = start_server(tiny_path, ServerConfig(served_model_names=(TINY,)), **TINY_ENGINE, policy="slo",
                       policy_config='{"classes": {"interactive": {"ttft": 30}, "batch": {}}}')
    try:
        body = {"model": TINY, "prompt": "one two", "max_tokens": 2, "ignore_eos": True}
        with srv.http() as http:
            assert http.post("/v1/completions", json={**body, "slo_class": "batch"}).status_code == 200
            assert http.post("/v1/completions", json=body).status_code == 200  # the default class
            r = http.post("/v1/completions", json={**body, "slo_class": "gold"})
            assert r.status_code == 400 and "unknown SLO class 'gold'" in r.json()["error"]["message"]
            srv.wait_idle()
            text = http.get("/metrics").text
        samples = {(s.name, s.labels.get("slo_class")): s.value for f in text_string_to_metric_families(text)
                   for s in f.samples}
        assert samples[("loom_slo_requests_total", "batch")] == 1
        assert samples[("loom_slo_met_total", "interactive")] == 1
    finally:
        srv.stop()


def test_a_preempted_request_says_so_in_its_usage(tiny_path):
    import asyncio

    engine = {**TINY_ENGINE, "num_blocks": 10, "max_num_seqs": 8, "max_num_batched_tokens": 64}
    srv = start_server(tiny_path, ServerConfig(served_model_names=(TINY,)), **engine)
    try:
        async def one(i):
            r = await srv.async_client().completions.create(model=TINY, prompt=f"{i} " + "word " * 30, max_tokens=40,
                                                            extra_body={"ignore_eos": True})
            return r.usage.model_dump()

        async def all_of():
            return await asyncio.gather(*(one(i) for i in range(6)))

        usages = asyncio.run(all_of())
        srv.wait_idle()
        stats = srv.engine.stats()
    finally:
        srv.stop()
    preempted = [u["num_preemptions"] for u in usages if "num_preemptions" in u]
    assert stats.num_preemptions > 0 and sum(preempted) == stats.num_preemptions
    assert all(u["completion_tokens"] == 40 for u in usages)
