import argparse
import sys
from pathlib import Path

import pytest
from bench_fake_server import free_port

from loom.bench.cli import register
from loom.bench.peers import (
    PeerSettings,
    Server,
    ServerCommand,
    llama_cpp_command,
    loom_command,
    transformers_command,
    vllm_command,
)
from loom.bench.prepare import shaping, workload_spec

HERE = Path(__file__).parent


def test_llama_cpp_settings():
    s = PeerSettings(threads=2, slots=4, context=1024)
    cmd = llama_cpp_command("/b/llama-server", Path("/m.gguf"), 9000, s, ["--no-repack"])
    argv = cmd.argv
    assert argv[0] == "/b/llama-server"
    assert argv[argv.index("-t") + 1] == "2" and argv[argv.index("-np") + 1] == "4"
    assert argv[argv.index("-c") + 1] == "4096"  # slots x context
    assert "-cb" in argv and argv[argv.index("--port") + 1] == "9000"
    assert argv[-1] == "--no-repack"  # --llama-args come last
    assert cmd.ignore_eos


def test_vllm_settings():
    cmd = vllm_command("/v/bin/python", Path("/hf"), 9001, PeerSettings(threads=2, slots=8, context=2048, kv_cache_gib=3))
    assert cmd.env == {"VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_CPU_KVCACHE_SPACE": "3"}
    assert cmd.argv[:3] == ["/v/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    assert cmd.argv[cmd.argv.index("--max-num-seqs") + 1] == "8"
    assert cmd.argv[cmd.argv.index("--max-model-len") + 1] == "2048"
    assert cmd.argv[cmd.argv.index("--dtype") + 1] == "bfloat16"
    assert cmd.startup_timeout >= 600  # the first start compiles for minutes


def test_transformers_does_not_get_ignore_eos():
    cmd = transformers_command("/t/bin/python", Path("/hf"), 9002, PeerSettings())
    assert cmd.argv[0] == "/t/bin/transformers" and "--continuous-batching" in cmd.argv
    assert not cmd.ignore_eos and cmd.env == {"OMP_NUM_THREADS": "2"}
    assert (cmd.ready_path, cmd.model) == ("/health", "/hf")
    assert cmd.argv[cmd.argv.index("--cb-num-blocks") + 1] == "64"  # 8 slots x 2048 tokens / 256


def test_loom_command_passes_extra_args():
    cmd = loom_command(Path("/m.gguf"), 9003, PeerSettings(threads=1, slots=4, context=512), ["--policy", "fcfs"])
    argv = cmd.argv
    assert argv[1:4] == ["serve", "--model", "/m.gguf"] and argv[-2:] == ["--policy", "fcfs"]
    assert argv[argv.index("--threads") + 1] == "1" and argv[argv.index("--max-num-seqs") + 1] == "4"
    assert argv[argv.index("--max-model-len") + 1] == "512"
    assert "--dtype" not in argv  # loom's own choice (--dtype auto), not the dequantizing peers' dtype


def test_settings_validation():
    with pytest.raises(ValueError, match="slots"):
        PeerSettings(slots=0)


def test_server_lifecycle(tmp_path):
    port = free_port()
    cmd = ServerCommand("fake", [sys.executable, str(HERE / "bench_fake_server.py"), str(port)], startup_timeout=30)
    server = Server(cmd, tmp_path / "fake.log")
    try:
        server.wait_ready(f"http://127.0.0.1:{port}")
        assert server.proc.poll() is None
    finally:
        server.stop()
    assert server.proc.poll() is not None
    assert (tmp_path / "fake.log").read_text().startswith("$ ")


def test_server_that_dies_is_reported(tmp_path):
    cmd = ServerCommand("dies", [sys.executable, "-c", "raise SystemExit(3)"], startup_timeout=30)
    server = Server(cmd, tmp_path / "dies.log")
    with pytest.raises(ValueError, match="exited with code 3"):
        server.wait_ready(f"http://127.0.0.1:{free_port()}")
    server.stop()


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    return parser.parse_args(list(argv))


def test_cli_rate_means_generation_rate_for_synthetic_and_rescale_for_traces():
    syn = parse("serve", "--base-url", "http://x", "--rate", "3", "--num-requests", "7")
    spec = workload_spec(syn)
    assert (spec.kind, spec.rate, spec.num_requests) == ("synthetic", 3.0, 7)
    assert shaping(syn, spec).rate is None and shaping(syn, spec).num_requests is None
    tr = parse("serve", "--base-url", "http://x", "--workload", "azure:/a.csv", "--rate", "3", "--num-requests", "7")
    spec = workload_spec(tr)
    assert shaping(tr, spec).rate == 3.0 and shaping(tr, spec).num_requests == 7
    assert spec.rate == float("inf")


def test_cli_trace_lengths_need_a_trace(tmp_path):
    args = parse("serve", "--base-url", "http://x", "--length-dist", "trace")
    with pytest.raises(ValueError, match="--length-trace"):
        workload_spec(args)
    p = tmp_path / "b.csv"
    p.write_text("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n1,ChatGPT,5,6,11,API log\n")
    args = parse("serve", "--base-url", "http://x", "--length-dist", "trace", "--length-trace", f"burstgpt:{p}")
    assert workload_spec(args).lengths.pairs == ((5, 6),)


def test_peers_parser_has_workload_and_peer_options():
    args = parse("peers", "--peers", "llama.cpp,vllm", "--slots", "4", "--workload", "sharegpt", "--rate", "1")
    assert (args.peers, args.slots, args.workload, args.rate) == ("llama.cpp,vllm", 4, "sharegpt", 1.0)


def test_peers_does_not_import_the_bench_cli():
    """peers and the bench CLI share their run setup through loom.bench.prepare, not each other
    (the CLI imports peers for its options, so the other way round would be a cycle)."""
    import inspect

    import loom.bench.peers as peers_module

    assert "loom.bench.cli" not in inspect.getsource(peers_module)


def test_concurrency_sweep_restarts_each_peer_per_level(tmp_path, monkeypatch):
    """--concurrency 1,3: per level, each peer is started with that many slots and gets that many
    requests at once; the summary table has one row per peer and one column per level."""
    from loom.bench import peers

    started: list[tuple[str, int]] = []

    def fake_command(name, gguf, port, settings, extra):
        assert extra == {"loom": [], "llama.cpp": ["--no-repack"]}
        started.append((name, settings.slots))
        return ServerCommand(name, [sys.executable, str(HERE / "bench_fake_server.py"), str(port)], startup_timeout=30)

    monkeypatch.setattr(peers, "build_command", fake_command)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    port = free_port()
    args = parse("peers", "--peers", "loom,llama.cpp", "--gguf", str(gguf), "--port", str(port), "--concurrency", "1,3",
                 "--llama-args=--no-repack", "--input-len", "4", "--output-len", "3", "--no-plots", "--no-progress", "--warmup", "0",
                 "--out-dir", str(tmp_path / "out"))
    assert peers.main(args) == 0
    assert started == [("loom", 1), ("llama.cpp", 1), ("loom", 3), ("llama.cpp", 3)]
    table = (tmp_path / "out" / "comparison.txt").read_text()
    assert "1 concurrent" in table and "3 concurrent" in table and "x)" in table
    assert (tmp_path / "out" / "c3" / "llama.cpp.json").is_file()


def test_concurrency_levels_are_checked():
    from loom.bench.peers import parse_levels

    assert parse_levels("1,16,64") == [1, 16, 64]
    for bad in ("", "0,4", "a,b"):
        with pytest.raises(ValueError, match="--concurrency"):
            parse_levels(bad)
