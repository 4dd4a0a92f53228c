"""End to end: `loom bench serve` against a real HTTP server on loopback whose
timing and token counts are known (see bench_fake_server.py)."""

import json

import pytest
from bench_fake_server import FakeConfig, FakeServer

from loom.bench.cli import main
from loom.bench.results import load

# The fake server's sleeps run on uvicorn's event loop, whose timers count whole milliseconds from a
# loop time cached at the start of each iteration, so a sleep can end up to about 1 ms early by the
# client's clock (CI saw a 50 ms first token arrive after 49.8 ms).
TIMER_SLACK = 0.002


def serve(url: str, out, *extra: str) -> int:
    return main(["serve", "--base-url", url + "/v1", "--output", str(out), "--no-progress", *extra])


def check_consistent(run, ttft_floor: float) -> None:
    for r in run.requests:
        assert r.ok, r.error
        assert r.scheduled - 1e-3 <= r.sent <= r.chunk_times[0] <= r.chunk_times[-1] <= r.finished
        assert ttft_floor - TIMER_SLACK <= r.ttft <= r.e2e
        assert list(r.chunk_times) == sorted(r.chunk_times)
        assert r.output_tokens == r.max_tokens == len(r.chunk_times)
        assert r.prompt_tokens == r.prompt_len


def test_serve_synthetic(tmp_path, capsys):
    cfg = FakeConfig(ttft=0.05, itl=0.01)
    out = tmp_path / "run.json"
    with FakeServer(cfg) as srv:
        rc = serve(srv.base_url, out, "--num-requests", "12", "--rate", "30", "--input-len", "20", "--output-len", "8",
                   "--slo", "ttft=2s,tpot=500ms", "--label", "fake")  # fmt: skip
    assert rc == 0
    run = load(out)
    s = run.summary
    assert (s["num_requests"], s["completed"], s["failed"]) == (12, 12, 0)
    assert s["total_output_tokens"] == 96 and s["total_input_tokens"] == 240
    assert s["goodput"] == pytest.approx(12 / s["duration_s"]) and s["slo_met"] == 12
    assert s["ttft"]["min"] >= 0.05 - TIMER_SLACK and s["itl"]["p50"] >= 0.009
    check_consistent(run, ttft_floor=0.05)
    assert run.config["label"] == "fake" and run.config["workload"]["rate"] == 30
    assert run.config["prompts"]["tokenizer"].startswith("server:")
    bodies = cfg.received
    assert len(bodies) == 13  # one warm-up request, then the run
    assert all(b["ignore_eos"] is True and b["stream_options"] == {"include_usage": True} for b in bodies)
    assert (tmp_path / "run-plots" / "latency_cdf.png").stat().st_size > 0
    assert (tmp_path / "run-plots" / "timeline.png").stat().st_size > 0
    assert "Goodput (req/s)" in capsys.readouterr().out


def test_open_loop_does_not_wait_for_responses(tmp_path):
    out = tmp_path / "run.json"
    with FakeServer(FakeConfig(ttft=0.4, itl=0.01)) as srv:
        assert (
            serve(srv.base_url, out, "--num-requests", "8", "--rate", "20", "--output-len", "2", "--warmup", "0", "--no-plots")
            == 0
        )
    run = load(out)
    # arrivals are ~50 ms apart and each response takes >= 400 ms: sends must not queue behind responses
    assert max(r.sent - r.scheduled for r in run.requests) < 0.1
    assert run.summary["peak_in_flight"] >= 4
    check_consistent(run, ttft_floor=0.4)


def test_chat_with_max_concurrency(tmp_path):
    out = tmp_path / "run.json"
    with FakeServer(FakeConfig(ttft=0.05, itl=0.005)) as srv:
        assert serve(srv.base_url, out, "--endpoint", "chat", "--num-requests", "6", "--output-len", "4",
                     "--max-concurrency", "2", "--warmup", "0", "--no-plots") == 0  # fmt: skip
    run = load(out)
    assert run.summary["completed"] == 6 and run.summary["peak_in_flight"] <= 2
    # the role-only first chunk carries no text and does not count as the first token
    for r in run.requests:
        assert r.ttft >= 0.05 - TIMER_SLACK and r.output_tokens == 4


def test_rejected_field_fails_every_request_then_opt_out_works(tmp_path):
    cfg = FakeConfig(reject_fields=frozenset({"ignore_eos"}))
    with FakeServer(cfg) as srv:
        rc = serve(srv.base_url, tmp_path / "bad.json", "--num-requests", "3", "--output-len", "2", "--warmup", "0", "--no-plots")
        assert rc == 1
        bad = load(tmp_path / "bad.json")
        assert (bad.summary["completed"], bad.summary["failed"], bad.summary["goodput"]) == (0, 3, 0.0)
        assert all(r.error.startswith("HTTP 400") for r in bad.requests)
        ok = serve(
            srv.base_url, tmp_path / "ok.json", "--num-requests", "3", "--output-len", "2", "--no-ignore-eos", "--no-plots"
        )
        assert ok == 0 and load(tmp_path / "ok.json").summary["completed"] == 3


def test_without_usage_counts_chunks(tmp_path):
    with FakeServer(FakeConfig(send_usage=False)) as srv:
        assert serve(srv.base_url, tmp_path / "r.json", "--num-requests", "2", "--output-len", "5", "--no-plots") == 0
    for r in load(tmp_path / "r.json").requests:
        assert (r.usage_reported, r.output_tokens, r.prompt_tokens) == (False, 5, None)


def test_mooncake_replay_follows_scaled_trace(tmp_path):
    trace = tmp_path / "m.jsonl"
    rows = [
        {"timestamp": 0, "input_length": 900, "output_length": 40, "hash_ids": [0, 1]},
        {"timestamp": 1000, "input_length": 1000, "output_length": 20, "hash_ids": [0, 1]},
        {"timestamp": 3000, "input_length": 400, "output_length": 60, "hash_ids": [2]},
    ]
    trace.write_text("\n".join(json.dumps(r) for r in rows))
    with FakeServer(FakeConfig(ttft=0.01, itl=0.001)) as srv:
        assert serve(srv.base_url, tmp_path / "r.json", "--workload", f"mooncake:{trace}", "--time-scale", "0.1",
                     "--length-scale", "0.05", "--max-output-len", "2", "--warmup", "0", "--no-plots") == 0  # fmt: skip
    run = load(tmp_path / "r.json")
    assert [r.scheduled for r in run.requests] == pytest.approx([0.0, 0.1, 0.3])
    assert [r.prompt_tokens for r in run.requests] == [45, 50, 20]  # 5% of the trace lengths
    assert [r.output_tokens for r in run.requests] == [2, 1, 2]  # 40*.05, 20*.05, 60*.05 capped at 2
    assert run.config["workload"]["shaping"]["time_scale"] == 0.1


def test_compare_two_runs(tmp_path, capsys):
    with FakeServer(FakeConfig(ttft=0.02, itl=0.002)) as fast, FakeServer(FakeConfig(ttft=0.2, itl=0.002)) as slow:
        serve(fast.base_url, tmp_path / "fast.json", "--num-requests", "3", "--output-len", "3", "--label", "fast", "--no-plots")
        serve(slow.base_url, tmp_path / "slow.json", "--num-requests", "3", "--output-len", "3", "--label", "slow", "--no-plots")
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "fast.json"), str(tmp_path / "slow.json"), "--plot", str(tmp_path / "cdf.png")]) == 0
    out = capsys.readouterr().out
    assert "slow / fast" in out
    ttft_row = next(line for line in out.splitlines() if "TTFT p50" in line)
    assert ttft_row.split()[-1].endswith("x")  # plain text when not on a terminal: the ratio is last
    ratio = float(ttft_row.split()[-1].rstrip("x"))
    assert ratio > 3  # 200 ms vs ~20 ms first token
    assert (tmp_path / "cdf.png").stat().st_size > 0


def test_cli_errors_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", "--base-url", "http://127.0.0.1:9", "--slo", "ttft=2"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["compare", str(tmp_path / "missing.json")])
    assert e.value.code == 2
    assert "cannot read a run file" in capsys.readouterr().err
