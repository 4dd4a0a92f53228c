"""``loom bench serve|compare|peers``: argument parsing only; the work is in
:mod:`loom.bench.serve` and :mod:`loom.bench.peers`, and the run setup both share (workload, prompts,
client settings from the parsed arguments) in :mod:`loom.bench.prepare`.

Wire into the ``loom bench`` command with ``register(subparsers)``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from loom.bench import metrics, peers, plots, policies, report, results
from loom.bench.loader import KINDS, SHAREGPT_FILE
from loom.bench.prepare import client_config, prepare_requests
from loom.bench.serve import Outputs, normalize_base_url, plots_dir_for, resolve_model, run_benchmark, warm_up
from loom.bench.tokenizer import resolve_tokenizer

log = logging.getLogger(__name__)

EPILOG = """\
workloads (--workload KIND[:PATH]):
  azure:PATH     Azure LLM inference trace CSV (TIMESTAMP,ContextTokens,GeneratedTokens)
  mooncake:PATH  Mooncake JSONL; hash_ids become 512-token (x --length-scale) blocks of shared text
  burstgpt:PATH  BurstGPT CSV; rows with 0 response tokens (failures) are skipped
  sharegpt[:PATH] ShareGPT JSON prompts, arrivals from --arrival/--rate
  synthetic      --arrival poisson|gamma at --rate, lengths from --length-dist
  tenants:SPEC   tenants with their own rates, lengths, priorities and shared system prompts
                 (a JSON file or inline object; examples in benchmarks/workloads/)
  sessions:SPEC  multi-turn conversations, each turn sent after the last answer and a think time,
                 with a session_id (completions endpoint; example in benchmarks/workloads/)
shaping, applied in this order: --start/--duration window, --num-requests,
  --time-scale (x arrival times; >1 is slower), --rate (trace: rescale to this
  mean req/s), --length-scale, --max-input-len/--max-output-len caps.
example:
  loom bench serve --base-url http://127.0.0.1:8000 --workload azure:conv.csv \\
    --duration 120 --time-scale 10 --length-scale 0.25 --slo ttft=2s,tpot=200ms
"""


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
    return v


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 1")
    return v


def _slo(text: str) -> metrics.SLO:
    try:
        return metrics.SLO.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _json_object(text: str) -> dict[str, Any]:
    try:
        v = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return v


def add_workload_args(p: argparse.ArgumentParser) -> None:
    """Workload, shaping, prompt, client and output options shared by serve and peers."""
    add_trace_args(p)
    t = p.add_argument_group("prompts")
    t.add_argument(
        "--corpus",
        help=f"text for prompts: ShareGPT .json or a text file (default {SHAREGPT_FILE.name} if present, else sonnets)",
    )
    t.add_argument("--tokenizer", help="tokenizer.json (or its directory); default: the server's /tokenize")
    c = p.add_argument_group("client")
    c.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    c.add_argument("--max-concurrency", type=_positive_int, help="cap on requests in flight (default: none, pure open loop)")
    c.add_argument("--request-timeout", type=_positive_float, default=600.0, help="seconds per request (default 600)")
    c.add_argument(
        "--no-ignore-eos", dest="ignore_eos", action="store_false", help="do not send ignore_eos (for servers that reject it)"
    )
    c.add_argument("--extra-body", type=_json_object, default={}, help="JSON object merged into every request body")
    c.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="bearer token (default $OPENAI_API_KEY)")
    c.add_argument("--warmup", type=int, default=1, help="short requests sent before the run, not measured (default 1)")
    add_slo_arg(c)
    o = p.add_argument_group("output")
    o.add_argument("--no-plots", dest="plots", action="store_false")
    o.add_argument("--no-progress", dest="progress", action="store_false")


def add_trace_args(p: argparse.ArgumentParser) -> None:
    """The workload and how it is shaped (``loom bench serve``, ``peers`` and ``simulate``)."""
    w = p.add_argument_group("workload")
    w.add_argument(
        "--workload", default="synthetic", metavar="KIND[:PATH]", help=f"one of {', '.join(KINDS)} (default synthetic)"
    )
    w.add_argument(
        "--num-requests", type=_positive_int, help="synthetic/sharegpt: how many (default 100); traces: keep the first N"
    )
    w.add_argument("--arrival", choices=("poisson", "gamma"), default="poisson", help="synthetic/sharegpt arrival process")
    w.add_argument(
        "--rate",
        type=_positive_float,
        help="req/s: synthetic/sharegpt arrival rate (default: all at once); traces: rescale to this mean rate",
    )
    w.add_argument("--burstiness", type=_positive_float, default=1.0, help="gamma shape k; gap CV = 1/sqrt(k); 1 = Poisson")
    w.add_argument("--input-len", type=_positive_int, default=128, help="synthetic input tokens (default 128)")
    w.add_argument(
        "--output-len",
        type=_positive_int,
        default=128,
        help="synthetic output tokens; sharegpt prompts without an answer (default 128)",
    )
    w.add_argument("--length-dist", choices=("fixed", "uniform", "trace"), default="fixed", help="synthetic lengths")
    w.add_argument("--range-ratio", type=float, default=0.0, help="uniform lengths: +/- this fraction")
    w.add_argument("--length-trace", metavar="KIND:PATH", help="trace to sample lengths from with --length-dist trace")
    w.add_argument("--burstgpt-model", help="BurstGPT: keep only this Model (ChatGPT, GPT-4)")
    w.add_argument("--burstgpt-log-type", help="BurstGPT: keep only this Log Type")
    w.add_argument("--seed", type=int, default=0, help="of generated workloads and prompts")
    s = p.add_argument_group("shaping (traces come from GPU clusters; fit them to this machine)")
    s.add_argument("--start", type=float, default=0.0, help="window start, seconds into the trace")
    s.add_argument("--duration", type=_positive_float, help="window length in seconds")
    s.add_argument("--time-scale", type=_positive_float, help="multiply arrival times (>1 slows the trace down)")
    s.add_argument("--length-scale", type=_positive_float, help="multiply input and output lengths")
    s.add_argument("--max-input-len", type=_positive_int, help="cap input tokens")
    s.add_argument("--max-output-len", type=_positive_int, help="cap output tokens")


def add_slo_arg(g: argparse._ActionsContainer) -> None:
    g.add_argument("--slo", type=_slo, default=metrics.SLO(), help="e.g. ttft=2s,tpot=200ms,e2e=30s (units us, ms, s, m)")


def cmd_serve(args: argparse.Namespace) -> int:
    base_url = normalize_base_url(args.base_url)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None
    model = resolve_model(base_url, args.model, headers)
    tokenizer = resolve_tokenizer(args.tokenizer, base_url, model, headers)
    prepared, config = prepare_requests(args, tokenizer)
    cfg = client_config(args, base_url, model)
    label = args.label or model
    json_path = Path(args.output or f"loom-bench-{time.strftime('%Y%m%d-%H%M%S')}.json")
    outputs = Outputs(json_path, plots_dir_for(json_path) if args.plots else None)
    warm_up(prepared, cfg, args.warmup)
    run = run_benchmark(prepared, cfg, args.slo, {**config, "base_url": base_url}, outputs, label, args.progress)
    return 0 if run.summary["completed"] > 0 else 1


def cmd_compare(args: argparse.Namespace) -> int:
    runs = [results.load(p) for p in args.runs]
    labels = _unique_labels([r.label for r in runs], args.runs)
    report.print_comparison(labels, [r.summary for r in runs])
    if args.plot:
        out = plots.plot_latency_cdfs([(lab, r.requests) for lab, r in zip(labels, runs)], args.plot)
        print(f"plot: {out}")
    return 0


def _unique_labels(labels: list[str], paths: list[str]) -> list[str]:
    """Run labels, falling back to file names where two runs share one."""
    return [lab if labels.count(lab) == 1 else Path(p).stem for lab, p in zip(labels, paths)]


def cmd_peers(args: argparse.Namespace) -> int:
    return peers.main(args)


def cmd_policies(args: argparse.Namespace) -> int:
    return policies.main(args)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``serve``, ``compare``, ``peers`` and ``policies`` to the ``loom bench`` subparsers."""
    fmt = argparse.RawDescriptionHelpFormatter
    p = subparsers.add_parser(
        "serve", help="replay a workload against an OpenAI-compatible server", epilog=EPILOG, formatter_class=fmt
    )
    p.add_argument("--base-url", required=True, help="server root, e.g. http://127.0.0.1:8000 (a trailing /v1 is accepted)")
    p.add_argument("--model", help="model name to send (default: the first in /v1/models)")
    p.add_argument("--label", help="name of this run in tables (default: the model name)")
    p.add_argument("--output", "-o", help="run file (default loom-bench-<time>.json); plots go to <name>-plots/")
    add_workload_args(p)
    p.set_defaults(func=cmd_serve)

    c = subparsers.add_parser("compare", help="print runs side by side with ratios to the first")
    c.add_argument("runs", nargs="+", help="run files written by `loom bench serve`")
    c.add_argument("--plot", help="also write overlaid latency CDFs to this PNG")
    c.set_defaults(func=cmd_compare)

    q = subparsers.add_parser(
        "peers", help="start loom and peer servers in turn and run the same workload on each", epilog=EPILOG, formatter_class=fmt
    )
    peers.add_args(q)
    add_workload_args(q)
    q.set_defaults(func=cmd_peers)

    r = subparsers.add_parser(
        "policies", help="start loom once per scheduling policy and run the same workload on each", epilog=EPILOG,
        formatter_class=fmt,
    )
    policies.add_args(r)
    add_workload_args(r)
    r.set_defaults(func=cmd_policies)


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (``python -m loom.bench``)."""
    parser = argparse.ArgumentParser(prog="loom bench", description="serving benchmarks over HTTP")
    parser.add_argument("-v", "--verbose", action="store_true")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ValueError as e:
        parser.exit(2, f"loom bench {args.command}: error: {e}\n")
