"""`loom bench serve` replaying a short workload against a real `loom serve` app on loopback:
the report's counts add up and every request's timings are consistent."""

from __future__ import annotations

import json

from loom.cli import main
from loom.server import ServerConfig
from tests.server.live_server import TINY, TINY_ENGINE, start_server


def test_replay_against_real_loom_server(tiny_model, tmp_path):
    server = start_server(tiny_model("llama"), ServerConfig(served_model_names=(TINY,)), **TINY_ENGINE)
    try:
        out = tmp_path / "run.json"
        rc = main(["bench", "serve", "--base-url", server.base_url, "--workload", "synthetic", "--arrival", "poisson",
                   "--rate", "20", "--num-requests", "12", "--input-len", "24", "--output-len", "9", "--seed", "3",
                   "--slo", "ttft=30s,tpot=10s", "--no-plots", "--no-progress", "-o", str(out)])
        assert rc == 0
        server.wait_idle()
        assert server.engine.stats().num_free_blocks == server.engine.stats().num_blocks
    finally:
        server.stop()
    run = json.loads(out.read_text())
    s, reqs = run["summary"], run["requests"]
    assert s["num_requests"] == s["completed"] == len(reqs) == 12 and s["failed"] == 0
    assert s["total_output_tokens"] == sum(r["output_tokens"] for r in reqs) == 12 * 9
    assert s["total_input_tokens"] == sum(r["prompt_tokens"] for r in reqs)
    # Prompts are cut to 24 tokens with the server's /tokenize; a window whose text re-tokenizes
    # differently at its edge is recorded with its true length and counted as a mismatch.
    off = [r for r in reqs if r["prompt_len"] != 24]
    assert run["config"]["prompts"]["length_mismatches"] == len(off) <= 2
    for r in reqs:
        assert r["ok"] and r["usage_reported"] and r["finish_reason"] == "length"
        assert r["prompt_tokens"] == r["prompt_len"] and abs(r["prompt_len"] - 24) <= 1
        assert r["output_tokens"] == r["max_tokens"] == 9
        assert 0 <= r["scheduled"] <= r["sent"] <= r["finished"]
        assert 0 < r["ttft"] <= r["e2e"]
        times = r["chunk_times"]  # on the run's clock, like sent/finished
        assert times == sorted(times) and r["sent"] <= times[0] and times[-1] <= r["finished"]
        assert abs(r["e2e"] - (r["finished"] - r["sent"])) < 1e-3
        assert abs(r["tpot"] - (r["e2e"] - r["ttft"]) / (r["output_tokens"] - 1)) < 1e-6
    assert s["slo_attainment"] == 1.0 and abs(s["goodput"] - s["request_throughput"]) < 1e-9
    # The server's own /metrics, scraped during the run (every 0.25 s: this run is too short for the
    # peaks to be certain to catch a request in flight, but loom's names must be found).
    server_side = s["server"]
    assert server_side["scrapes"] >= 2 and 0 <= server_side["peak_running"] <= 12
    assert 0 <= server_side["peak_kv_usage"] <= 1 and server_side["preemptions"] == 0


def test_sessions_replay_sends_whole_conversations_that_hit_their_pins(tiny_model, tmp_path):
    server = start_server(tiny_model("llama"), ServerConfig(served_model_names=(TINY,)), **TINY_ENGINE)
    try:
        out = tmp_path / "sessions.json"
        spec = ('sessions:{"sessions": 3, "rate": 20, "turns": 3, "first_input_len": 40, "turn_input_len": 6, '
                '"output_len": 5, "think_time": 0.05, "think": "fixed", "background_rate": 3, "background_input_len": 20, '
                '"background_output_len": 3}')
        corpus = tmp_path / "corpus.txt"  # its own text: the replay needs nothing from ../shared
        corpus.write_text(" ".join(f"word{i % 97} and line {i}." for i in range(3000)))
        rc = main(["bench", "serve", "--base-url", server.base_url, "--workload", spec, "--corpus", str(corpus),
                   "--no-plots", "--no-progress", "-o", str(out)])
        assert rc == 0
        server.wait_idle()
        stats = server.engine.stats()
    finally:
        server.stop()
    run = json.loads(out.read_text())
    reqs = run["requests"]
    one_off = [r for r in reqs if r["session_id"] is None]
    assert len(reqs) == 9 + len(one_off) and one_off and all(r["ok"] for r in reqs)
    assert run["summary"]["turns"]["one-off"]["requests"] == len(one_off)
    by_session = {}
    for r in reqs:
        if r["session_id"] is None:
            continue
        by_session.setdefault(r["session_id"], []).append(r)
    assert sorted(by_session) == ["session-0", "session-1", "session-2"]
    for turns in by_session.values():
        assert [t["turn"] for t in turns] == [0, 1, 2]
        # each turn's prompt holds the previous prompt, its answer and new text
        assert turns[0]["prompt_tokens"] < turns[1]["prompt_tokens"] < turns[2]["prompt_tokens"]
        assert turns[1]["sent"] >= turns[0]["finished"] + 0.05
    assert run["summary"]["turns"]["follow-up"]["requests"] == 6
    assert stats.session_followups == 6 and stats.pinned_hits == 6
