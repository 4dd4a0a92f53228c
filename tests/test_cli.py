"""The ``loom`` command line: ``python -m loom``, engine flags built from the config dataclasses, and
bad engine options reported as ``loom: error`` before any model loads."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from loom import cli
from loom.config import GIB, CacheConfig, EngineConfig, SchedulerConfig, engine_options


def parse(*argv: str):
    return cli.build_parser().parse_args(list(argv))


def test_python_dash_m_loom_runs_the_cli() -> None:
    out = subprocess.run([sys.executable, "-m", "loom", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: loom ") and "generate" in out.stdout and "serve" in out.stdout


def test_engine_flags_keep_their_names_and_take_the_dataclass_defaults() -> None:
    parser = argparse.ArgumentParser()
    cli.add_engine_args(parser)
    flags = {s for a in parser._actions for s in a.option_strings}
    assert flags >= {
        "--model", "--dtype", "--device", "--threads", "--max-model-len", "--block-size", "--kv-cache-memory",
        "--num-blocks", "--no-prefix-caching", "--max-num-batched-tokens", "--max-num-seqs", "--policy",
    }  # fmt: skip
    assert "--max-waiting" not in flags  # a server option
    args = parse("generate", "hi")
    options = cli.engine_options(args)
    assert EngineConfig.from_options(args.model, **options) == EngineConfig()
    assert set(options) == {o.name for o in engine_options() if o.flag} - {"model", "max_waiting"}


def test_engine_flags_map_onto_the_config() -> None:
    args = parse(
        "serve", "--model", "m.gguf", "--dtype", "float32", "--device", "cpu", "--threads", "3", "--max-model-len", "99",
        "--block-size", "8", "--kv-cache-memory", "0.5", "--num-blocks", "7", "--no-prefix-caching",
        "--max-num-batched-tokens", "64", "--max-num-seqs", "5", "--policy", "fcfs", "--max-waiting", "4",
    )  # fmt: skip
    assert EngineConfig.from_options(args.model, **cli.engine_options(args)) == EngineConfig(
        model="m.gguf", dtype="float32", device="cpu", num_threads=3, max_model_len=99,
        cache=CacheConfig(block_size=8, kv_cache_bytes=GIB // 2, num_blocks=7, enable_prefix_caching=False),
        scheduler=SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=5, policy="fcfs", max_waiting=4),
    )  # fmt: skip


def test_help_shows_each_default_from_the_config(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse("generate", "--help")
    text = " ".join(capsys.readouterr().out.split())
    for part in ("tokens per KV block (default: 16)", "token budget of one step (default: 512)",
                 "cap on running requests (default: 64)", "(default: measured from free memory)",
                 "--device {auto,cpu,cuda}", "--dtype {auto,bfloat16,float32}", "--policy {fcfs"):  # fmt: skip
        assert part in text, part


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--policy", "lifo"], "loom: error: policy (--policy) must be one of fcfs"),
        (["--policy", "vtc", "--policy-config", '{"aging_seconds": 1}'],
         "loom: error: unknown option 'aging_seconds' for the vtc policy (its options: input_weight, output_weight)"),
        (["--tenant-weights", '{"a": 1}'], "loom: error: tenant weights are used by the vtc and dlpm policies, not fcfs"),
        (["--block-size", "0"], "loom: error: block_size (--block-size) must be >= 1, got 0"),
        (["--dtype", "fp16"], "loom: error: dtype (--dtype) must be one of auto, bfloat16, float32; got 'fp16'"),
        (["--device", "tpu"], "loom: error: device (--device) must be one of auto, cpu, cuda; got 'tpu'"),
        (["--kv-cache-memory", "0"], "loom: error: kv_cache_bytes (--kv-cache-memory) must be > 0"),
        (["--max-num-seqs", "-1"], "loom: error: max_num_seqs (--max-num-seqs) must be >= 1"),
        (["--speculative", "ngram", "--speculative-k", "-1"], "loom: error: speculative_k (--speculative-k) must be auto"),
        (["--speculative", "ngram", "--speculative-config", '{"depth": 3}'],
         "loom: error: unknown option 'depth' for the ngram proposer (its options: min_n, max_n)"),
        (["--speculative", "draft"], "loom: error: --speculative draft needs a draft model (--speculative-model)"),
    ],
)
@pytest.mark.parametrize("command", [["generate", "hi"], ["chat"], ["serve"], ["bench", "latency"]])
def test_bad_engine_options_fail_before_loading(command, argv, message, monkeypatch, capsys) -> None:
    import loom.engine.llm

    def no_loading(*args, **kwargs):
        raise AssertionError("the engine was started despite a bad option")

    monkeypatch.setattr(loom.engine.llm, "Engine", no_loading)
    monkeypatch.setattr(cli, "cmd_serve", no_loading)
    assert cli.main([*command, "--model", "/no/such/model.gguf", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "no such model" not in err


def test_generate_with_an_output_constraint(tiny_model, tmp_path, capsys) -> None:
    model = str(tiny_model("llama"))
    schema = tmp_path / "schema.json"
    schema.write_text('{"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], '
                      '"additionalProperties": false}')
    common = ["--model", model, "--dtype", "float32", "--max-tokens", "30"]
    assert cli.main(["generate", "Hello", *common, "--json-schema", str(schema)]) == 0
    assert capsys.readouterr().out.strip() in ('{"ok": true}', '{"ok": false}')
    assert cli.main(["generate", "Hello", *common, "--choice", "left", "right"]) == 0
    assert capsys.readouterr().out.strip() in ("left", "right")
    assert cli.main(["generate", "Hello", *common, "--regex", "(["]) == 2
    assert "invalid regex constraint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse("generate", "hi", "--regex", "a", "--choice", "b")  # one constraint at a time


def test_generate_with_speculative_decoding(tiny_model, capsys) -> None:
    common = ["generate", "one two three one two three one two", "--model", str(tiny_model("llama")), "--dtype",
              "float32", "--max-tokens", "24"]
    assert cli.main(common) == 0
    plain = capsys.readouterr().out
    for method in ("ngram", "lookahead"):
        assert cli.main([*common, "--speculative", method, "--speculative-k", "4"]) == 0
        assert capsys.readouterr().out == plain


def test_serve_tool_call_parser_option(monkeypatch) -> None:
    from loom.server import ServerConfig

    assert parse("serve").tool_call_parser == ServerConfig.tool_call_parser == "auto"
    assert parse("serve", "--tool-call-parser", "json").tool_call_parser == "json"
    with pytest.raises(SystemExit):
        parse("serve", "--tool-call-parser", "xml")
    with pytest.raises(ValueError, match="tool_call_parser"):
        ServerConfig(tool_call_parser="xml")
    seen = {}
    monkeypatch.setattr("loom.server.serve", lambda engine, config, cluster: seen.setdefault("config", config))
    assert cli.main(["serve", "--tool-call-parser", "none"]) == 0
    assert seen["config"].tool_call_parser == "none"


def test_serve_cluster_options(monkeypatch, capsys) -> None:
    from loom.cluster import ClusterConfig

    seen = {}
    monkeypatch.setattr("loom.server.serve", lambda engine, config, cluster: seen.setdefault("cluster", cluster))
    assert cli.main(["serve"]) == 0 and seen.pop("cluster") is None  # one engine in this process
    assert cli.main(["serve", "--replicas", "2", "--router", "d2lpm", "--router-config", '{"quantum": 64}',
                     "--replica-threads", "1", "--max-restarts", "0"]) == 0
    assert seen.pop("cluster") == ClusterConfig(replicas=2, router="d2lpm", router_config='{"quantum": 64}',
                                                replica_threads=1, max_restarts=0)
    for argv, message in (
        (["--router", "prefix"], "--router applies to replicas on Ray: add --replicas N"),
        (["--replicas", "0"], "replicas (--replicas) must be >= 1"),
        (["--replicas", "2", "--router-config", '{"nope": 1}'], "unknown option 'nope' for the prefix router"),
        (["--replicas", "2", "--max-restarts", "-1"], "max_restarts (--max-restarts) must be >= 0"),
    ):
        assert cli.main(["serve", *argv]) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse("serve", "--replicas", "2", "--router", "random")
