"""``loom bench migration``: live migration of a decoding request between two replicas on Ray.

Each trial runs a greedy request with a ``--context``-token prompt twice, once where it lands and
once migrated to the other replica after ``--after`` output tokens, both after a first pass that
puts the prompt in that replica's prefix cache: a prompt computed in one chunk and one found in the
cache take different kernels, whose bf16 roundings can change a greedy token, so both runs must
start the same way. It reports the stages (blocks
copied while the request ran, blocks copied after it stopped), the transfer and downtime of the
final stage, the longest gap between two of the client's outputs around the migration, and
whether the client received exactly the unmigrated run's tokens."""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--context", type=int, default=2000, help="prompt tokens of the migrated request (default 2000)")
    p.add_argument("--max-tokens", type=int, default=256, help="its output tokens (default 256)")
    p.add_argument("--after", type=int, default=16, help="output tokens before it migrates (default 16)")
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--output-json", default=None)


async def _stream(client: Any, prompt: list[int], params: Any, request_id: str,
                  migrate_after: int | None) -> tuple[list[int], list[float], Any]:
    """The client's tokens and the times its outputs arrived; the migration runs beside the reading."""
    tokens: list[int] = []
    times: list[float] = []
    migration = None
    async for out in client.generate(prompt, params, request_id=request_id):
        tokens += out.outputs[0].delta_token_ids
        times.append(time.perf_counter())
        if migrate_after is not None and migration is None and len(tokens) >= migrate_after:
            migration = asyncio.ensure_future(client.migrate(request_id))
    return tokens, times, (await migration if migration is not None else None)


def main(args: argparse.Namespace, engine_opts: dict[str, Any]) -> int:
    from loom.cluster import ClusterConfig
    from loom.cluster.client import ClusterClient
    from loom.engine import engine_config
    from loom.sampling import SamplingParams

    if args.context < 1 or args.max_tokens <= args.after or args.after < 1 or args.trials < 1:
        raise ValueError("need --context >= 1, 1 <= --after < --max-tokens and --trials >= 1")
    opts = {k: v for k, v in engine_opts.items() if v is not None}
    opts.setdefault("max_model_len", args.context + args.max_tokens + 1)
    client = ClusterClient(engine_config(args.model, **opts), ClusterConfig(replicas=2, replica_threads=1))
    try:
        vocab = client.model_info().vocab_size
        params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
        # Warm both replicas and the path between them at full size: the first move of this much KV
        # pays one-off costs (the object store mapping its memory: 0.4 s measured).
        warm = [1 + (i * 31) % (vocab - 1) for i in range(args.context)]
        asyncio.run(_stream(client, warm, SamplingParams(max_tokens=args.after * 4, ignore_eos=True), "warm-up",
                            args.after))
        rows = []
        for trial in range(args.trials):
            prompt = [1 + (i * 7919 + trial * 104729) % (vocab - 1) for i in range(args.context)]
            asyncio.run(_stream(client, prompt, SamplingParams(max_tokens=1), f"cache-{trial}", None))
            want, _, _ = asyncio.run(_stream(client, prompt, params, f"ref-{trial}", None))
            got, times, record = asyncio.run(_stream(client, prompt, params, f"moved-{trial}", args.after))
            if record is None:
                raise RuntimeError("the request finished before it could migrate; raise --max-tokens")
            gaps = [b - a for a, b in zip(times, times[1:])]
            rows.append({
                "trial": trial, "context_tokens": record.context_tokens, "staged_blocks": record.staged_blocks,
                "final_blocks": record.final_blocks, "kv_mb": record.kv_bytes / 1e6,
                "final_transfer_ms": record.transfer_seconds * 1e3, "downtime_ms": record.downtime_seconds * 1e3,
                "client_gap_ms": max(gaps) * 1e3, "median_gap_ms": statistics.median(gaps) * 1e3,
                "identical": got == want,
            })
    finally:
        client.shutdown()
    print(f"{'trial':>5} {'context':>8} {'staged':>7} {'final':>6} {'KV MB':>7} {'final copy ms':>14} "
          f"{'downtime ms':>12} {'client gap ms':>14} {'median gap ms':>14} identical")
    for r in rows:
        print(f"{r['trial']:>5} {r['context_tokens']:>8} {r['staged_blocks']:>7} {r['final_blocks']:>6} "
              f"{r['kv_mb']:>7.1f} {r['final_transfer_ms']:>14.1f} {r['downtime_ms']:>12.1f} "
              f"{r['client_gap_ms']:>14.1f} {r['median_gap_ms']:>14.1f} {'yes' if r['identical'] else 'NO'}")
    med = {k: statistics.median(r[k] for r in rows) for k in ("downtime_ms", "client_gap_ms", "final_transfer_ms")}
    print(f"median: downtime {med['downtime_ms']:.1f} ms, final copy {med['final_transfer_ms']:.1f} ms, longest "
          f"client gap {med['client_gap_ms']:.1f} ms; tokens identical in {sum(r['identical'] for r in rows)} of "
          f"{len(rows)} trials")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps({"rows": rows, "median": med}, indent=2))
    return 0 if all(r["identical"] for r in rows) else 1
