"""Multi-tenant workloads, Jain's index over max-min fair shares, per-group reports, and the
policies comparison table."""

from __future__ import annotations

import json

import pytest

from loom.bench import fairness, report
from loom.bench.client import ClientConfig, RequestRecord, request_body
from loom.bench.metrics import SLO
from loom.bench.policies import comparison_rows, parse_policy_configs
from loom.bench.prompts import PreparedRequest
from loom.bench.tenants import generate, load_spec


def rec(i, tenant, chunks, prompt=10, out=None, priority=0, scheduled=0.0, max_tokens=None):
    out = len(chunks) if out is None else out
    return RequestRecord(index=i, scheduled=scheduled, sent=scheduled, finished=(chunks or [scheduled])[-1],
                         chunk_times=tuple(chunks), prompt_len=prompt, max_tokens=max_tokens or out,
                         prompt_tokens=prompt, output_tokens=out, usage_reported=True, finish_reason="length",
                         error=None, tenant=tenant, priority=priority)


def test_jain_index_and_max_min_shares():
    assert fairness.jain_index([1, 1, 1, 1]) == 1.0
    assert fairness.jain_index([4, 0, 0, 0]) == pytest.approx(0.25)
    assert fairness.jain_index([]) != fairness.jain_index([])  # NaN
    assert fairness.max_min_shares({"a": 100, "b": 10, "c": 10}, 60) == {"a": 40, "b": 10, "c": 10}
    assert fairness.max_min_shares({"a": 100, "b": 100}, 60) == {"a": 30, "b": 30}
    assert fairness.max_min_shares({"a": 5, "b": 5}, 60) == {"a": 5, "b": 5}


def test_tenant_fairness_normalises_by_the_fair_share_over_the_arrival_window():
    # a asks for 4 requests, b for 1; by t=10 (the last arrival) a got 3 served, b 1.
    records = [rec(i, "a", [1.0 + i, 2.0 + i], scheduled=0.0) for i in range(3)]
    records.append(rec(3, "a", [11.0, 12.0], scheduled=10.0))
    records.append(rec(4, "b", [3.0, 4.0], scheduled=0.0))
    f = fairness.tenant_fairness(records)
    per = 10 + 2 * 2  # prompt + 2 x output tokens
    assert f["window_s"] == 10.0
    assert f["tenants"]["a"]["service"] == 3 * per and f["tenants"]["b"]["service"] == per
    assert f["tenants"]["b"]["fair_share"] == per and f["tenants"]["a"]["fair_share"] == 3 * per
    assert f["jain_index"] == pytest.approx(1.0)
    assert fairness.tenant_fairness([rec(0, "a", [1.0])]) is None  # one tenant: nothing to compare


def test_group_summaries_and_report_rows():
    records = [rec(0, "a", [1.0, 2.0], priority=0), rec(1, "b", [5.0, 9.0], priority=2, scheduled=1.0)]
    s = fairness.summarize_groups(records, SLO(ttft=2.0), duration=10.0)
    assert set(s) == {"tenants", "fairness", "priorities"}
    assert s["tenants"]["a"]["slo_met"] == 1 and s["tenants"]["b"]["slo_met"] == 0
    assert s["priorities"]["2"]["ttft"]["p50"] == pytest.approx(4.0)
    rows = report.group_rows(s["tenants"], s["fairness"])
    assert rows[0][0] == "a" and rows[0][4] == "1000.00" and len(rows[0]) == 9
    assert fairness.summarize_groups([rec(0, None, [1.0])], SLO(), 1.0) == {}


def test_tenant_workload_spec_and_generation(tmp_path):
    spec = load_spec(json.dumps({"duration": 20, "block_tokens": 16, "tenants": [
        {"name": "heavy", "rate": 5, "input_len": 64, "output_len": 8, "prefix": "sys", "prefix_len": 32},
        {"name": "light", "count": 2, "rate": 0.5, "input_len": 64, "output_len": 8, "prefix": "sys", "prefix_len": 32,
         "priority": 1}]}))
    w = generate(spec, seed=1)
    tenants = {r.tenant for r in w}
    assert tenants == {"heavy", "light-1", "light-2"}
    heavy = sum(r.tenant == "heavy" for r in w)
    assert 60 < heavy < 140 and sum(r.tenant == "light-1" for r in w) < heavy / 3
    assert [r.arrival for r in w] == sorted(r.arrival for r in w) and w[-1].arrival < 20
    prefixes = {r.hash_ids[:2] for r in w}
    assert len(prefixes) == 1  # every prompt starts with the same two 16-token blocks
    assert len({r.hash_ids[2:] for r in w}) == len(w)  # and goes on with its own
    assert all(r.priority == (r.tenant != "heavy") for r in w)
    path = tmp_path / "w.json"
    path.write_text(json.dumps({"duration": 1, "tenants": [{"name": "x", "rate": 50, "input_len": 4, "output_len": 2}]}))
    assert generate(load_spec(str(path)))[0].tenant == "x"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ('{"duration": 5}', "needs a 'tenants' list"),
        ('{"duration": 0, "tenants": [{"name": "a", "rate": 1, "input_len": 4, "output_len": 1}]}', "duration"),
        ('{"duration": 5, "tenants": [{"name": "a", "rate": 1, "input_len": 4}]}', "output_len"),
        ('{"duration": 5, "tenants": [{"name": "a", "rate": 1, "input_len": 4, "output_len": 1, "x": 1}]}',
         "unknown field 'x'"),
        ('{"duration": 5, "tenants": [{"name": "a", "rate": 1, "input_len": 4, "output_len": 1, "prefix_len": 2}]}',
         "needs a prefix name"),
        ('{"duration": 5, "tenants": [{"name": "a", "rate": 1, "input_len": 4, "output_len": 1, "prefix": "p", '
         '"prefix_len": 4}]}', "below every drawn input_len"),
        ('{"duration": 5, "tenants": [{"name": "a", "rate": 1, "input_len": 4, "output_len": 1}, '
         '{"name": "a", "rate": 1, "input_len": 4, "output_len": 1}]}', "unique"),
        ('{"duration": 1e6, "tenants": [{"name": "a", "rate": 1, "input_len": 4, "output_len": 1}]}', "at most"),
        ("/nope.json", "no such file"),
    ],
)
def test_bad_tenant_workloads_are_named(spec, message):
    with pytest.raises(ValueError, match=message):
        load_spec(spec)


def test_request_body_carries_tenant_and_priority():
    req = PreparedRequest(index=0, arrival=0.0, prompt="hi", prompt_len=1, max_tokens=2, tenant="t1", priority=-1)
    body = request_body(ClientConfig("http://x", "m"), req)
    assert body["user"] == "t1" and body["priority"] == -1
    plain = request_body(ClientConfig("http://x", "m"), PreparedRequest(0, 0.0, "hi", 1, 2))
    assert "user" not in plain and "priority" not in plain


def test_policies_comparison_and_config_parsing():
    base = {"output_token_throughput": 100.0, "goodput": 1.0, "failed": 0, "ttft": {"p50": 0.1, "p99": 0.5},
            "server": {"prefix_cache_hit_rate": 0.5, "preemptions": 2}}
    fair = {**base, "output_token_throughput": 95.0, "fairness": {"jain_index": 0.98},
            "priorities": {"0": {"ttft": {"p99": 0.2}}, "1": {"ttft": {"p99": 3.0}}}}
    header, rows = comparison_rows([("fcfs", base), ("vtc", fair)])
    assert header[7:9] == ["prio 0 TTFT p99 (ms)", "prio 1 TTFT p99 (ms)"]
    assert rows[1][:5] == ["vtc", "95.0", "0.95x", "0.980", "50.0%"] and rows[0][3] == "-"
    assert parse_policy_configs(["dlpm={\"quantum\": 5}"]) == {"dlpm": '{"quantum": 5}'}
    with pytest.raises(ValueError, match="NAME=FILE"):
        parse_policy_configs(["dlpm"])


def test_session_workload_spec_and_build():
    from loom.bench import sessions

    spec = sessions.load_spec('{"sessions": 3, "rate": 2, "turns": 2, "first_input_len": 12, "turn_input_len": 4, '
                              '"output_len": 3, "think_time": 0.5, "think": "fixed"}')

    class Words:  # a whitespace tokenizer
        name = "words"

        def encode(self, text):
            return [hash(w) % 1000 for w in text.split()]

        def decode(self, ids):
            return " ".join(f"w{i}" for i in ids)

    from loom.bench.prompts import PromptBuilder

    w = sessions.build(spec, PromptBuilder(Words(), " ".join(f"x{i}" for i in range(500))))
    assert len(w) == 6 and w.starts[0] == 0.0 and len(w.starts) == 3 and w.background == ()
    assert [len(t[0].split()) for t in w.texts] == [12, 12, 12] and all(len(t[1].split()) == 4 for t in w.texts)
    assert w.thinks == ((0.5,), (0.5,), (0.5,)) and w.count_tokens("a b") == 2
    assert [r.session_id for r in w.first_turns()] == [None, None, None]
    with pytest.raises(ValueError, match="turns must be >= 1"):
        sessions.load_spec('{"sessions": 1, "rate": 1, "turns": 0, "first_input_len": 1, "turn_input_len": 1, '
                           '"output_len": 1, "think_time": 0}')
