"""Turning parsed ``loom bench serve|peers`` arguments into a run: the workload spec and its shaping,
the prepared prompts (with the config record describing them) and the client settings. Both
:mod:`loom.bench.cli` and :mod:`loom.bench.peers` use these."""

from __future__ import annotations

import argparse
import logging
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from loom.bench import client, sessions
from loom.bench.loader import SHAREGPT_FILE, SONNET_FILE, TRACE_KINDS, WorkloadSpec, load_workload, read_length_pairs
from loom.bench.prompts import PromptBuilder, read_corpus
from loom.bench.synthetic import LengthSpec
from loom.bench.tokenizer import Tokenizer
from loom.bench.workload import Shaping, shape

log = logging.getLogger(__name__)


def workload_spec(args: argparse.Namespace) -> WorkloadSpec:
    kind, path = WorkloadSpec.parse_kind(args.workload)
    pairs: tuple[tuple[int, int], ...] = ()
    if args.length_dist == "trace":
        if not args.length_trace:
            raise ValueError("--length-dist trace needs --length-trace KIND:PATH")
        lkind, lpath = WorkloadSpec.parse_kind(args.length_trace)
        if lkind not in TRACE_KINDS or not lpath:
            raise ValueError(f"--length-trace must be one of {', '.join(TRACE_KINDS)} with a path")
        pairs = read_length_pairs(lkind, lpath)
    lengths = LengthSpec(args.length_dist, args.input_len, args.output_len, args.range_ratio, pairs)
    generated = kind in ("synthetic", "sharegpt")
    return WorkloadSpec(
        kind=kind,
        path=path,
        num_requests=args.num_requests or 100,
        arrival=args.arrival,
        rate=(args.rate or math.inf) if generated else math.inf,
        burstiness=args.burstiness,
        lengths=lengths,
        burstgpt_model=args.burstgpt_model,
        burstgpt_log_type=args.burstgpt_log_type,
        seed=args.seed,
    )


def shaping(args: argparse.Namespace, spec: WorkloadSpec) -> Shaping:
    trace = spec.kind in TRACE_KINDS
    return Shaping(
        start=args.start,
        duration=args.duration,
        num_requests=args.num_requests if trace else None,
        time_scale=args.time_scale,
        rate=args.rate if trace else None,
        length_scale=args.length_scale,
        max_input_len=args.max_input_len,
        max_output_len=args.max_output_len,
    )


def default_corpus() -> Path:
    for path in (SHAREGPT_FILE, SONNET_FILE):
        if path.is_file():
            return path
    raise ValueError(f"no prompt text found under {SHAREGPT_FILE.parents[1]} (set LOOM_DATA_DIR or pass --corpus)")


def prepare_requests(args: argparse.Namespace, tokenizer: Tokenizer) -> tuple[sessions.Replay, dict[str, Any]]:
    """Load, shape and build prompts; also the config record describing it."""
    spec = workload_spec(args)
    if spec.kind == "sessions":
        return prepare_sessions(args, spec, tokenizer)
    shape_cfg = shaping(args, spec)

    def count_tokens(text: str) -> int:
        return len(tokenizer.encode(text))

    workload = shape(load_workload(spec, count_tokens), shape_cfg)
    corpus = Path(args.corpus) if args.corpus else default_corpus()
    builder = PromptBuilder(tokenizer, read_corpus(corpus), seed=args.seed)
    prepared = builder.prepare(workload)
    mismatched = sum(1 for r, w in zip(prepared, workload) if r.prompt_len != w.input_len)
    if mismatched:
        log.info("%d prompt(s) re-tokenize to a length other than asked", mismatched)
    config = {
        "workload": {
            "spec": args.workload,
            "kind": spec.kind,
            "path": spec.path,
            "arrival": spec.arrival if spec.kind in ("synthetic", "sharegpt") else "trace",
            "rate": None if math.isinf(spec.rate) else spec.rate,
            "burstiness": spec.burstiness,
            "lengths": {
                "dist": spec.lengths.kind,
                "input_len": spec.lengths.input_len,
                "output_len": spec.lengths.output_len,
                "range_ratio": spec.lengths.range_ratio,
                "trace": args.length_trace,
            },
            "shaping": asdict(shape_cfg),
            "num_requests": len(prepared),
            "span_s": prepared[-1].arrival if prepared else 0.0,
        },
        "prompts": {
            "corpus": str(corpus),
            "tokenizer": tokenizer.name,
            "corpus_tokens": builder.corpus_tokens,
            "length_mismatches": mismatched,
            "seed": args.seed,
        },
    }
    return prepared, config


def prepare_sessions(args: argparse.Namespace, spec: WorkloadSpec, tokenizer: Tokenizer
                     ) -> tuple[sessions.SessionWorkload, dict[str, Any]]:
    """A closed-loop multi-turn workload (no shaping: its spec sets the rates and lengths)."""
    session_spec = sessions.load_spec(spec.path)
    corpus = Path(args.corpus) if args.corpus else default_corpus()
    builder = PromptBuilder(tokenizer, read_corpus(corpus), seed=args.seed)
    workload = sessions.build(session_spec, builder, args.seed)
    config = {"workload": {"spec": args.workload, "kind": "sessions", "sessions": asdict(session_spec),
                           "num_requests": workload.num_requests},
              "prompts": {"corpus": str(corpus), "tokenizer": tokenizer.name, "seed": args.seed}}
    return workload, config


def client_config(args: argparse.Namespace, base_url: str, model: str) -> client.ClientConfig:
    return client.ClientConfig(
        base_url=base_url,
        model=model,
        endpoint=client.CHAT if args.endpoint == "chat" else client.COMPLETIONS,
        ignore_eos=args.ignore_eos,
        max_concurrency=args.max_concurrency,
        request_timeout=args.request_timeout,
        api_key=args.api_key,
        extra_body=args.extra_body,
    )
