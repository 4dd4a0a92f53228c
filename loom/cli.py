"""``loom`` command line: it parses arguments and calls into the package, nothing more."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path
from typing import Any

from loom.config import engine_options as config_options

# Engine options only `loom serve` takes.
SERVER_ONLY_OPTIONS = frozenset({"max_waiting"})


def add_engine_args(p: argparse.ArgumentParser, server: bool = False) -> None:
    """The engine options, built from the config dataclasses' fields (``loom.config.engine_options``):
    defaults, types and help are written there once. Values are checked when the config is built
    (``engine_config``), so a bad one is a ``loom: error`` before any model loads."""
    g = p.add_argument_group("engine")
    for opt in config_options():
        meta = opt.metadata
        if opt.flag is None or (opt.name in SERVER_ONLY_OPTIONS and not server):
            continue
        choices = meta["choices"] or (_NAMED_ELSEWHERE[opt.name]() if opt.name in _NAMED_ELSEWHERE else None)
        metavar = meta["metavar"] or ("{" + ",".join(choices) + "}" if choices else opt.flag[2:].upper().replace("-", "_"))
        if opt.type is bool:
            action = "store_false" if opt.default else "store_true"
            verb = "disable" if opt.default else "enable"
            g.add_argument(opt.flag, dest=opt.name, action=action, help=f"{verb} {meta['help']}".replace("%", "%%"))
            continue
        default = meta["default_help"] or opt.default
        help = (meta["help"] + ("" if default is None else f" (default: {default})")).replace("%", "%%")
        kind = float if meta["cli_unit"] else opt.type
        g.add_argument(opt.flag, dest=opt.name, type=kind, default=None, metavar=metavar, help=help)


def _policy_names() -> tuple[str, ...]:
    from loom.scheduler import POLICIES

    return tuple(POLICIES)


def _quantization_names() -> tuple[str, ...]:
    from loom.model.quant.formats import QUANTIZATION_CHOICES

    return QUANTIZATION_CHOICES


# Options whose valid values the config cannot import (it imports nothing from loom).
_NAMED_ELSEWHERE = {"policy": _policy_names, "quantization": _quantization_names}


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """The engine keyword options (``LLM(**...)``, ``engine_config``) in ``args``, but ``model``;
    None where not given (the config's default applies)."""
    out: dict[str, Any] = {}
    for opt in config_options():
        if opt.flag is None or opt.name == "model" or not hasattr(args, opt.name):
            continue
        value = getattr(args, opt.name)
        if value is not None and opt.metadata["cli_unit"]:
            value = round(value * opt.metadata["cli_unit"])
        out[opt.name] = value
    return out


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int = 256) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    c = g.add_mutually_exclusive_group()
    c.add_argument("--json-schema", metavar="FILE|JSON", help="constrain the output to this JSON schema")
    c.add_argument("--json-object", action="store_true", help="constrain the output to a JSON object")
    c.add_argument("--regex", help="constrain the output to this regular expression")
    c.add_argument("--choice", nargs="+", metavar="TEXT", help="constrain the output to one of these strings")
    c.add_argument("--grammar", metavar="FILE", help="constrain the output to this GBNF or Lark grammar")


def structured_outputs(args: argparse.Namespace):
    """The output constraint the arguments ask for, if any (files are read here)."""
    from loom.structured import StructuredOutputs

    if args.json_schema is not None:
        path = Path(args.json_schema)
        return StructuredOutputs(json=path.read_text() if path.is_file() else args.json_schema)
    if args.grammar is not None:
        try:
            return StructuredOutputs(grammar=Path(args.grammar).read_text())
        except OSError as e:
            raise ValueError(f"--grammar: cannot read {args.grammar}: {e.strerror}") from None
    if args.json_object or args.regex is not None or args.choice is not None:
        return StructuredOutputs(json_object=args.json_object, regex=args.regex, choice=args.choice)
    return None


def sampling_params(args: argparse.Namespace):
    from loom.sampling import SamplingParams

    return SamplingParams(
        structured_outputs=structured_outputs(args),
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=args.stop,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from loom.engine import LLM

    llm = LLM(args.model, **engine_options(args))
    params = sampling_params(args)
    prompt: str | list[int] = args.prompt
    if args.chat_template:
        prompt = llm.tokenizer.encode_chat([{"role": "user", "content": args.prompt}])
    out = None
    for out in llm.stream(prompt, params):
        sys.stdout.write(out.outputs[0].delta_text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if out is not None and args.verbose:
        c, m = out.outputs[0], out.metrics
        print(f"[{len(c.token_ids)} tokens, finish_reason={c.finish_reason}, ttft={m.ttft:.3f}s, e2e={m.e2e:.3f}s]",
              file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from loom.engine import LLM

    llm = LLM(args.model, **engine_options(args))
    params = sampling_params(args)
    messages: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            sys.stdout.write("\n> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:
            return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        messages.append({"role": "user", "content": line})
        ids = llm.tokenizer.encode_chat(messages)
        reply = ""
        for out in llm.stream(ids, params):
            sys.stdout.write(out.outputs[0].delta_text)
            sys.stdout.flush()
            reply = out.outputs[0].text
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": reply})


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    from loom.engine import engine_config
    from loom.server import ServerConfig, serve
    from loom.server.config import DEFAULT_MODEL_NAME

    names = tuple(args.served_model_name or [args.model or DEFAULT_MODEL_NAME])
    given = {} if args.max_request_bytes is None else {"max_request_bytes": args.max_request_bytes}  # else the config's
    config = ServerConfig(
        served_model_names=names,
        api_key=args.api_key or os.environ.get("LOOM_API_KEY") or None,
        host=args.host,
        port=args.port,
        graceful_timeout=args.graceful_timeout,
        log_level=args.uvicorn_log_level,
        tool_call_parser=args.tool_call_parser,
        **given,
    )
    serve(engine_config(args.model, **engine_options(args)), config, cluster_config(args))
    return 0


def cluster_config(args: argparse.Namespace):
    """The ClusterConfig of ``loom serve``'s cluster flags; None (one engine in this process) unless
    --replicas or --ray-address is given."""
    from loom.cluster import ClusterConfig

    split = args.prefill_replicas is not None or args.decode_replicas is not None
    if split:
        if args.prefill_replicas is None or args.decode_replicas is None:
            raise ValueError("--prefill-replicas and --decode-replicas go together")
        if args.replicas is not None and args.replicas != args.prefill_replicas + args.decode_replicas:
            raise ValueError("--replicas must be --prefill-replicas + --decode-replicas (or left out)")
        if args.prefill_replicas < 1 or args.decode_replicas < 1:
            raise ValueError("--prefill-replicas and --decode-replicas must be >= 1")
    if args.replicas is None and args.ray_address is None and not split:
        extra = [flag for flag, value in (("--router", args.router), ("--router-config", args.router_config),
                                          ("--replica-threads", args.replica_threads),
                                          ("--max-restarts", args.max_restarts),
                                          ("--rebalance", args.rebalance or None)) if value is not None]
        if extra:
            raise ValueError(f"{extra[0]} applies to replicas on Ray: add --replicas N (or --ray-address)")
        return None
    given = {name: getattr(args, name) for name in ("replicas", "router", "router_config", "ray_address",
                                                    "replica_threads", "max_restarts")}
    if split:
        given.update(replicas=args.prefill_replicas + args.decode_replicas, prefill_replicas=args.prefill_replicas)
    if args.rebalance:
        given["rebalance"] = True
    return ClusterConfig(**{k: v for k, v in given.items() if v is not None})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loom", description="LLM inference and serving engine")
    parser.add_argument("--log-level", default="WARNING")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="generate a completion for one prompt (streams to stdout)")
    p.add_argument("prompt")
    p.add_argument("--chat-template", action="store_true", help="wrap the prompt as a user chat turn")
    p.add_argument("-v", "--verbose", action="store_true", help="print token count and timings to stderr")
    add_engine_args(p)
    add_sampling_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat with the model's chat template")
    p.add_argument("--system", default=None, help="system prompt")
    add_engine_args(p)
    add_sampling_args(p, max_tokens=512)
    p.set_defaults(func=cmd_chat)

    from loom.server.config import TOOL_CALL_PARSERS, ServerConfig

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (completions, chat, metrics)")
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for all interfaces)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $LOOM_API_KEY, else no auth)")
    g.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="model name(s) clients send (default: the --model argument, or SmolLM2-135M-Instruct)")
    g.add_argument("--graceful-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="on SIGTERM, time in-flight requests get to finish before they are cancelled")
    g.add_argument("--max-request-bytes", type=int, default=None, metavar="BYTES",
                   help="larger request bodies are refused with 413 (default: 32 MiB)")
    g.add_argument("--uvicorn-log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug", "trace"],
                   help="log level of the HTTP server (access log at info)")
    g.add_argument("--tool-call-parser", default=ServerConfig.tool_call_parser, choices=TOOL_CALL_PARSERS,
                   help="how tool calls are read from the output when tool_choice is 'auto': auto picks one from "
                        "the chat template, none turns that off (default: %(default)s)")
    from loom.cluster import ROUTERS, ClusterConfig

    g = p.add_argument_group("cluster (replicas on Ray; needs pip install loom[cluster])")
    g.add_argument("--replicas", type=int, default=None, metavar="N",
                   help="serve from N engine replicas, each a Ray actor in its own process (default: one engine "
                        "in this process, no Ray)")
    g.add_argument("--router", default=None, choices=tuple(ROUTERS),
                   help=f"how requests are spread over the replicas (default: {ClusterConfig.router})")
    g.add_argument("--router-config", default=None, metavar="FILE|JSON", help="the router's options")
    g.add_argument("--ray-address", default=None, metavar="ADDRESS",
                   help="join this Ray cluster (default: start a local Ray with this machine's cores)")
    g.add_argument("--replica-threads", type=int, default=None, metavar="N",
                   help="compute threads (Ray CPUs) per replica (default: the cores divided among the replicas)")
    g.add_argument("--max-restarts", type=int, default=None, metavar="N",
                   help=f"times Ray restarts a replica that died (default: {ClusterConfig.max_restarts})")
    g.add_argument("--prefill-replicas", type=int, default=None, metavar="P",
                   help="disaggregated: P replicas compute prompts and hand each request, with its KV blocks, to one "
                        "of the --decode-replicas after its first token")
    g.add_argument("--decode-replicas", type=int, default=None, metavar="D", help="see --prefill-replicas")
    g.add_argument("--rebalance", action="store_true",
                   help=f"migrate running requests from the busiest replica to the least busy when they differ by "
                        f"{ClusterConfig.rebalance_gap} requests or more (POST /admin/drain/N works without it)")
    add_engine_args(p, server=True)
    p.set_defaults(func=cmd_serve)

    from loom.bench.cli import register as register_bench

    p = sub.add_parser("bench", help="benchmarks")
    bench = p.add_subparsers(dest="bench_command", required=True)
    register_bench(bench)
    for name, module, doc in (
        ("throughput", "loom.bench.throughput", "offline batch throughput (optionally vs transformers)"),
        ("latency", "loom.bench.latency", "decode/prefill step times beside the hardware roofline"),
        ("structured", "loom.bench.structured", "JSON-schema constrained decoding: compile time, validity, step overhead"),
        ("perplexity", "loom.bench.perplexity", "quantization modes vs the fp32 model: perplexity, greedy agreement, bytes"),
        ("kv-sensitivity", "loom.bench.kv_sensitivity", "per-layer KV cache format sensitivity and a plan for a bit budget"),
        ("context-switch", "loom.bench.context_switch", "preemption cost by recompute and by swap per context length"),
        ("spec", "loom.bench.speculative", "speculative decoding methods vs none: tok/s, acceptance, per concurrency"),
        ("migration", "loom.bench.migration", "live migration between two replicas on Ray: downtime, stages, token check"),
        ("simulate", "loom.bench.simulate", "replay a trace through the real router and scheduler on simulated replicas"),
    ):
        p = bench.add_parser(name, help=doc)
        add_engine_args(p)
        mod = importlib.import_module(module)
        mod.add_args(p)
        p.set_defaults(func=lambda a, mod=mod: mod.main(a, engine_options(a)))
    return parser


def check_engine_args(args: argparse.Namespace) -> None:
    """Build the engine config of a command that takes engine options, so a bad value (unknown
    policy, non-positive size, ...) is reported before anything loads. ValueError if one is bad."""
    if hasattr(args, "block_size"):
        from loom.engine import engine_config

        engine_config(args.model, **engine_options(args))
    if args.command == "serve":
        cluster_config(args)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        check_engine_args(args)
        return int(args.func(args) or 0)
    except ValueError as e:
        print(f"loom: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
