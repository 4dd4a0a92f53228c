"""``loom bench perplexity``: what each quantization mode costs in quality, beside the bytes it saves.

Weight modes (``--modes``) are compared with the same model unquantized in fp32; KV cache modes
(``--kv-modes``) with the engine as configured over its default cache (the compute dtype);
tensor-parallel sizes (``--tp-sizes``) with the engine as configured in one process. Each mode is
compared with its reference in three ways:

1. perplexity over a text file, by rolling windows (the Hugging Face sliding-window recipe): the
   text is tokenized once, windows of ``window`` tokens start every ``stride`` tokens, and each
   window scores only the tokens the previous one did not, so every token after the first is
   scored exactly once and, past the first window, with ``window - stride`` tokens of context;
2. greedy agreement: non-overlapping 64-token slices of the same text are continued greedily for
   ``T`` tokens, and a prompt agrees when its ``T`` tokens equal the reference's exactly (the mean
   common prefix says how far they agree when they do not);
3. the mean absolute difference of the scored tokens' logprobs.

One engine is loaded at a time: a mode is built, measured and dropped before the next loads."""

from __future__ import annotations

import argparse
import gc
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loom.bench.loader import SHAREGPT_FILE

PROMPT_LEN = 64  # tokens of each greedy-agreement prompt
REFERENCE = {"quantization": "none", "dtype": "float32"}
KV_REFERENCE = {"kv_cache_dtype": "auto", "kv_cache_layers": None}


@dataclass
class ModeResult:
    mode: str  # the quantization or KV cache dtype name, or "reference"
    quantization: str
    kv_cache_dtype: str
    dtype: str  # the compute dtype the engine resolved
    weight_bytes: int
    kv_bytes_per_token: float  # the blocks' bytes (a KIVI residual left out)
    perplexity: float
    delta_pct: float  # perplexity vs the reference's, in percent
    logprob_mae: float  # mean |logprob - the reference's| over the scored tokens
    agreement: int | None  # prompts whose greedy output equals the reference's; None without prompts
    mean_common_prefix: float | None  # tokens, mean over the prompts
    seconds: float  # load and measurement


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """The text's tokens, after a BOS if the tokenizer puts one before its input (the BOS is context,
    never scored). An EOS the tokenizer may append is left out: it is not part of the text."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    bos = tokenizer.bos_token_id
    if bos is not None and tokenizer.encode("a")[:1] == [bos]:
        ids.insert(0, bos)
    return ids


def rolling_windows(num_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, first scored, end) of each window over ``num_tokens`` tokens: it reads tokens
    [start, end) and scores [first scored, end), the tokens the windows before it did not score
    (token 0 has no context and is never scored). ``stride < window``, so that each window overlaps
    the one before it and every token after the first is scored."""
    spans = []
    scored_end = 1
    for start in range(0, num_tokens, stride):
        end = min(start + window, num_tokens)
        spans.append((start, scored_end, end))
        scored_end = end
        if end == num_tokens:
            break
    return spans


def token_nlls(llm: Any, ids: list[int], window: int, stride: int) -> list[float]:
    """Negative log-likelihood of every token of ``ids`` after the first, by rolling windows, all
    windows in one batch."""
    from loom.sampling import SamplingParams

    spans = rolling_windows(len(ids), window, stride)
    params = SamplingParams(max_tokens=0, prompt_logprobs=0)  # the prompt only: no token sampled
    outs = llm.generate([ids[start:end] for start, _, end in spans], params, use_tqdm=False)
    nlls: list[float] = []
    for (start, first, end), out in zip(spans, outs):
        nlls += [-lp.logprob for lp in out.prompt_logprobs[first - start : end - start]]
    return nlls


def perplexity(nlls: list[float]) -> float:
    return math.exp(sum(nlls) / len(nlls))


def greedy_outputs(llm: Any, prompts: list[list[int]], num_tokens: int) -> list[list[int]]:
    from loom.sampling import SamplingParams

    params = SamplingParams(max_tokens=num_tokens, temperature=0, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def agreement(outputs: list[list[int]], reference: list[list[int]]) -> tuple[int | None, float | None]:
    """(prompts whose output equals the reference's, mean common prefix); (None, None) without prompts."""
    if not outputs:
        return None, None
    same = sum(o == r for o, r in zip(outputs, reference))
    return same, sum(map(common_prefix, outputs, reference)) / len(outputs)


def read_text(path: Path) -> str:
    """The file's text; a ShareGPT JSON file (a list of ``{"conversations": [{"value": ...}]}``) gives
    its turns in file order, one paragraph each."""
    if path.suffix.lower() != ".json":
        return path.read_text(encoding="utf-8")
    try:
        convs = json.loads(path.read_text(encoding="utf-8"))
        return "\n\n".join(turn["value"] for conv in convs for turn in conv["conversations"])
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{path}: not a ShareGPT JSON file ({e!r})") from None


def parse_modes(text: str | None, choices: tuple[str, ...], flag: str, what: str) -> list[str]:
    modes = [m.strip() for m in (text or "").split(",") if m.strip()]
    for m in modes:
        if m not in choices:
            raise ValueError(f"unknown {what} {m!r} in {flag}; expected one of {', '.join(choices)}")
    return modes


def plan_runs(args: argparse.Namespace, engine_opts: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(label, engine options) of each run, the reference first."""
    from loom.config import KV_CACHE_DTYPES
    from loom.model.quant.formats import QUANTIZATION_CHOICES

    if sum(x is not None for x in (args.modes, args.kv_modes, args.tp_sizes)) > 1:
        raise ValueError("pass one of --modes (weight formats), --kv-modes (KV cache formats) and --tp-sizes")
    if args.tp_sizes is not None:
        sizes = [int(n) for n in args.tp_sizes.split(",") if n.strip().isdigit() and int(n) > 1]
        if len(sizes) != len(args.tp_sizes.split(",")):
            raise ValueError(f"--tp-sizes takes tensor-parallel sizes above 1, comma-separated; got {args.tp_sizes!r}")
        base = {**engine_opts, "tensor_parallel_size": 1}
        return [("reference", base)] + [(f"tp={n}", {**base, "tensor_parallel_size": n}) for n in sizes]
    if args.kv_modes is not None:
        own = [engine_opts["kv_cache_dtype"]] if engine_opts.get("kv_cache_dtype") else []
        kv_modes = parse_modes(args.kv_modes, KV_CACHE_DTYPES, "--kv-modes", "KV cache dtype")
        modes = [m for m in dict.fromkeys(own + kv_modes) if m != "auto"]
        layers = engine_opts.get("kv_cache_layers")  # a per-layer plan: measured as one more mode
        if not modes and not layers:
            raise ValueError("--kv-modes names no format besides auto, the reference")
        base = {**engine_opts, **KV_REFERENCE}
        return ([("reference", base)] + [(m, {**base, "kv_cache_dtype": m}) for m in modes]
                + ([("layers", {**base, "kv_cache_layers": layers})] if layers else []))
    # The engine's --quantization if given, and --modes; the default mode (auto) when neither is.
    own = [engine_opts["quantization"]] if engine_opts.get("quantization") else []
    modes = list(dict.fromkeys(own + parse_modes(args.modes, QUANTIZATION_CHOICES, "--modes", "quantization mode")))
    return [("reference", {**engine_opts, **REFERENCE})] + [(m, {**engine_opts, "quantization": m}) for m in modes or ["auto"]]


def check_args(args: argparse.Namespace) -> None:
    if not Path(args.text).is_file():
        raise ValueError(f"text file not found: {args.text} (pass --text)")
    if args.window < 2:
        raise ValueError(f"--window must be >= 2, got {args.window}")
    # A window's first token has no context, so only its predecessor's overlap lets it be scored.
    if args.stride is not None and not 1 <= args.stride < args.window:
        raise ValueError(f"--stride must be between 1 and window - 1 ({args.window - 1}), got {args.stride}")
    if args.max_tokens < 2:
        raise ValueError(f"--max-tokens must be >= 2, got {args.max_tokens}")
    if args.agreement_prompts < 0 or args.agreement_tokens < 1:
        raise ValueError("--agreement-prompts must be >= 0 and --agreement-tokens >= 1")


@dataclass(frozen=True)
class Plan:
    """What every mode is measured on: fixed once, from the first engine's tokenizer and context."""

    ids: list[int]
    window: int
    stride: int
    prompts: list[list[int]]  # greedy-agreement prompts


def scored_tokens(llm: Any, text: str, source: str, max_tokens: int, window: int,
                  stride: int | None = None) -> tuple[list[int], int, int]:
    """The first ``max_tokens`` tokens of ``text`` (read from ``source``), and the window (at most
    ``window``) and stride (default: half the window) that score them."""
    ids = encode_text(llm.tokenizer, text)[:max_tokens]
    if len(ids) < 2:
        raise ValueError(f"{source} is {len(ids)} token(s) long; perplexity needs at least 2")
    window = min(window, llm.engine.max_model_len - 1, len(ids))  # a prompt must be shorter than the context
    return ids, window, min(stride or window // 2, window - 1)


def make_plan(llm: Any, text: str, args: argparse.Namespace) -> Plan:
    ids, window, stride = scored_tokens(llm, text, args.text, args.max_tokens, args.window, args.stride)
    prompts = [ids[i : i + PROMPT_LEN] for i in range(0, len(ids) - PROMPT_LEN + 1, PROMPT_LEN)]
    return Plan(ids, window, stride, prompts[: args.agreement_prompts])


def main(args: argparse.Namespace, engine_opts: dict[str, Any]) -> int:
    from loom.engine import LLM

    check_args(args)
    runs = plan_runs(args, engine_opts)
    text = read_text(Path(args.text))

    plan: Plan | None = None
    results: list[ModeResult] = []
    ref_outputs: list[list[int]] = []
    ref_nlls: list[float] = []
    for label, opts in runs:  # the reference first: every mode is compared with it
        t0 = time.perf_counter()
        llm = LLM(args.model, **opts)
        if plan is None:
            plan = make_plan(llm, text, args)
            num_windows = len(rolling_windows(len(plan.ids), plan.window, plan.stride))
            print(f"model: {args.model or 'default (SmolLM2-135M-Instruct)'}, text: {args.text}")
            print(f"{len(plan.ids) - 1} tokens scored of {len(plan.ids)}, window {plan.window}, stride {plan.stride} "
                  f"({num_windows} windows); greedy agreement: {len(plan.prompts)} prompts of {PROMPT_LEN} tokens, "
                  f"{args.agreement_tokens} greedy tokens each")
            if len(plan.prompts) < args.agreement_prompts:
                print(f"note: the text holds only {len(plan.prompts)} non-overlapping {PROMPT_LEN}-token prompts "
                      f"(--agreement-prompts {args.agreement_prompts})")
        nlls = token_nlls(llm, plan.ids, plan.window, plan.stride)
        outputs = greedy_outputs(llm, plan.prompts, args.agreement_tokens) if plan.prompts else []
        if not results:
            ref_outputs, ref_nlls = outputs, nlls
        same, prefix = agreement(outputs, ref_outputs)
        ppl = perplexity(nlls)
        ref_ppl = results[0].perplexity if results else ppl
        worker = llm.engine.worker
        results.append(ModeResult(
            label, opts.get("quantization") or "auto", opts.get("kv_cache_dtype") or "auto", llm.model_info().dtype,
            worker.weight_bytes, worker.kv.spec.bytes_per_token, ppl, (ppl / ref_ppl - 1) * 100,
            sum(abs(a - b) for a, b in zip(nlls, ref_nlls)) / len(nlls), same, prefix, time.perf_counter() - t0))
        print(f"{label}: measured in {results[-1].seconds:.1f} s")
        del llm
        gc.collect()
    assert plan is not None

    if args.tp_sizes is not None:
        print("\n(tensor-parallel modes: weight MB and KV B/token are process 0's share)", end="")
    print(f"\n{'mode':>10} {'dtype':>9} {'weight MB':>10} {'KV B/token':>10} {'perplexity':>11} {'Δ vs ref':>9} "
          f"{'logprob MAE':>11} {'agreement':>10} {'common prefix':>14} {'s':>7}")
    for r in results:
        agree = "-" if r.agreement is None else f"{r.agreement}/{len(plan.prompts)}"
        prefix = "-" if r.mean_common_prefix is None else f"{r.mean_common_prefix:.1f}"
        print(f"{r.mode:>10} {r.dtype:>9} {r.weight_bytes / 1e6:>10.1f} {r.kv_bytes_per_token:>10} {r.perplexity:>11.3f} "
              f"{r.delta_pct:>+8.2f}% {r.logprob_mae:>11.4f} {agree:>10} {prefix:>14} {r.seconds:>7.1f}")
    if args.output_json:
        report = {"model": args.model, "text": args.text, "tokens": len(plan.ids), "scored_tokens": len(plan.ids) - 1,
                  "window": plan.window, "stride": plan.stride, "agreement_prompts": len(plan.prompts),
                  "agreement_tokens": args.agreement_tokens, "modes": [asdict(r) for r in results]}
        Path(args.output_json).write_text(json.dumps(report, indent=2))
    return 0


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--modes", default=None, metavar="A,B,...",
                   help="quantization modes to measure, comma-separated, besides --quantization if given "
                        "(default: --quantization's default, auto); the fp32 unquantized reference is always measured")
    p.add_argument("--kv-modes", default=None, metavar="A,B,...",
                   help="measure KV cache formats instead (--kv-cache-dtype values, comma-separated, besides "
                        "--kv-cache-dtype if given) against the engine as configured over its default cache")
    p.add_argument("--tp-sizes", default=None, metavar="N,M,...",
                   help="measure tensor-parallel sizes instead (comma-separated, above 1) against the engine as "
                        "configured in one process")
    p.add_argument("--text", default=str(SHAREGPT_FILE), metavar="FILE",
                   help="UTF-8 text to score, or a ShareGPT .json file (its turns, in order; default: "
                        "../shared/data/sharegpt/ShareGPT_V3_filtered_500.json)")
    p.add_argument("--max-tokens", type=int, default=8192, metavar="N",
                   help="score at most the first N tokens of the text (default: %(default)s)")
    p.add_argument("--window", type=int, default=2048, metavar="N",
                   help="tokens per window, capped by the context and the text (default: %(default)s)")
    p.add_argument("--stride", type=int, default=None, metavar="N", help="tokens between window starts (default: window // 2)")
    p.add_argument("--agreement-prompts", type=int, default=32, metavar="N",
                   help=f"greedy-agreement prompts: non-overlapping {PROMPT_LEN}-token slices of the text, 0 for none "
                        "(default: %(default)s)")
    p.add_argument("--agreement-tokens", type=int, default=32, metavar="T",
                   help="greedy tokens per agreement prompt (default: %(default)s)")
    p.add_argument("--output-json", default=None, metavar="PATH")
