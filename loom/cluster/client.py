"""``ClusterClient``: an ``EngineClient`` over engine replicas that run as Ray actors.

The server talks to it exactly as to one in-process engine. Behind it, each request is tokenized
here, routed (``loom.cluster.router``) and submitted to one replica; the replica's output stream
comes back to the caller's event loop. All Ray traffic and all router state live on one thread
with its own event loop (``loom-router``), so the client serves callers on any loop, like
``AsyncEngine``.

A replica that dies fails its in-flight requests with ``EngineDeadError`` (a 503 for the server)
and leaves the routing at once; Ray restarts it (``max_restarts``) and it rejoins when it answers.

Requests move between replicas without the caller noticing (their stream goes on, no token lost
or repeated): with prefill replicas, every request after its first token; and by migration
(Llumnix), to drain a replica or to rebalance load. A migration copies the request's blocks while
it keeps running, then stops it, copies the blocks made meanwhile and resumes it on the target.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import threading
import time
import uuid
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import ray
from ray.exceptions import RayActorError, RayError

from loom.cluster.config import ClusterConfig
from loom.cluster.replica import Hello, Moved, OutputBatch, Refusal, Replica, Submit, refusal_error
from loom.cluster.router import ReplicaState, Router, least_load, make_router
from loom.cluster.stats import empty_stats, merge_stats
from loom.config import EngineConfig
from loom.engine import EngineDeadError, EngineStats, ModelInfo
from loom.engine.async_engine import check_prompt_type, prompt_ids
from loom.engine.client import OutputListener, StepListener, notify
from loom.engine.engine import EMBEDDING_PARAMS
from loom.kvcache import chain_hashes
from loom.model.files import resolve_model
from loom.outputs import RequestOutput
from loom.request import RequestTags
from loom.sampling import SamplingParams
from loom.tokenizer import Tokenizer

log = logging.getLogger(__name__)

T = TypeVar("T")

START_TIMEOUT = 600.0  # seconds for every replica to load its model
RECOVERY_POLL = 1.0  # seconds between tries to reach a replica Ray is restarting
SHUTDOWN_DRAIN = 5.0  # seconds for the final outputs of aborted requests to arrive
MAX_MOVE_RECORDS = 1000
MIN_TOKENS_TO_MIGRATE = 32  # rebalancing leaves alone requests predicted to end sooner


@dataclass(frozen=True)
class MoveRecord:
    """One request moved between replicas: ``kind`` is ``handoff`` (prefill to decode) or
    ``migration``. ``transfer_seconds``: copying the blocks out and publishing them, and the
    target fetching them (the final stage's, for a migration). ``downtime_seconds``: from the
    source being asked to stop the request (a migration's final stage; for a handoff, the export
    after its first token) to the target taking the handoff. The target's engine thread then
    writes the blocks and queues the request before its next step (in neither figure)."""

    request_id: str
    kind: str
    source: int
    target: int
    context_tokens: int
    kv_bytes: int  # all stages
    staged_blocks: int  # moved while it kept running (migration)
    final_blocks: int
    transfer_seconds: float
    downtime_seconds: float


@dataclass(eq=False)
class _Migration:
    target: ReplicaState
    staged_blocks: int
    staged_bytes: int
    final_start: float
    done: asyncio.Future[MoveRecord | None]


@dataclass(frozen=True)
class ReplicaSnapshot:
    """One replica as ``/metrics`` shows it."""

    index: int
    up: bool
    draining: bool
    restarts: int
    routed: int
    in_flight: int
    stats: EngineStats


@dataclass(eq=False)
class _Sink:
    """Where one request's outputs go: a queue on the caller's event loop."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput | BaseException] = field(default_factory=asyncio.Queue)
    replica: int = -1


@dataclass(eq=False)
class _Handle:
    index: int
    actor: Any
    epoch: str = ""
    restarts: int = 0
    stats: EngineStats = field(default_factory=empty_stats)
    reader: asyncio.Task[None] | None = None
    orphans: list[str] = field(default_factory=list)  # requests failed when it was lost


def start_ray(cluster: ClusterConfig, threads: int) -> bool:
    """Connect to ``cluster.ray_address``, or start a local Ray sized to this machine's cores.
    True if this call started it. ValueError when the replicas' CPUs exceed what Ray has."""
    started = False
    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        kwargs: dict[str, Any] = dict(include_dashboard=False, logging_level=logging.WARNING)
        if cluster.ray_address is None:
            kwargs["num_cpus"] = len(os.sched_getaffinity(0))
        ray.init(address=cluster.ray_address, **kwargs)
        started = True
    cpus = ray.cluster_resources().get("CPU", 0)
    need = cluster.replicas * threads
    if need > cpus:
        if started:
            ray.shutdown()
        raise ValueError(f"{cluster.replicas} replicas x {threads} threads need {need} CPUs but the Ray cluster has "
                         f"{cpus:g}; use fewer replicas or --replica-threads")
    return started


class ClusterClient:
    """Serve ``engine_config``'s model from ``cluster.replicas`` Ray actors behind a router."""

    def __init__(self, engine_config: EngineConfig, cluster: ClusterConfig) -> None:
        if engine_config.tensor_parallel_size > 1:
            raise ValueError("--replicas and --tensor-parallel-size > 1 do not combine yet: a replica's tensor-parallel "
                             "processes would run outside Ray's CPU accounting, and its KV blocks cannot move")
        self.cluster = cluster
        threads = cluster.replica_threads or max(1, len(os.sched_getaffinity(0)) // cluster.replicas)
        self._policy = make_router(cluster.router, cluster.router_config)
        model_dir = resolve_model(engine_config.model)  # an unknown model fails here, before Ray starts
        self.tokenizer = Tokenizer.from_dir(model_dir)
        self._owns_ray = start_ray(cluster, threads)
        replica_config = dataclasses.replace(engine_config, num_threads=threads)
        actor_class = ray.remote(Replica).options(num_cpus=threads, max_restarts=cluster.max_restarts,
                                                  max_task_retries=0)
        self._handles = [_Handle(i, actor_class.remote(replica_config)) for i in range(cluster.replicas)]
        try:
            hellos: list[Hello] = ray.get([h.actor.hello.remote() for h in self._handles], timeout=START_TIMEOUT)
        except Exception as e:
            self._kill_actors()
            if self._owns_ray:
                ray.shutdown()
            raise RuntimeError(f"a replica failed to start: {e}") from e
        for h, hello in zip(self._handles, hellos, strict=True):
            h.epoch = hello.epoch
        if cluster.disaggregated and not hellos[0].can_move:
            self._kill_actors()
            if self._owns_ray:
                ray.shutdown()
            raise ValueError("--prefill-replicas needs a KV cache whose blocks can move: an int4/int2 (KIVI) cache "
                             "cannot; use --kv-cache-dtype auto, bf16, fp32 or int8")
        self._model_info = hellos[0].model_info
        per_replica = hellos[0].max_waiting
        self.max_waiting = None if per_replica is None else per_replica * len(cluster.prefill)
        self.router = Router(self._policy, cluster.replicas, engine_config.cache.block_size)
        self._sinks: dict[str, _Sink] = {}  # router thread only
        self._listeners: tuple[OutputListener, ...] = ()
        self._step_listeners: tuple[StepListener, ...] = ()
        self._snapshots: tuple[ReplicaSnapshot, ...] = ()
        self._moves: deque[MoveRecord] = deque(maxlen=MAX_MOVE_RECORDS)
        self.move_totals: dict[str, list[float]] = {}  # kind -> [moves, kv bytes, transfer s, downtime s, tokens]
        self._migrating: dict[str, _Migration] = {}  # waiting for their final stage's Moved; router thread only
        self._moving: set[str] = set()  # ids with a migration under way, from its first stage
        self._unmovable: set[str] = set()  # ids a migration found it could not move (rebalancing skips them)
        self._in_transit: set[str] = set()  # left a replica, not yet adopted by another
        self._abort_on_arrival: set[str] = set()  # aborted while in transit
        self._background: set[asyncio.Task[Any]] = set()  # moves and rebalancing in progress
        self._rebalancing: asyncio.Task[Any] | None = None
        self._closed: EngineDeadError | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="loom-router", daemon=True)
        self._refresh()
        self._thread.start()
        for h in self._handles:
            self._loop.call_soon_threadsafe(self._start_reader, h)
        self._poller = asyncio.run_coroutine_threadsafe(self._poll(), self._loop)

    # -- EngineClient ---------------------------------------------------------------------------
    def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        *,
        priority: int = 0,
        tenant: str | None = None,
        slo_class: str | None = None,
        session_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        return self._outputs(prompt, params or SamplingParams(), request_id,
                             RequestTags(priority, tenant, slo_class, session_id), embed=False)

    async def embed(
        self,
        prompt: str | list[int],
        request_id: str | None = None,
        *,
        priority: int = 0,
        tenant: str | None = None,
        slo_class: str | None = None,
    ) -> RequestOutput:
        async with contextlib.aclosing(self._outputs(prompt, EMBEDDING_PARAMS, request_id,
                                                     RequestTags(priority, tenant, slo_class), embed=True)) as outputs:
            return [out async for out in outputs][-1]

    async def abort(self, request_id: str) -> None:
        """Stop a request; its stream ends with finish_reason "abort" (a no-op for unknown ids)."""
        await self._await_router(self._abort(request_id))

    def add_listener(self, listener: OutputListener) -> None:
        """Called on the router thread with every batch of outputs that arrives."""
        self._listeners = (*self._listeners, listener)

    def add_step_listener(self, listener: StepListener) -> None:
        """Called on the router thread with the replicas' step timings, as they are reported."""
        self._step_listeners = (*self._step_listeners, listener)

    def stats(self) -> EngineStats:
        """Summed over the replicas that are up, as of their latest reports."""
        return merge_stats([s.stats for s in self._snapshots if s.up])

    def replica_snapshots(self) -> tuple[ReplicaSnapshot, ...]:
        return self._snapshots

    def move_records(self) -> tuple[MoveRecord, ...]:
        """The latest moves (at most MAX_MOVE_RECORDS), oldest first."""
        return tuple(self._moves)

    async def migrate(self, request_id: str, target: int | None = None) -> MoveRecord | None:
        """Move a running request to replica ``target`` (None: the least loaded other replica that
        decodes); None if it finished first. ValueError for an unknown id or target."""
        return await self._await_router(self._migrate(request_id, target))

    async def drain(self, replica: int) -> list[MoveRecord]:
        """Stop routing to ``replica`` and migrate its running requests away (those that cannot move,
        ``n`` > 1, finish there); ``resume`` routes to it again."""
        return await self._await_router(self._drain(replica))

    async def resume(self, replica: int) -> None:
        await self._await_router(self._resume(replica))

    def model_info(self) -> ModelInfo:
        return self._model_info

    @property
    def is_running(self) -> bool:
        """Serving: not shut down, and at least one replica up."""
        return self._closed is None and any(s.up for s in self._snapshots)

    def shutdown(self, timeout: float | None = 30.0) -> None:
        """Abort what is in flight (streams end with finish_reason "abort"), stop the replicas and,
        if this client started Ray, Ray."""
        if self._closed is not None:
            return
        self._closed = EngineDeadError("the server is shut down")
        try:
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout)
        except Exception:  # a replica that does not answer: it is killed below anyway
            log.exception("shutting the replicas down failed")
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self._loop.close()
        self._kill_actors()
        if self._owns_ray:
            ray.shutdown()

    # -- caller side ----------------------------------------------------------------------------
    async def _outputs(self, prompt: str | list[int], params: SamplingParams, request_id: str | None,
                       tags: RequestTags, embed: bool) -> AsyncIterator[RequestOutput]:
        check_prompt_type(prompt)
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        if self._closed is not None:
            raise self._closed
        ids = await prompt_ids(prompt, self.tokenizer, self._model_info.max_model_len)
        if ids is None:
            ids = [] if isinstance(prompt, str) else prompt  # an empty text prompt: the replica refuses it
        msg = Submit(request_id or uuid.uuid4().hex, prompt, ids, params, tags, embed)
        sink = _Sink(asyncio.get_running_loop())
        finished = False
        try:
            await self._await_router(self._dispatch(msg, sink))
            while not finished:
                item = await sink.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished and self._loop.is_running():
                self._loop.call_soon_threadsafe(self._forget, msg.request_id, sink)

    async def _await_router(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._closed is not None or self._loop.is_closed():
            coro.close()
            raise EngineDeadError("the server is shut down")
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))

    # -- router thread --------------------------------------------------------------------------
    async def _dispatch(self, msg: Submit, sink: _Sink) -> None:
        if msg.request_id in self._sinks:
            raise ValueError(f"request id {msg.request_id!r} is already in flight")
        hashes = chain_hashes(msg.prompt_token_ids, self.router.block_size)
        request = self.router.request(msg.request_id, msg.tags.tenant, msg.prompt_token_ids, hashes,
                                      msg.params.max_tokens)
        # Prefill replicas take what they hand off, and what ends at its prompt or first token (embeddings,
        # max_tokens 0 or 1); what cannot move (n or best_of > 1, prompt_logprobs) runs where it decodes.
        prefill_only = msg.embed or msg.params.max_tokens in (0, 1)
        hand_off = (self.cluster.disaggregated and msg.params.num_samples == 1 and not prefill_only
                    and msg.params.prompt_logprobs is None)
        among = self.cluster.prefill if hand_off or prefill_only else self.cluster.decode
        if hand_off:
            msg = dataclasses.replace(msg, hand_off=True)
        tried: set[int] = set()
        while True:
            replica = self.router.choose(request, frozenset(tried), among)
            if replica is None:
                raise EngineDeadError(f"no replica is serving (all {len(among)} that could take this request are "
                                      "down, restarting or draining); retry later")
            sink.replica = replica.index
            self._sinks[msg.request_id] = sink
            self.router.routed(request, replica)
            self._refresh()
            try:
                await self._handles[replica.index].actor.submit.remote(msg)
                return
            except RayActorError as e:
                self._sinks.pop(msg.request_id, None)
                self._ended(msg.request_id, learn=False)
                self._lost(replica.index, e)
                tried.add(replica.index)
                sink.queue = asyncio.Queue()  # not the lost replica's error, which may be on its way to the old one

    async def _abort(self, request_id: str) -> None:
        sink = self._sinks.get(request_id)
        if sink is None:
            return
        if request_id in self._in_transit:  # between two replicas: the target aborts it once it has it
            self._abort_on_arrival.add(request_id)
            return
        with contextlib.suppress(RayActorError):
            await self._handles[sink.replica].actor.abort.remote(request_id)

    def _ended(self, request_id: str, learn: bool) -> None:
        self.router.finished(request_id, learn)
        self._unmovable.discard(request_id)

    def _forget(self, request_id: str, sink: _Sink) -> None:
        """The caller of ``sink`` stopped reading: cancel its request on its replica."""
        if self._sinks.get(request_id) is not sink:
            return  # it ended already, or the id was another caller's (a refused duplicate)
        del self._sinks[request_id]
        self._ended(request_id, learn=False)
        self._refresh()
        self._handles[sink.replica].actor.cancel.remote(request_id)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = self._loop.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._finished_background)
        return task

    def _finished_background(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("a cluster task failed", exc_info=task.exception())

    # -- moving requests ------------------------------------------------------------------------
    async def _move(self, source: int, request_id: str, moved: Moved) -> None:
        """A request left ``source`` (its last outputs there came before this): adopt it elsewhere."""
        try:
            await self._adopt(source, request_id, moved)
        finally:
            self._in_transit.discard(request_id)
            if request_id in self._abort_on_arrival:
                self._abort_on_arrival.discard(request_id)
                await self._abort(request_id)

    async def _adopt(self, source: int, request_id: str, moved: Moved) -> None:
        migration = self._migrating.pop(request_id, None)
        sink = self._sinks.get(request_id)
        started = migration.final_start if migration else time.monotonic() - moved.export_seconds
        if sink is None:  # the caller is gone: nothing to continue
            if migration is not None:
                _resolve(migration.done, None)
            return
        target = migration.target if migration else self._decode_target(exclude=source)
        tried: set[int] = set()
        while True:
            if target is None:
                self._fail(request_id, EngineDeadError("no decode replica can take the request (all are down or "
                                                       "draining); the request was lost, retry it"))
                break
            t0 = time.monotonic()
            try:
                await self._handles[target.index].actor.adopt.remote(moved.handoff)
            except RayActorError as e:
                self._lost(target.index, e)
                tried.add(target.index)
                target = self._decode_target(exclude=source, also=tried)
                continue
            except RayError as e:  # the handoff itself is gone (its source died)
                self._fail(request_id, EngineDeadError(f"moving the request from replica {source} failed "
                                                       f"({type(e).__name__}); the request was lost, retry it"))
                target = None
                break
            done = time.monotonic()
            sink.replica = target.index
            self.router.moved(request_id, target)
            self._refresh()
            if request_id not in self._sinks:  # the caller left while it moved
                self._handles[target.index].actor.cancel.remote(request_id)
            kind = "migration" if migration else "handoff"
            staged = (migration.staged_blocks, migration.staged_bytes) if migration else (0, 0)
            record = MoveRecord(request_id, kind, source, target.index, moved.num_tokens, moved.kv_bytes + staged[1],
                                staged[0], moved.num_blocks, moved.export_seconds + (done - t0), done - started)
            self._moves.append(record)
            totals = self.move_totals.setdefault(kind, [0, 0, 0.0, 0.0, 0])
            for i, v in enumerate((1, record.kv_bytes, record.transfer_seconds, record.downtime_seconds,
                                   record.context_tokens)):
                totals[i] += v
            if migration is not None:
                _resolve(migration.done, record)
            return
        if migration is not None:
            _resolve(migration.done, None)

    def _decode_target(self, exclude: int, also: set[int] = frozenset()) -> ReplicaState | None:
        candidates = [r for r in self.router.open(self.cluster.decode) if r.index != exclude and r.index not in also]
        return least_load(candidates) if candidates else None

    def _fail(self, request_id: str, error: BaseException) -> None:
        sink = self._sinks.pop(request_id, None)
        self._ended(request_id, learn=False)
        if sink is not None:
            with contextlib.suppress(RuntimeError):
                sink.loop.call_soon_threadsafe(sink.queue.put_nowait, error)

    async def _migrate(self, request_id: str, target: int | None) -> MoveRecord | None:
        source = self.router.replica_of(request_id)
        if source is None:
            raise ValueError(f"no request {request_id!r} is running")
        if request_id in self._moving:
            raise ValueError(f"request {request_id!r} is already moving")
        if target is None:
            chosen = self._decode_target(exclude=source.index)
            if chosen is None:
                raise ValueError("no other replica can take the request")
        else:
            if not 0 <= target < len(self._handles) or target == source.index:
                raise ValueError(f"replica {target} is not another replica (0..{len(self._handles) - 1})")
            chosen = self.router.replicas[target]
            if not chosen.healthy or chosen.draining or target not in self.cluster.decode:
                raise ValueError(f"replica {target} cannot take the request (down, draining, or a prefill replica)")
        self._moving.add(request_id)
        try:
            return await self._stages(request_id, source, chosen)
        except RayError as e:
            raise EngineDeadError(f"migrating request {request_id!r} failed ({type(e).__name__}); it runs on where "
                                  "it was, unless its replica died") from None
        finally:
            self._moving.discard(request_id)

    async def _stages(self, request_id: str, source: ReplicaState, target: ReplicaState) -> MoveRecord | None:
        actor = self._handles[source.index].actor
        stage = await actor.migrate_out.remote(request_id, 0, False)
        if stage is None:
            self._unmovable.add(request_id)
            return None  # it finished, or it cannot move (n > 1)
        await self._handles[target.index].actor.import_blocks.remote(stage.handoff)
        migration = _Migration(target, stage.num_blocks, stage.kv_bytes, time.monotonic(), self._loop.create_future())
        self._migrating[request_id] = migration
        stopped = await actor.migrate_out.remote(request_id, stage.num_blocks, True)  # then Moved on the stream
        if stopped is None and self._migrating.get(request_id) is migration:  # it finished first: no Moved
            del self._migrating[request_id]
            _resolve(migration.done, None)
        return await asyncio.shield(migration.done)

    async def _drain(self, replica: int) -> list[MoveRecord]:
        if not 0 <= replica < len(self._handles):
            raise ValueError(f"no replica {replica} (0..{len(self._handles) - 1})")
        self.router.replicas[replica].draining = True
        self._refresh()
        records = []
        for request_id in self.router.in_flight_on(replica):
            try:
                record = await self._migrate(request_id, None)
            except (ValueError, EngineDeadError) as e:  # finished, moving already, or no target: the rest still go
                log.warning("draining replica %d: request %r not migrated: %s", replica, request_id, e)
                continue
            if record is not None:
                records.append(record)
        return records

    async def _resume(self, replica: int) -> None:
        if not 0 <= replica < len(self._handles):
            raise ValueError(f"no replica {replica} (0..{len(self._handles) - 1})")
        self.router.replicas[replica].draining = False
        self._refresh()

    def _rebalance(self) -> None:
        """Start one migration from the busiest decode replica to the least busy when they differ by
        ``rebalance_gap`` requests: its request with the least context (the cheapest to move) among
        those predicted to make MIN_TOKENS_TO_MIGRATE more tokens (moving one about to end buys nothing)."""
        if self._rebalancing is not None and not self._rebalancing.done():
            return
        open_ = self.router.open(self.cluster.decode)
        if len(open_) < 2:
            return
        busiest = max(open_, key=lambda r: (r.in_flight, -r.index))
        idlest = least_load(open_)
        if busiest.in_flight - idlest.in_flight < self.cluster.rebalance_gap:
            return
        candidates = [rid for rid in self.router.in_flight_on(busiest.index)
                      if rid not in self._moving and rid not in self._unmovable
                      and self.router.remaining_tokens(rid) >= MIN_TOKENS_TO_MIGRATE]
        if candidates:
            request_id = min(candidates, key=self.router.context_tokens)
            self._rebalancing = self._spawn(self._migrate_quietly(request_id, idlest.index))

    async def _migrate_quietly(self, request_id: str, target: int) -> None:
        try:
            await self._migrate(request_id, target)
        except (ValueError, EngineDeadError) as e:
            log.info("rebalancing migration of %r skipped: %s", request_id, e)

    def _start_reader(self, handle: _Handle) -> None:
        handle.reader = self._loop.create_task(self._read(handle))

    async def _read(self, handle: _Handle) -> None:
        try:
            async for ref in handle.actor.outputs.remote():
                self._deliver(handle.index, await ref)
        except RayActorError as e:
            self._lost(handle.index, e)
        except Exception as e:  # the stream broke some other way: treat the replica as lost
            log.exception("reading replica %d failed", handle.index)
            self._lost(handle.index, e)

    def _deliver(self, index: int, batch: OutputBatch) -> None:
        outputs = [item for _, item in batch if isinstance(item, RequestOutput)]
        if outputs:
            notify(self._listeners, outputs)
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Sink, RequestOutput | BaseException]]] = defaultdict(list)
        before = len(self._sinks)
        for request_id, item in batch:
            if isinstance(item, Moved):  # even when its caller is gone: a migration waits on it
                self._in_transit.add(request_id)
                self._spawn(self._move(index, request_id, item))
                continue
            sink = self._sinks.get(request_id)
            if sink is None:
                continue
            if isinstance(item, Refusal):
                del self._sinks[request_id]
                self.router.refused(request_id)
                self._ended(request_id, learn=False)
                by_loop[sink.loop].append((sink, refusal_error(item, index)))
                continue
            self.router.progressed(request_id, item.num_generated_tokens)
            if item.finished:
                del self._sinks[request_id]
                self._ended(request_id, learn=all(c.finish_reason != "abort" for c in item.outputs))
            by_loop[sink.loop].append((sink, item))
        if len(self._sinks) < before:
            self._refresh()
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # that caller's loop is closed: nobody reads
                loop.call_soon_threadsafe(_put_all, items)

    def _lost(self, index: int, error: BaseException) -> None:
        """Replica ``index`` stopped answering: fail its requests, stop routing to it, and wait for
        Ray to bring it back."""
        replica = self.router.replicas[index]
        if not replica.healthy:
            return
        log.error("replica %d stopped serving: %s", index, error)
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        dead = EngineDeadError(f"replica {index} stopped serving ({reason[:200]}); the request was lost, retry it")
        handle = self._handles[index]
        handle.orphans = self.router.replica_lost(index)
        self._refresh()  # before the callers hear of it: one that looks at the replicas sees it down
        for request_id in handle.orphans:
            sink = self._sinks.pop(request_id, None)
            if sink is not None:
                with contextlib.suppress(RuntimeError):
                    sink.loop.call_soon_threadsafe(sink.queue.put_nowait, dead)
            migration = self._migrating.pop(request_id, None)
            if migration is not None:
                _resolve(migration.done, None)
            self._unmovable.discard(request_id)
        if handle.reader is not None and handle.reader is not asyncio.current_task():
            handle.reader.cancel()
        if self._closed is None:
            self._spawn(self._recover(handle))

    async def _recover(self, handle: _Handle) -> None:
        while self._closed is None:
            await asyncio.sleep(RECOVERY_POLL)
            try:
                hello: Hello = await handle.actor.hello.remote()
            except RayActorError:
                continue
            if hello.epoch != handle.epoch:
                handle.restarts += 1
            else:
                # The same process was only out of reach: stop what it still runs for callers that
                # got an error, and have it report its whole prefix cache (the index forgot it).
                for request_id in handle.orphans:
                    handle.actor.cancel.remote(request_id)
                await handle.actor.resync.remote()
            handle.orphans = []
            handle.epoch = hello.epoch
            handle.stats = empty_stats()
            self.router.replicas[handle.index].healthy = True
            self._start_reader(handle)
            log.warning("replica %d is serving again (restarts: %d)", handle.index, handle.restarts)
            self._refresh()
            return

    async def _poll(self) -> None:
        while self._closed is None:
            try:
                await asyncio.gather(*(self._report(h) for h in self._handles
                                       if self.router.replicas[h.index].healthy))
                self._refresh()
                if self.cluster.rebalance:
                    self._rebalance()
            except Exception:  # keep reporting: stats, the prefix index and failure detection depend on it
                log.exception("reading the replicas' reports failed")
            await asyncio.sleep(self.cluster.report_interval)

    async def _report(self, handle: _Handle) -> None:
        try:
            report = await handle.actor.report.remote()
        except RayActorError as e:
            self._lost(handle.index, e)
            return
        except RayError as e:
            log.warning("replica %d did not report: %s", handle.index, e)
            return
        if report.epoch != handle.epoch:  # restarted between two reads: what it held is gone
            self._lost(handle.index, RuntimeError("it restarted"))
            return
        handle.stats = s = report.stats
        self.router.reported(handle.index, 1 - s.num_free_blocks / max(s.num_blocks, 1), report.prefix)
        for timing in report.steps:
            notify(self._step_listeners, timing)

    def _refresh(self) -> None:
        """Publish the replicas' snapshots for other threads (``stats``, ``/metrics``): after each
        report, and when a request is routed or ends."""
        self._snapshots = tuple(
            ReplicaSnapshot(h.index, r.healthy, r.draining, h.restarts, r.routed, r.in_flight, h.stats)
            for h, r in zip(self._handles, self.router.replicas, strict=True))

    async def _shutdown(self) -> None:
        await asyncio.gather(*(h.actor.shutdown.remote() for h in self._handles), return_exceptions=True)
        deadline = time.monotonic() + SHUTDOWN_DRAIN
        while self._sinks and time.monotonic() < deadline:  # the aborted requests' final outputs
            await asyncio.sleep(0.01)
        for request_id in list(self._sinks):
            sink = self._sinks.pop(request_id)
            with contextlib.suppress(RuntimeError):
                sink.loop.call_soon_threadsafe(sink.queue.put_nowait, EngineDeadError("the server is shut down"))
        self._poller.cancel()
        for h in self._handles:
            if h.reader is not None:
                h.reader.cancel()

    def _kill_actors(self) -> None:
        for h in self._handles:
            with contextlib.suppress(Exception):
                ray.kill(h.actor, no_restart=True)



def _resolve(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():  # its waiter may have been cancelled
        future.set_result(value)


def _put_all(items: list[tuple[_Sink, RequestOutput | BaseException]]) -> None:
    for sink, item in items:
        sink.queue.put_nowait(item)
