"""``loom bench perplexity``: what each quantization mode costs in quality, beside the bytes it saves.

Every mode is compared with the reference, the same model unquantized in fp32, in two ways:

1. perplexity over a text file, by rolling windows (the Hugging Face sliding-window recipe): the
   text is tokenized once, windows of ``window`` tokens start every ``stride`` tokens, and each
   window scores only the tokens the previous one did not, so every token after the first is
   scored exactly once and, past the first window, with ``window - stride`` tokens of context;
2. greedy agreement: non-overlapping 64-token slices of the same text are continued greedily for
   ``T`` tokens, and a prompt agrees when its ``T`` tokens equal the reference's exactly (the mean
   common prefix says how far they agree when they do not).

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


@dataclass
class ModeResult:
    mode: str  # the quantization name, or "reference"
    quantization: str
    dtype: str  # the compute dtype the engine resolved
    weight_bytes: int
    perplexity: float
    delta_pct: float  # perplexity vs the reference's, in percent
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


def perplexity(llm: Any, ids: list[int], window: int, stride: int) -> float:
    nlls = token_nlls(llm, ids, window, stride)
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


def parse_modes(text: str | None) -> list[str]:
    from loom.model.quant.formats import QUANTIZATION_CHOICES

    modes = [m.strip() for m in (text or "").split(",") if m.strip()]
    for m in modes:
        if m not in QUANTIZATION_CHOICES:
            raise ValueError(f"unknown quantization mode {m!r} in --modes; expected one of {', '.join(QUANTIZATION_CHOICES)}")
    return modes


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


def make_plan(llm: Any, text: str, args: argparse.Namespace) -> Plan:
    ids = encode_text(llm.tokenizer, text)[: args.max_tokens]
    if len(ids) < 2:
        raise ValueError(f"{args.text} is {len(ids)} token(s) long; perplexity needs at least 2")
    window = min(args.window, llm.engine.max_model_len - 1, len(ids))  # a prompt must be shorter than the context
    stride = min(args.stride or window // 2, window - 1)
    prompts = [ids[i : i + PROMPT_LEN] for i in range(0, len(ids) - PROMPT_LEN + 1, PROMPT_LEN)]
    return Plan(ids, window, stride, prompts[: args.agreement_prompts])


def main(args: argparse.Namespace, engine_opts: dict[str, Any]) -> int:
    from loom.engine import LLM

    check_args(args)
    # The engine's --quantization if given, and --modes; the default mode (auto) when neither is.
    own = [engine_opts["quantization"]] if engine_opts.get("quantization") else []
    modes = list(dict.fromkeys(own + parse_modes(args.modes))) or ["auto"]
    text = read_text(Path(args.text))
    runs = [("reference", {**engine_opts, **REFERENCE})] + [(m, {**engine_opts, "quantization": m}) for m in modes]

    plan: Plan | None = None
    results: list[ModeResult] = []
    ref_outputs: list[list[int]] = []
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
        ppl = perplexity(llm, plan.ids, plan.window, plan.stride)
        outputs = greedy_outputs(llm, plan.prompts, args.agreement_tokens) if plan.prompts else []
        if not results:
            ref_outputs = outputs
        same, prefix = agreement(outputs, ref_outputs)
        ref_ppl = results[0].perplexity if results else ppl
        results.append(ModeResult(label, opts["quantization"], llm.model_info().dtype, llm.engine.worker.weight_bytes,
                                  ppl, (ppl / ref_ppl - 1) * 100, same, prefix, time.perf_counter() - t0))
        print(f"{label}: measured in {results[-1].seconds:.1f} s")
        del llm
        gc.collect()
    assert plan is not None

    print(f"\n{'mode':>10} {'dtype':>9} {'weight MB':>10} {'perplexity':>11} {'Δ vs ref':>9} {'agreement':>10} "
          f"{'common prefix':>14} {'s':>7}")
    for r in results:
        agree = "-" if r.agreement is None else f"{r.agreement}/{len(plan.prompts)}"
        prefix = "-" if r.mean_common_prefix is None else f"{r.mean_common_prefix:.1f}"
        print(f"{r.mode:>10} {r.dtype:>9} {r.weight_bytes / 1e6:>10.1f} {r.perplexity:>11.3f} {r.delta_pct:>+8.2f}% "
              f"{agree:>10} {prefix:>14} {r.seconds:>7.1f}")
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
