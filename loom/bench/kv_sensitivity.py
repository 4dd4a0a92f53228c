"""``loom bench kv-sensitivity``: a KV cache format per layer, KVTuner-style (layer-wise mixed precision).

1. Sensitivity: for every layer and every candidate format, the perplexity of calibration text
   with that one layer's keys and values in the format and every other layer in the default cache,
   as a change against the default cache everywhere (the same rolling windows as ``loom bench
   perplexity``). One engine is loaded per measurement, through ``--kv-cache-layers``, so what is
   measured is exactly what the engine will run.
2. The plan: the format of each layer that minimises the sum of the layers' perplexity changes
   (negative ones, which are noise, count as 0) under a budget of a mean of ``--budget-bits`` bits
   per cached element, nominal (bf16 16, int8 8, int4 4, int2 2; scales and zero points are
   extra, and the real bytes per token are reported). It is an exact multiple-choice knapsack over
   the layers; summing the layers' changes treats them as independent, so measure the plan itself
   with ``loom bench perplexity --kv-cache-layers PLAN --kv-modes ...`` against uniform formats.
3. The plan is written as JSON for ``--kv-cache-layers``, with the measurements beside it."""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path
from typing import Any

from loom.bench.loader import SHAREGPT_FILE
from loom.bench.perplexity import perplexity, read_text, scored_tokens, token_nlls

FORMAT_BITS = {"fp32": 32, "bf16": 16, "int8": 8, "int4": 4, "int2": 2}  # nominal bits per cached element


def choose_plan(deltas: list[dict[str, float]], bits: dict[str, int], budget: int) -> list[str]:
    """The format per layer (one of each layer's ``deltas`` keys) with the least summed loss
    (``max(delta, 0)``) whose ``bits`` add up to at most ``budget``. ValueError if none fits."""
    best: dict[int, tuple[float, list[str]]] = {0: (0.0, [])}  # bits used -> (loss, formats)
    for layer in deltas:
        nxt: dict[int, tuple[float, list[str]]] = {}
        for used, (loss, formats) in best.items():
            for fmt, delta in layer.items():
                b = used + bits[fmt]
                if b <= budget and (b not in nxt or loss + max(delta, 0.0) < nxt[b][0]):
                    nxt[b] = (loss + max(delta, 0.0), formats + [fmt])
        best = nxt
        if not best:
            raise ValueError(f"no plan fits a budget of {budget} bits over {len(deltas)} layers")
    return min(best.values(), key=lambda lf: lf[0])[1]


def main(args: argparse.Namespace, engine_opts: dict[str, Any]) -> int:
    from loom.config import KV_CACHE_DTYPES
    from loom.engine import LLM
    from loom.model.kv_layer_plan import write_layer_plan

    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    for f in formats:
        if f not in KV_CACHE_DTYPES or f == "auto":
            raise ValueError(f"unknown KV cache format {f!r} in --formats; expected some of "
                             f"{', '.join(d for d in KV_CACHE_DTYPES if d != 'auto')}")
    if not formats:
        raise ValueError("--formats names no format")
    if engine_opts.get("kv_cache_layers") or engine_opts.get("kv_cache_dtype") not in (None, "auto"):
        raise ValueError("kv-sensitivity measures against the default cache: drop --kv-cache-dtype / --kv-cache-layers")
    if not args.budget_bits > 0:
        raise ValueError(f"--budget-bits must be positive, got {args.budget_bits}")
    if not Path(args.text).is_file():
        raise ValueError(f"text file not found: {args.text} (pass --text)")
    base = {k: v for k, v in engine_opts.items() if k not in ("kv_cache_layers", "kv_cache_dtype")}

    t0 = time.perf_counter()
    llm = LLM(args.model, **base)
    ids, window, stride = scored_tokens(llm, read_text(Path(args.text)), args.text, args.max_tokens, args.window)
    ref_ppl = perplexity(token_nlls(llm, ids, window, stride))
    num_layers = llm.engine.model_config.num_layers
    ref_bits = 32 if llm.model_info().dtype == "float32" else 16  # the default cache stores the compute dtype
    del llm
    gc.collect()
    print(f"model: {args.model or 'default (SmolLM2-135M-Instruct)'}, {num_layers} layers; {len(ids)} calibration tokens "
          f"of {args.text}, window {window}; default cache perplexity {ref_ppl:.3f}")

    deltas: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "one_layer.json"
        for layer in range(num_layers):
            row = {"auto": 0.0}
            for fmt in formats:
                plan = ["auto"] * num_layers
                plan[layer] = fmt
                write_layer_plan(path, plan)
                llm = LLM(args.model, **base, kv_cache_layers=str(path))
                row[fmt] = perplexity(token_nlls(llm, ids, window, stride)) / ref_ppl - 1
                del llm
                gc.collect()
            deltas.append(row)
            print(f"layer {layer:>3}: " + "  ".join(f"{f} {row[f] * 100:+.3f}%" for f in formats), flush=True)

    bits = {**FORMAT_BITS, "auto": ref_bits}
    plan = choose_plan(deltas, bits, int(args.budget_bits * num_layers))
    mean_bits = sum(bits[f] for f in plan) / num_layers
    counts = {f: plan.count(f) for f in dict.fromkeys(plan)}
    print(f"\nplan for a mean of at most {args.budget_bits} bits: mean {mean_bits:.2f} bits, "
          + ", ".join(f"{n} x {f}" for f, n in counts.items())
          + f"; summed single-layer perplexity change {sum(max(d[f], 0.0) for d, f in zip(deltas, plan)) * 100:+.2f}%")
    print(" ".join(plan))
    write_layer_plan(args.output, plan, model=args.model, budget_bits=args.budget_bits, mean_bits=mean_bits,
                     text=args.text, tokens=len(ids), window=window, reference_perplexity=ref_ppl,
                     perplexity_change={f: [d[f] for d in deltas] for f in formats},
                     seconds=time.perf_counter() - t0)
    print(f"wrote {args.output}: serve it with --kv-cache-layers {args.output}")
    return 0


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--formats", default="int8,int4,int2", metavar="A,B,...",
                   help="candidate formats per layer, comma-separated, besides the default cache (default: %(default)s)")
    p.add_argument("--budget-bits", type=float, default=4.0, metavar="BITS",
                   help="mean nominal bits per cached element the plan may use (default: %(default)s)")
    p.add_argument("--output", default="kv-layers.json", metavar="PATH", help="the plan file (default: %(default)s)")
    p.add_argument("--text", default=str(SHAREGPT_FILE), metavar="FILE",
                   help="calibration text, or a ShareGPT .json file (default: "
                        "../shared/data/sharegpt/ShareGPT_V3_filtered_500.json)")
    p.add_argument("--max-tokens", type=int, default=2048, metavar="N",
                   help="calibration tokens: the first N of the text (default: %(default)s)")
    p.add_argument("--window", type=int, default=1024, metavar="N", help="tokens per window (default: %(default)s)")
