"""``loom bench latency``: decode step time per batch size and prefill time per prompt length,
each beside its roofline (the time the hardware needs at best, measured on this machine).

A step cannot beat either limit: the bytes it reads (weights plus the KV of every sequence) over
memory bandwidth, or its FLOPs over matmul throughput. Small decode batches hit the first,
large ones and prefill the second. Both limits are measured here, not taken from a datasheet."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch


def measure_bandwidth(mib: int = 512, repeats: int = 5) -> float:
    """Bytes/s of a large copy (read + write counted)."""
    src = torch.ones(mib << 18, dtype=torch.float32)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t)
    return 2 * src.numel() * 4 / statistics.median(times)


def measure_matmul_flops(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    a @ b
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times)


def _timed_steps(engine: Any, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
    return times


def main(args: argparse.Namespace, engine_opts: dict[str, Any]) -> int:
    from loom.config import CacheConfig
    from loom.engine import Engine, engine_config
    from loom.model.random_model import random_model_dir
    from loom.sampling import SamplingParams

    model = str(random_model_dir(args.random_model)) if args.random_model else args.model
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    prompt_lens = [int(n) for n in args.prompt_lens.split(",")]
    opts = dict(engine_opts)
    opts["max_num_seqs"] = max(batch_sizes + [opts.get("max_num_seqs") or 0])
    # Room for every prompt of the largest batch in one step, so that a batch starts decoding together:
    # with less, its first requests decode while the last ones prefill and finish early, and the
    # timed steps would hold fewer rows than the batch.
    opts["max_num_batched_tokens"] = max(prompt_lens + [max(batch_sizes) * args.context,
                                                        opts.get("max_num_batched_tokens") or 0])
    opts["enable_prefix_caching"] = False  # every prompt must really be computed
    if opts.get("num_blocks") is None and opts.get("kv_cache_bytes") is None:
        # Room for the largest batch at its final length: a batch that preempts measures a smaller one.
        block = opts.get("block_size") or CacheConfig.block_size
        per_seq = -(-(args.context + args.decode_steps + 8 + block) // block)
        opts["num_blocks"] = max(batch_sizes) * per_seq + -(-max(prompt_lens) // block) + 1
    engine = Engine(engine_config(model, **opts))
    info = engine.model_info()
    mc = engine.model_config
    dtype = getattr(torch, info.dtype)
    n_params = info.num_parameters
    n_embed = mc.vocab_size * mc.hidden_size
    embed = engine.worker.model.embed_tokens
    embed_bytes = embed.packed.nbytes if embed.packed is not None else embed.weight.numel() * embed.weight.element_size()
    # Resident weight bytes (packed matrices at their packed size); an untied input embedding is only gathered.
    weight_bytes = info.weight_bytes - (0 if mc.tie_word_embeddings else embed_bytes)
    kv_bytes_per_token = engine.worker.kv.spec.bytes_per_token  # the cache's format (a KIVI residual left out)
    bw = measure_bandwidth()
    flops = measure_matmul_flops(dtype)
    print(f"model: {model or 'default (SmolLM2-135M-Instruct)'}, {n_params / 1e6:.1f}M params, {info.dtype} on "
          f"{info.device} ({info.attention_backend} attention), threads {torch.get_num_threads()}, weights "
          f"{info.weight_bytes / 1e6:.1f} MB ({', '.join(info.weight_formats) or info.dtype})")
    print(f"measured: memory bandwidth {bw / 1e9:.1f} GB/s, {dtype} matmul {flops / 1e9:.0f} GFLOP/s")
    report: dict[str, Any] = {"bandwidth_gbs": bw / 1e9, "matmul_gflops": flops / 1e9, "decode": [], "prefill": []}
    rng = torch.Generator().manual_seed(0)
    vocab = mc.vocab_size

    def prompt(n: int) -> list[int]:
        return torch.randint(100, vocab, (n,), generator=rng).tolist()

    layer_params = n_params - n_embed * (1 if mc.tie_word_embeddings else 2)
    head_params = n_embed  # the output projection (tied or not) runs for every sampled row
    print(f"\n{'decode batch':>12} {'context':>8} {'ms/step':>9} {'tok/s':>9} {'bytes ms':>9} {'flops ms':>9} "
          f"{'of roofline':>12}")
    rid = 0
    for b in batch_sizes:
        params = SamplingParams(max_tokens=args.decode_steps + 8, ignore_eos=True, temperature=0)
        ids = [f"d{rid + i}" for i in range(b)]
        rid += b
        for i in ids:
            engine.add_request(i, prompt(args.context), params)
        started: set[str] = set()
        while len(started) < b:  # prefill everyone first: each has its first token
            started |= {o.request_id for o in engine.step() if o.outputs[0].token_ids}
        preempted = engine.stats().num_preemptions
        times = _timed_steps(engine, args.decode_steps)
        if engine.stats().num_preemptions != preempted:
            raise SystemExit(f"loom bench latency: batch {b} was preempted (KV cache too small); "
                             "raise --kv-cache-memory or --num-blocks")
        for i in ids:
            engine.abort_request(i)
        med = statistics.median(times)
        ctx = args.context + args.decode_steps / 2
        mem = (weight_bytes + b * ctx * kv_bytes_per_token) / bw
        attn_flops = 2 * 2 * mc.num_layers * mc.num_heads * mc.head_dim * ctx * b
        compute = (2 * b * (layer_params + head_params) + attn_flops) / flops
        roof = max(mem, compute)
        report["decode"].append({"batch": b, "ms_per_step": med * 1e3, "tokens_per_s": b / med,
                                 "memory_roofline_ms": mem * 1e3, "compute_roofline_ms": compute * 1e3})
        print(f"{b:>12} {args.context:>8} {med * 1e3:>9.2f} {b / med:>9.1f} {mem * 1e3:>9.2f} {compute * 1e3:>9.2f} "
              f"{roof / med:>12.1%}")

    print(f"\n{'prefill len':>12} {'ms':>9} {'tok/s':>9} {'roofline ms':>12} {'of roofline':>12}")
    for n in prompt_lens:
        times = []
        for _ in range(args.prefill_repeats):
            engine.add_request(f"p{rid}", prompt(n), SamplingParams(max_tokens=1, ignore_eos=True, temperature=0))
            rid += 1
            t = time.perf_counter()
            while engine.has_unfinished_requests():
                engine.step()
            times.append(time.perf_counter() - t)
        med = statistics.median(times)
        attn_flops = 2 * 2 * mc.num_layers * mc.num_heads * mc.head_dim * n * n / 2
        roof = (2 * layer_params * n + attn_flops + 2 * n_embed) / flops
        report["prefill"].append({"tokens": n, "ms": med * 1e3, "tokens_per_s": n / med, "roofline_ms": roof * 1e3})
        print(f"{n:>12} {med * 1e3:>9.1f} {n / med:>9.0f} {roof * 1e3:>12.1f} {roof / med:>12.1%}")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(report, indent=2))
    return 0


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-sizes", default="1,8,32,64")
    p.add_argument("--context", type=int, default=128, help="prompt tokens of each decoding sequence")
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--prompt-lens", default="128,512,2048")
    p.add_argument("--prefill-repeats", type=int, default=3)
    p.add_argument("--random-model", default=None, help="benchmark a random-weight preset instead, e.g. llama-58m")
    p.add_argument("--output-json", default=None)
