"""``loom bench spec``: output tokens/s with each speculative decoding method against none, at
several numbers of concurrent requests, on workloads where speculation should pay (code editing,
rewriting) and where it should not (chat), with acceptance rate and mean accepted length.

Offline, through the engine's public API: a run at concurrency ``c`` sends ``--rounds`` times ``c``
requests, ``c`` in flight at any time (the next is added as one finishes, as ``c`` clients would),
greedy unless ``--temperature`` says otherwise."""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

import loom
from loom.bench.loader import SHAREGPT_FILE

WORKLOADS = ("code", "rewrite", "chat")
CODE_INSTRUCTION = ("Add the comment line `# Reviewed.` at the top of this Python file and output the whole file, "
                    "otherwise unchanged.")
# The answer's start, after the chat template's assistant turn: the edit and the file's first line
# (an editor integration sends what it knows of the answer; small models otherwise talk about the
# code instead of copying it).
CODE_ANSWER_START = "```python\n# Reviewed.\n{first_line}\n"
REWRITE_INSTRUCTION = "Rewrite the following text with any spelling mistakes fixed, otherwise word for word:"


def add_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("speculative decoding benchmark")
    g.add_argument("--methods", default="none,ngram,lookahead",
                   help="comma-separated --speculative methods (draft needs --draft-model); default none,ngram,lookahead")
    g.add_argument("--draft-model", help="the draft method's --speculative-model")
    g.add_argument("--draft-config", metavar="FILE|JSON",
                   help="the draft method's --speculative-config, so that draft-only options (its quantization) "
                        "leave the other methods alone (default: --speculative-config)")
    g.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated, of {', '.join(WORKLOADS)}")
    g.add_argument("--concurrency", default="1,4,16,64", help="comma-separated numbers of requests run at once")
    g.add_argument("--max-tokens", type=int, default=128, help="output tokens per request (default 128)")
    g.add_argument("--max-tokens-range-ratio", type=float, default=0.0, metavar="R",
                   help="draw each request's output tokens from [max_tokens * (1 - R), max_tokens * (1 + R)] "
                        "(seeded, the same for every method; default 0: every request gets --max-tokens, so "
                        "without speculation a round's requests start and finish together)")
    g.add_argument("--rounds", type=int, default=3,
                   help="requests per run, as a multiple of the concurrency (default 3; more make the low "
                        "concurrencies' runs longer and less noisy)")
    g.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    g.add_argument("--sharegpt", default=str(SHAREGPT_FILE), help="ShareGPT JSON for the rewrite and chat workloads")
    g.add_argument("--code-chars", type=int, default=2400, help="characters of each source file in a code prompt (default 2400)")
    g.add_argument("--output-json", help="write every row here")


def _code_prompts(n: int, chars: int) -> list[tuple[str, str]]:
    files = sorted(p for p in Path(loom.__file__).parent.rglob("*.py") if 1500 < p.stat().st_size < 20000)
    out = []
    for path in files[:n]:
        text = path.read_text()[:chars]
        code = text[: text.rfind("\n") + 1]
        out.append((f"{CODE_INSTRUCTION}\n\n```python\n{code}```", CODE_ANSWER_START.format(first_line=code.split("\n")[0])))
    return out


def _sharegpt(path: str, min_chars: int, n: int) -> list[str]:
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"ShareGPT file not found: {path} (pass --sharegpt)")
    texts = [t["value"] for conv in json.loads(file.read_text()) for t in conv.get("conversations", [])
             if t.get("from") == "human" and min_chars <= len(t.get("value", "")) <= 2400]
    random.Random(0).shuffle(texts)
    return texts[:n]


def workload_prompts(name: str, n: int, sharegpt: str, code_chars: int = 2400) -> list[tuple[str, str]]:
    """``n`` (user message, start of the answer) of the workload, repeated if its source runs short."""
    if name == "code":
        prompts = _code_prompts(n, code_chars)
    elif name == "rewrite":
        prompts = [(f"{REWRITE_INSTRUCTION}\n\n{t}", "") for t in _sharegpt(sharegpt, 400, n)]
    elif name == "chat":
        prompts = [(t, "") for t in _sharegpt(sharegpt, 20, n)]
    else:
        raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
    if not prompts:
        raise ValueError(f"the {name} workload found no prompts")
    return (prompts * -(-n // len(prompts)))[:n]


def _run(llm: Any, prompts: list[str], concurrency: int, params: list[Any], rounds: int) -> tuple[list[list[int]], float]:
    """Each request's output tokens, and the seconds, for ``rounds * concurrency`` prompts kept
    ``concurrency`` in flight (closed loop: the next is added as soon as one finishes)."""
    engine = llm.engine
    queue = list(enumerate(prompts[: rounds * concurrency]))
    outputs: dict[int, list[int]] = {}
    in_flight = 0
    t0 = time.perf_counter()
    while queue or in_flight:
        while queue and in_flight < concurrency:
            i, prompt = queue.pop(0)
            engine.add_request(f"spec-bench-{i}", prompt, params[i])
            in_flight += 1
        for out in engine.step():
            if out.finished:
                outputs[int(out.request_id.rsplit("-", 1)[1])] = out.outputs[0].token_ids
                in_flight -= 1
    return [outputs[i] for i in sorted(outputs)], time.perf_counter() - t0


def main(args: argparse.Namespace, engine_opts: dict[str, Any]) -> int:
    from loom.engine import LLM
    from loom.sampling import SamplingParams

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    levels = sorted({int(c) for c in args.concurrency.split(",")})
    if "draft" in methods and not args.draft_model:
        raise ValueError("the draft method needs --draft-model")
    if args.rounds < 1:
        raise ValueError(f"--rounds must be at least 1, got {args.rounds}")
    engine_opts.pop("speculative", None)
    if not 0 <= args.max_tokens_range_ratio < 1:
        raise ValueError(f"--max-tokens-range-ratio must be in [0, 1), got {args.max_tokens_range_ratio}")
    spread = random.Random(0)
    lo, hi = (round(args.max_tokens * (1 + d * args.max_tokens_range_ratio)) for d in (-1, 1))
    params = [SamplingParams(temperature=args.temperature, max_tokens=max(spread.randint(lo, hi), 1), ignore_eos=True)
              for _ in range(args.rounds * max(levels))]
    rows: list[dict[str, Any]] = []
    base: dict[tuple[str, int], tuple[float, list[list[int]]]] = {}  # without speculation: tok/s, outputs
    print(f"{'workload':>8} {'method':>9} {'conc':>4} {'tok/s':>8} {'speedup':>7} {'accept':>7} {'mean acc':>8} "
          f"{'k=0':>6} {'same':>6}")
    for method in methods:
        opts = {**engine_opts, "max_num_seqs": max(levels)}
        if method != "none":
            opts["speculative"] = method
        if method == "draft":
            opts["speculative_model"] = args.draft_model
            if args.draft_config:
                opts["speculative_config"] = args.draft_config
        llm = LLM(args.model, **opts)
        llm.generate(["Hello"], SamplingParams(max_tokens=4), use_tqdm=False)  # kernels built, weights touched
        for workload in workloads:
            messages = workload_prompts(workload, args.rounds * max(levels), args.sharegpt, args.code_chars)
            prompts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": m}]) + start for m, start in messages]
            longest = max(p.max_tokens for p in params)
            room = llm.model_info().max_model_len - longest
            prompts = [p for p in prompts if len(llm.tokenizer.encode(p)) < room]
            if not prompts:
                raise ValueError(f"no prompt of the {workload} workload fits the context with {longest} output "
                                 "tokens (try a smaller --code-chars or --max-tokens)")
            prompts = (prompts * -(-args.rounds * max(levels) // len(prompts)))[: args.rounds * max(levels)]
            for c in levels:
                before = llm.stats().spec
                outputs, seconds = _run(llm, prompts, c, params, args.rounds)
                after = llm.stats().spec
                rate = sum(map(len, outputs)) / seconds
                if method == "none":
                    base[(workload, c)] = (rate, outputs)
                plain = base.get((workload, c))
                row = {"workload": workload, "method": method, "concurrency": c, "requests": len(outputs),
                       "output_tokens": sum(map(len, outputs)), "output_tokens_per_s": rate,
                       "speedup": rate / plain[0] if plain else None,
                       # greedy: the share of requests whose output equals the run without speculation's
                       "same_output": sum(a == b for a, b in zip(outputs, plain[1])) / len(outputs) if plain else None}
                if after is not None and before is not None:
                    drafts = after.draft_tokens - before.draft_tokens
                    accepted = after.accepted_tokens - before.accepted_tokens
                    verified = after.verifications - before.verifications
                    skipped = after.steps_without_drafts - before.steps_without_drafts
                    row.update(acceptance_rate=accepted / drafts if drafts else None,
                               mean_accepted=accepted / verified if verified else None,
                               draft_tokens=drafts, no_draft_share=skipped / (skipped + verified) if skipped + verified else None)
                rows.append(row)
                fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
                print(f"{workload:>8} {method:>9} {c:>4} {rate:8.1f} {fmt(row['speedup'], '7.2f')} "
                      f"{fmt(row.get('acceptance_rate'), '7.1%')} {fmt(row.get('mean_accepted'), '8.2f')} "
                      f"{fmt(row.get('no_draft_share'), '6.0%')} {fmt(row['same_output'], '6.0%')}", flush=True)
        del llm
    if args.output_json:
        Path(args.output_json).write_text(json.dumps({"rows": rows, "engine_options": engine_opts, "model": args.model,
                                                      "max_tokens": args.max_tokens,
                                                      "max_tokens_range_ratio": args.max_tokens_range_ratio}, indent=1))
    return 0
