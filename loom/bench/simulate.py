"""``loom bench simulate``: replay a workload through loom's real router and scheduler on simulated
replicas, with step times from a cost model fitted to this machine.

Each simulated replica is a real ``Scheduler`` (with its policy) over a real ``KVCacheManager``
(block pool, prefix cache); only the forward pass is replaced, by the time the cost model gives
the step. Requests are routed by a real ``Router`` (its index fed by the replicas' prefix-cache
events after every step), and with prefill replicas a request moves to a decode replica after its
first token, its blocks adopted there as in a real handoff. So it predicts goodput for
configurations this machine cannot run (8 replicas, 2 prefill + 6 decode), from what one replica
costs here.

The cost model (``--fit FILE`` measures it with the real engine): a step's seconds are its prefill
tokens' (a fixed cost, a cost per token and one per token and context token it attends to, fitted
by least squares on chunks with and without a cached prefix) plus its decode rows' (the
measured time of that many rows at a short context, interpolated between the measured counts,
plus a cost per row and token of context, from the same counts at a longer context).
Policies that read the clock (slo, priority aging, session pins) see the wall clock, not the
simulated one; the other policies do not read it.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from loom.bench.metrics import SLO

SHORT, LONG = 64, 512  # prompt tokens of the decode rows the fit times
TRANSFER_SECONDS_PER_TOKEN = 47e-6  # a handoff's KV transfer, measured with the default model (README)
_TOKEN_SPACE = 1 << 30  # token ids of simulated prompts; no model reads them


@dataclass(frozen=True)
class CostModel:
    prefill_fixed: float  # seconds of a step with prefill tokens, beyond what they cost each
    per_prefill_token: float
    per_prefill_attention: float  # per prefill token and token it attends to (its context before it)
    decode_rows: tuple[int, ...]  # measured decode batch sizes, ascending
    decode_seconds: tuple[float, ...]  # their step seconds at no context
    per_context_token: float  # per decode row and token of context it attends to
    transfer_per_token: float = TRANSFER_SECONDS_PER_TOKEN  # a handoff's KV, per context token
    num_blocks: int = 0  # the KV cache the fit's engine had (the default for --num-blocks)
    description: str = ""

    def step_seconds(self, prefill_tokens: int, decode_rows: int, context_tokens: int,
                     prefill_attention: float = 0.0) -> float:
        """``prefill_attention``: the sum over prefill tokens of the tokens each attends to."""
        seconds = (self.prefill_fixed + self.per_prefill_token * prefill_tokens
                   + self.per_prefill_attention * prefill_attention) if prefill_tokens else 0.0
        if decode_rows:
            rows, secs = self.decode_rows, self.decode_seconds
            if decode_rows <= rows[-1]:
                seconds += float(np.interp(decode_rows, rows, secs))
            else:  # past the largest measured batch: the last measured slope
                slope = (secs[-1] - secs[-2]) / (rows[-1] - rows[-2]) if len(rows) > 1 else secs[-1] / rows[-1]
                seconds += secs[-1] + slope * (decode_rows - rows[-1])
            seconds += self.per_context_token * context_tokens
        return seconds

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> CostModel:
        try:
            values = json.loads(Path(path).read_text())
            values["decode_rows"], values["decode_seconds"] = tuple(values["decode_rows"]), tuple(values["decode_seconds"])
            return cls(**values)
        except (OSError, json.JSONDecodeError, TypeError, KeyError) as e:
            raise ValueError(f"--cost-model {path}: not a cost model written by --fit ({type(e).__name__}: {e})") from None


def fit_cost_model(model: str | None, engine_opts: dict[str, Any]) -> tuple[CostModel, list[dict[str, float]]]:
    """Time real engine steps of known shapes and fit the model; also the measured points."""
    from loom.engine import Engine, engine_config
    from loom.sampling import SamplingParams

    engine = Engine(engine_config(model, **engine_opts))
    vocab = engine.model_config.vocab_size
    budget = engine.config.scheduler.max_num_batched_tokens
    counter = itertools.count()

    def prompt(n: int) -> list[int]:
        k = next(counter)
        return [1 + (i * 7919 + k * 104729) % (vocab - 1) for i in range(n)]

    def timed_step() -> float:
        t0 = time.perf_counter()
        engine.step()
        return time.perf_counter() - t0

    points: list[dict[str, float]] = []
    engine.add_request("warm-up", prompt(64), SamplingParams(max_tokens=4, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    for cached in (0, 2048):  # one prefill chunk, after a prefix found in the cache
        cached = max(min(cached, engine.max_model_len - budget - 2), 0)
        for tokens in (32, 128, 256, 512):
            tokens = min(tokens, budget, engine.max_model_len - cached - 2)
            seconds = []
            for _ in range(3):
                ids = prompt(cached + tokens)
                if cached:  # put the prefix in the cache first
                    engine.add_request(f"c{next(counter)}", ids[:cached] + [1], SamplingParams(max_tokens=1))
                    while engine.has_unfinished_requests():
                        engine.step()
                engine.add_request(f"p{next(counter)}", ids, SamplingParams(max_tokens=1, ignore_eos=True))
                seconds.append(timed_step())
                while engine.has_unfinished_requests():
                    engine.step()
            points.append({"prefill_tokens": tokens, "decode_rows": 0, "context_tokens": 0, "long": cached > 0,
                           "attention": tokens * (cached + tokens / 2), "seconds": float(np.median(seconds))})
    for rows in (1, 2, 4, 8, 16, 32, 64):  # decode rows at a short and a long context
        for context in (SHORT, min(LONG, engine.max_model_len - 48)):
            for _ in range(rows):
                engine.add_request(f"d{next(counter)}", prompt(context), SamplingParams(max_tokens=40, ignore_eos=True))
            while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running) or \
                    engine.scheduler.waiting:
                engine.step()
            engine.step()  # every request decodes from here on
            seconds = [timed_step() for _ in range(6)]
            points.append({"prefill_tokens": 0, "decode_rows": rows, "context_tokens": rows * (context + 4),
                           "long": context > SHORT, "attention": 0, "seconds": float(np.median(seconds))})
            while engine.has_unfinished_requests():
                engine.step()
    prefill = [p for p in points if p["prefill_tokens"]]
    a = np.array([[1.0, p["prefill_tokens"], p["attention"]] for p in prefill])
    y = np.array([p["seconds"] for p in prefill])
    (fixed, per_token, per_attention), *_ = np.linalg.lstsq(a / y[:, None], np.ones_like(y), rcond=None)
    short = {int(p["decode_rows"]): p for p in points if p["decode_rows"] and not p["long"]}
    long = {int(p["decode_rows"]): p for p in points if p["decode_rows"] and p["long"]}
    per_context = float(np.median([max(long[r]["seconds"] - short[r]["seconds"], 0.0)
                                   / (long[r]["context_tokens"] - short[r]["context_tokens"]) for r in short]))
    rows = sorted(short)
    info = engine.model_info()
    model_fit = CostModel(max(float(fixed), 0.0), max(float(per_token), 0.0), max(float(per_attention), 0.0), tuple(rows),
                          tuple(max(short[r]["seconds"] - per_context * short[r]["context_tokens"], 0.0) for r in rows),
                          per_context, num_blocks=engine.kv.num_blocks,
                          description=f"{info.architecture} {info.dtype} {Path(info.model_path).name}, "
                                      f"threads {engine.config.num_threads or 'all'}, fitted {time.strftime('%Y-%m-%d')}")
    for p in points:
        p["predicted"] = model_fit.step_seconds(int(p["prefill_tokens"]), int(p["decode_rows"]),
                                                int(p["context_tokens"]), p["attention"])
    return model_fit, points


@dataclass
class _Track:
    """What the simulation records of one request."""

    index: int
    arrival: float
    input_len: int
    output_len: int
    tenant: str | None
    priority: int
    slo_class: str | None
    token_times: list[float] = field(default_factory=list)
    finished: float | None = None


class _Replica:
    def __init__(self, index: int, config: Any, num_blocks: int, cost: CostModel) -> None:
        from loom.kvcache import KVCacheManager
        from loom.scheduler import Scheduler, policy_from_config

        self.index = index
        self.kv = KVCacheManager(num_blocks, config.cache.block_size, config.cache.enable_prefix_caching)
        self.kv.pool.track_events()
        self.scheduler = Scheduler(config.scheduler, self.kv, (), policy_from_config(config.scheduler))
        self.cost = cost
        self.busy = False

    def has_work(self) -> bool:
        return bool(self.scheduler.running or self.scheduler.waiting)

    def plan(self) -> tuple[Any, float] | None:
        plan = self.scheduler.schedule()
        if not plan.scheduled:
            return None
        prefill = decode_rows = context = 0
        attention = 0.0
        for s in plan.scheduled:
            if s.num_new_tokens == 1 and s.start >= s.request.num_tokens - 1:
                decode_rows += 1
                context += s.start
            else:
                prefill += s.num_new_tokens
                attention += s.num_new_tokens * (s.start + s.num_new_tokens / 2)
        return plan, self.cost.step_seconds(prefill, decode_rows, context, attention)


class Simulation:
    """Discrete-event replay: arrivals, step ends and handoffs, in time order."""

    def __init__(self, config: Any, cost: CostModel, replicas: int, prefill_replicas: int, router: Any,
                 num_blocks: int) -> None:
        from loom.cluster.router import Router

        self.config = config
        self.cost = cost
        self.replicas = [_Replica(i, config, num_blocks, cost) for i in range(replicas)]
        self.prefill = range(prefill_replicas or replicas)
        self.decode = range(prefill_replicas, replicas)
        self.disaggregated = prefill_replicas > 0
        self.router = Router(router, replicas, config.cache.block_size)
        self._events: list[tuple[float, int, str, Any]] = []
        self._seq = itertools.count()
        self.tracks: dict[str, _Track] = {}
        self.handoffs = 0

    def _push(self, t: float, kind: str, payload: Any) -> None:
        heapq.heappush(self._events, (t, next(self._seq), kind, payload))

    def run(self, workload: Sequence[Any], tokens: Sequence[list[int]]) -> float:
        from loom.kvcache import chain_hashes
        from loom.request import Request
        from loom.sampling import SamplingParams

        for i, (r, ids) in enumerate(zip(workload, tokens, strict=True)):
            self._push(r.arrival, "arrive", (i, r, ids))
        now = 0.0
        while self._events:
            now, _, kind, payload = heapq.heappop(self._events)
            if kind == "arrive":
                i, r, ids = payload
                rid = f"r{i}"
                self.tracks[rid] = _Track(i, r.arrival, r.input_len, r.output_len, r.tenant, r.priority, r.slo_class)
                params = SamplingParams(max_tokens=r.output_len, ignore_eos=True)
                req = Request(rid, ids, params, arrival_time=now, priority=r.priority, tenant=r.tenant,
                              slo_class=r.slo_class, max_total_tokens=len(ids) + r.output_len)
                route = self.router.request(rid, r.tenant, ids, chain_hashes(ids, self.router.block_size), r.output_len)
                replica = self.router.choose(route, among=self.prefill)  # every replica, or the prefill ones
                self.router.routed(route, replica)
                self._admit(self.replicas[replica.index], req, now)
            elif kind == "step":
                self._step_end(payload[0], payload[1], now)
            elif kind == "adopt":
                target, req = payload
                self._admit(target, req, now)
        return now

    def _admit(self, replica: _Replica, req: Any, now: float) -> None:
        replica.scheduler.add(req)
        if not replica.busy:
            self._start(replica, now)

    def _start(self, replica: _Replica, now: float) -> None:
        planned = replica.plan() if replica.has_work() else None
        replica.busy = planned is not None
        if planned is not None:
            plan, seconds = planned
            self._push(now + seconds, "step", (replica, plan))

    def _step_end(self, replica: _Replica, plan: Any, now: float) -> None:
        from loom.step import RequestResult, StepResult

        results = {s.request.request_id: RequestResult(token_ids=(1 + next(self._seq) % _TOKEN_SPACE,))
                   for s in plan.scheduled if s.sample}
        changed = replica.scheduler.update(plan, StepResult(results, now))
        s = replica.kv.num_free_blocks
        self.router.reported(replica.index, 1 - s / max(replica.kv.num_blocks, 1), replica.kv.pool.take_events())
        for req in changed:
            track = self.tracks[req.request_id]
            made = len(req.output_token_ids) - len(track.token_times)
            track.token_times += [now] * made
            self.router.progressed(req.request_id, len(req.output_token_ids))
            if req.is_finished:
                track.finished = now
                self.router.finished(req.request_id, learn=True)
            elif self.disaggregated and replica.index in self.prefill:
                self._hand_off(replica, req, now)
        self._start(replica, now)

    def _hand_off(self, source: _Replica, req: Any, now: float) -> None:
        """Move ``req`` after its first token, as a real prefill replica does."""
        from loom.cluster.router import least_load
        from loom.request import Request

        source.scheduler.finish(req, "abort")
        open_ = self.router.open(self.decode)
        target = self.replicas[least_load(open_).index]
        self.router.moved(req.request_id, self.router.replicas[target.index])
        bs = target.kv.block_size
        computed = req.num_tokens - 1
        rows, blocks = target.kv.adopt_blocks(req.prompt_token_ids + req.output_token_ids, 0, computed // bs)
        target.kv.release_adopted(blocks)
        moved = Request(req.request_id, req.prompt_token_ids, req.params, arrival_time=req.arrival_time,
                        priority=req.priority, tenant=req.tenant, slo_class=req.slo_class,
                        max_total_tokens=req.max_total_tokens)
        moved.output_token_ids = list(req.output_token_ids)
        moved.metrics.first_scheduled_time = req.metrics.first_scheduled_time
        moved.num_served_prompt_tokens = req.num_prompt_tokens
        moved.adopted_tail = (computed // bs, computed % bs, None)
        self.handoffs += 1
        self._push(now + self.cost.transfer_per_token * computed, "adopt", (target, moved))


def prompt_tokens(workload: Sequence[Any]) -> list[list[int]]:
    """Token ids for each request: a block of a hash id is the same tokens wherever it appears (so
    the prefix cache sees the trace's sharing); the rest of a prompt is its own."""
    out = []
    for i, r in enumerate(workload):
        ids: list[int] = []
        for h in r.hash_ids:
            ids += [(h * 1_000_003 + j) % _TOKEN_SPACE for j in range(r.block_tokens)]
        rest = r.input_len - len(ids)
        ids = ids[: r.input_len] + [(_TOKEN_SPACE + i * 7919 + j) % (1 << 31) for j in range(max(rest, 0))]
        out.append(ids)
    return out


def records(tracks: dict[str, _Track]) -> list[Any]:
    from loom.bench.client import RequestRecord

    out = []
    for t in sorted(tracks.values(), key=lambda t: t.index):
        done = t.finished is not None
        out.append(RequestRecord(
            index=t.index, scheduled=t.arrival, sent=t.arrival, finished=t.finished if done else t.arrival,
            chunk_times=tuple(t.token_times), prompt_len=t.input_len, max_tokens=t.output_len,
            prompt_tokens=t.input_len, output_tokens=len(t.token_times), usage_reported=True,
            finish_reason="length" if done else None, error=None if done else "did not finish in the simulation",
            tenant=t.tenant, priority=t.priority, slo_class=t.slo_class))
    return out


def add_args(p: argparse.ArgumentParser) -> None:
    from loom.bench.cli import add_slo_arg, add_trace_args
    from loom.cluster.router import ROUTERS

    add_trace_args(p)
    g = p.add_argument_group("simulation")
    g.add_argument("--fit", metavar="FILE", help="measure this machine's step costs with the real engine (the "
                                                 "engine options apply; use the replicas' --threads) and write the "
                                                 "cost model to FILE, then stop")
    g.add_argument("--cost-model", metavar="FILE", help="the cost model --fit wrote")
    g.add_argument("--replicas", type=int, default=2, help="simulated replicas (default 2)")
    g.add_argument("--prefill-replicas", type=int, default=0, help="of them, prefill only (default 0)")
    g.add_argument("--router", default="prefix", choices=tuple(ROUTERS), help="routing policy (default prefix)")
    g.add_argument("--router-config", default=None, metavar="FILE|JSON")
    g.add_argument("--compare", metavar="RUN", help="a `loom bench serve` run file of the same workload: print the "
                                                    "measured run beside the simulated one")
    add_slo_arg(g)
    g.add_argument("--output", "-o", help="write the simulated run as a run file (`loom bench compare` reads it)")


def main(args: argparse.Namespace, engine_opts: dict[str, Any]) -> int:
    from loom.bench import loader, results
    from loom.bench.client import RunResult
    from loom.bench.metrics import summarize
    from loom.bench.prepare import shaping, workload_spec
    from loom.bench.report import print_comparison, print_summary
    from loom.bench.workload import shape
    from loom.cluster.router import make_router
    from loom.engine import engine_config

    opts = {k: v for k, v in engine_opts.items() if v is not None}
    if args.fit:
        cost, points = fit_cost_model(args.model, opts)
        cost.save(args.fit)
        print(f"{'prefill tokens':>14} {'decode rows':>11} {'context':>8} {'measured ms':>12} {'fitted ms':>10}")
        for p in points:
            print(f"{p['prefill_tokens']:>14.0f} {p['decode_rows']:>11.0f} {p['context_tokens']:>8.0f} "
                  f"{p['seconds'] * 1e3:>12.2f} {p['predicted'] * 1e3:>10.2f}")
        print(f"cost model written to {args.fit}: {cost}")
        return 0
    if not args.cost_model:
        raise ValueError("loom bench simulate needs --cost-model FILE (write one with --fit FILE)")
    if args.replicas < 1 or not 0 <= args.prefill_replicas < args.replicas:
        raise ValueError("need --replicas >= 1 and 0 <= --prefill-replicas < --replicas")
    cost = CostModel.load(args.cost_model)
    opts.setdefault("num_blocks", cost.num_blocks or None)
    if not opts.get("num_blocks"):
        raise ValueError("give --num-blocks (the KV cache of one simulated replica)")
    config = engine_config(args.model, **opts)
    spec = workload_spec(args)
    if spec.kind == "sessions":
        raise ValueError("sessions workloads are not simulated (each turn depends on the last one's reply)")
    def count_tokens(text: str) -> int:  # ShareGPT prompts, with the model's tokenizer
        from loom.model.files import resolve_model
        from loom.tokenizer import Tokenizer

        nonlocal tokenizer
        tokenizer = tokenizer or Tokenizer.from_dir(resolve_model(args.model))
        return len(tokenizer.encode(text))

    tokenizer = None
    workload = shape(loader.load_workload(spec, count_tokens), shaping(args, spec))
    if not workload:
        raise ValueError("the workload is empty after shaping")
    sim = Simulation(config, cost, args.replicas, args.prefill_replicas, make_router(args.router, args.router_config),
                     config.cache.num_blocks)
    end = sim.run(workload, prompt_tokens(workload))
    recs = records(sim.tracks)
    result = RunResult(recs, max(end, 1e-9), time.time())
    slo: SLO = args.slo
    summary = summarize(result, slo)
    label = f"simulated {args.replicas} replicas" + (f" ({args.prefill_replicas} prefill)" if args.prefill_replicas else "")
    print_summary(label, summary)
    cached = sum(r.scheduler.prompt_tokens_cached for r in sim.replicas)
    admitted = sum(r.scheduler.prompt_tokens_admitted for r in sim.replicas)
    print(f"simulated prefix cache hit rate {cached / admitted:.1%}" if admitted else "", end="")
    print(f", handoffs {sim.handoffs}" if sim.disaggregated else "")
    if args.output:
        config_record = {"workload": args.workload, "simulated": True, "replicas": args.replicas,
                         "prefill_replicas": args.prefill_replicas, "router": args.router, "cost_model": asdict(cost)}
        results.save(args.output, config_record, summary, result)
    if args.compare:
        measured = results.load(args.compare)
        real = summarize(RunResult(list(measured.requests), measured.summary["duration_s"], 0.0), slo)
        print_comparison([f"measured ({Path(args.compare).name})", label], [real, summary])
        if real["goodput"]:
            print(f"simulated / measured goodput: {summary['goodput'] / real['goodput']:.3f}")
    return 0
