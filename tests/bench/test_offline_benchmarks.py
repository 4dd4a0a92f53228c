"""`loom bench throughput` and `loom bench latency` run end to end on a tiny model and report
consistent numbers (the numbers themselves are measured by hand, never asserted)."""

from __future__ import annotations

import json

from loom.cli import main


def test_throughput_reports_all_tokens(tiny_model, tmp_path):
    out = tmp_path / "t.json"
    rc = main(["bench", "throughput", "--model", str(tiny_model("llama")), "--dtype", "float32", "--num-prompts", "5",
               "--input-len", "12", "--output-len", "7", "--no-progress", "--output-json", str(out)])
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["loom"]["num_requests"] == 5
    assert r["loom"]["output_tokens"] == 5 * 7 and r["loom"]["prompt_tokens"] == 5 * 12
    assert r["loom"]["output_tokens_per_s"] > 0 and r["steps"] >= 7
    assert set(r["step_split"]) == {"schedule", "prepare", "forward", "sample", "update"}


def test_latency_reports_every_batch_and_length(tiny_model, tmp_path):
    out = tmp_path / "l.json"
    rc = main(["bench", "latency", "--model", str(tiny_model("llama")), "--dtype", "float32", "--batch-sizes", "1,3",
               "--context", "8", "--decode-steps", "3", "--prompt-lens", "16,40", "--prefill-repeats", "1",
               "--output-json", str(out)])
    assert rc == 0
    r = json.loads(out.read_text())
    assert [d["batch"] for d in r["decode"]] == [1, 3]
    assert [p["tokens"] for p in r["prefill"]] == [16, 40]
    assert all(d["ms_per_step"] > 0 and d["memory_roofline_ms"] > 0 and d["compute_roofline_ms"] > 0 for d in r["decode"])
    assert r["bandwidth_gbs"] > 0 and r["matmul_gflops"] > 0


def test_context_switch_reports_both_ways_per_context(tiny_model, tmp_path):
    out = tmp_path / "c.json"
    rc = main(["bench", "context-switch", "--model", str(tiny_model("llama")), "--dtype", "float32",
               "--contexts", "40,16", "--repeats", "1", "--swap-dtype", "int8", "--output-json", str(out)])
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["swap_dtype"] == "int8" and [row["context"] for row in r["rows"]] == [16, 40]
    for row in r["rows"]:
        assert row["blocks"] == -(-row["context"] // 16) and row["recompute_ms"] > 0 and row["swap_ms"] > 0
        assert row["chosen"] in ("swap", "recompute") and row["predicted_swap_ms"] > 0


def test_spec_bench_reports_every_method_workload_and_concurrency(tiny_model, tmp_path):
    sharegpt = tmp_path / "sharegpt.json"
    texts = ["one two three " * 40, "hello there, how are you today?", "write a poem " * 50]
    sharegpt.write_text(json.dumps([{"conversations": [{"from": "human", "value": t}]} for t in texts]))
    out = tmp_path / "spec.json"
    rc = main(["bench", "spec", "--model", str(tiny_model("llama")), "--dtype", "float32", "--methods", "none,ngram",
               "--workloads", "code,rewrite,chat", "--concurrency", "1,2", "--max-tokens", "8", "--sharegpt",
               str(sharegpt), "--speculative-k", "3", "--code-chars", "600", "--rounds", "2", "--output-json", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())["rows"]
    assert {(r["workload"], r["method"], r["concurrency"], r["requests"]) for r in rows} == {
        (w, m, c, 2 * c) for w in ("code", "rewrite", "chat") for m in ("none", "ngram") for c in (1, 2)}
    for r in rows:
        assert r["output_tokens_per_s"] > 0 and r["same_output"] == 1.0  # fp32: greedy output unchanged
        if r["method"] == "ngram":
            assert r["speedup"] > 0 and r["draft_tokens"] >= 0
    assert main(["bench", "spec", "--methods", "none,draft", "--model", str(tiny_model("llama"))]) == 2  # no --draft-model
    assert main(["bench", "spec", "--methods", "none", "--model", str(tiny_model("llama")), "--rounds", "0"]) == 2
    assert all(r["output_tokens"] == 8 * r["requests"] for r in rows)


def test_spec_bench_spreads_output_lengths(tiny_model, tmp_path):
    """``--max-tokens-range-ratio`` draws each request's length (seeded: every method gets the same)."""
    model = str(tiny_model("llama"))
    out = tmp_path / "spec.json"
    rc = main(["bench", "spec", "--model", model, "--dtype", "float32", "--methods", "none,ngram", "--workloads", "code",
               "--concurrency", "4", "--rounds", "2", "--max-tokens", "8", "--max-tokens-range-ratio", "0.5",
               "--code-chars", "600", "--output-json", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())["rows"]
    assert rows[0]["output_tokens"] == rows[1]["output_tokens"] != 8 * 8
    assert 4 * 8 <= rows[0]["output_tokens"] <= 12 * 8 and rows[1]["same_output"] == 1.0
    assert main(["bench", "spec", "--model", model, "--methods", "none", "--max-tokens-range-ratio", "1"]) == 2


def test_spec_bench_gives_draft_only_options_to_the_draft_method_alone(tiny_model, tmp_path):
    """``--draft-config`` reaches the draft method only: with its quantization in
    ``--speculative-config`` instead, ngram would refuse the option and not start."""
    model = str(tiny_model("llama"))
    out = tmp_path / "spec.json"
    rc = main(["bench", "spec", "--model", model, "--dtype", "float32", "--methods", "ngram,draft", "--draft-model",
               model, "--draft-config", '{"quantization": "q8_0"}', "--workloads", "code", "--concurrency", "1",
               "--max-tokens", "4", "--code-chars", "600", "--output-json", str(out)])
    assert rc == 0
    assert [r["method"] for r in json.loads(out.read_text())["rows"]] == ["ngram", "draft"]
    assert main(["bench", "spec", "--model", model, "--dtype", "float32", "--methods", "ngram", "--workloads", "code",
                 "--concurrency", "1", "--max-tokens", "4", "--speculative-config", '{"quantization": "q8_0"}']) == 2
