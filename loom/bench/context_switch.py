"""``loom bench context-switch``: what preempting a request costs at a given context length, by
recompute (its prefill again, as a preempted request does it: chunk by chunk, without the prefix
cache) and by swap (its KV blocks copied out of the cache and back, as the swap tier does it),
beside the start-up cost model that picks one per victim (``--preemption-mode auto``)."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--contexts", default="512,2048,8192", help="context tokens of the preempted request")
    p.add_argument("--repeats", type=int, default=3, help="timings per context (the median is reported)")
    p.add_argument("--output-json", default=None)


def _prefill_seconds(engine: Any, prompt: list[int], request_id: str) -> float:
    """Steps from adding the request to its first token (the prefill a recompute redoes)."""
    from loom.sampling import SamplingParams

    engine.add_request(request_id, prompt, SamplingParams(max_tokens=1, ignore_eos=True))
    t0 = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    return time.perf_counter() - t0


def main(args: argparse.Namespace, engine_opts: dict[str, Any]) -> int:
    from loom.engine import Engine, engine_config
    from loom.kvcache.manager import cdiv

    contexts = sorted(int(c) for c in args.contexts.split(","))
    if not contexts or contexts[0] < 1:
        raise ValueError(f"--contexts takes positive integers, e.g. 512,2048,8192 (got {args.contexts!r})")
    opts = {"swap_space": 1 << 30, "preemption_mode": "auto", **{k: v for k, v in engine_opts.items() if v is not None}}
    opts["enable_prefix_caching"] = False  # a recompute computes every token again
    opts.setdefault("max_model_len", contexts[-1] + 1)
    engine = Engine(engine_config(args.model, **opts))
    if engine.max_model_len < contexts[-1]:
        raise ValueError(f"the model's context is {engine.max_model_len} tokens; --contexts cannot exceed it")
    swap, costs = engine.worker.swap, engine.worker.switch_costs
    bs = engine.kv.block_size
    vocab = engine.model_config.vocab_size
    _prefill_seconds(engine, [1 + i % (vocab - 1) for i in range(min(64, contexts[0]))], "warm-up")
    rows = []
    for context in contexts:
        context = min(context, engine.max_model_len - 1)  # a prompt leaves room for one generated token
        prompt = [1 + (i * 7919 + context) % (vocab - 1) for i in range(context)]
        blocks = list(range(cdiv(context, bs)))  # the cache is empty between runs: any blocks time the same
        recompute, out, back = [], [], []
        for r in range(args.repeats):
            recompute.append(_prefill_seconds(engine, prompt, f"c{context}-{r}"))
            t0 = time.perf_counter()
            swap.save("bench", blocks)
            t1 = time.perf_counter()
            swap.load("bench", blocks, 0)
            t2 = time.perf_counter()
            swap.drop("bench")
            out.append(t1 - t0)
            back.append(t2 - t1)
        row = {
            "context": context, "blocks": len(blocks),
            "recompute_ms": 1e3 * statistics.median(recompute),
            "swap_out_ms": 1e3 * statistics.median(out), "swap_in_ms": 1e3 * statistics.median(back),
            "predicted_recompute_ms": 1e3 * context * costs.recompute_seconds_per_token,
            "predicted_swap_ms": 1e3 * len(blocks) * costs.swap_seconds_per_block,
            "swap_in_stall_per_step_ms": 1e3 * statistics.median(back) * min(1.0, costs.blocks_per_step / len(blocks)),
        }  # fmt: skip
        row["swap_ms"] = row["swap_out_ms"] + row["swap_in_ms"]
        row["chosen"] = "swap" if costs.prefers_swap(len(blocks), context) else "recompute"
        rows.append(row)
    dtype = engine_opts.get("swap_dtype") or "auto"
    print(f"context switch, swap dtype {dtype}, {swap.bytes_per_block} host bytes per block of {bs} tokens; "
          f"medians of {args.repeats}")
    print(f"{'context':>8} {'blocks':>7} {'recompute ms':>13} {'swap out+in ms':>15} {'swap/recompute':>15} "
          f"{'model: recompute':>17} {'model: swap':>12} {'auto picks':>11} {'swap-in stall/step':>19}")
    for r in rows:
        print(f"{r['context']:>8} {r['blocks']:>7} {r['recompute_ms']:>13.1f} {r['swap_ms']:>15.2f} "
              f"{r['swap_ms'] / r['recompute_ms']:>15.3f} {r['predicted_recompute_ms']:>17.1f} "
              f"{r['predicted_swap_ms']:>12.2f} {r['chosen']:>11} {r['swap_in_stall_per_step_ms']:>19.2f}")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps({"swap_dtype": dtype, "bytes_per_block": swap.bytes_per_block,
                                                      "rows": rows}, indent=2))
    return 0
