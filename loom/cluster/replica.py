"""One engine replica: the body of a Ray actor (``ray.remote(Replica)``), a plain class otherwise.

A replica runs an ``AsyncEngine`` in its own process. The front end hands it requests with
``submit`` and reads every request's outputs from one stream (``outputs``), a batch per wake-up of
the replica's event loop, rather than one Ray stream per request: one object crosses processes
per engine step, whatever the batch size. ``report`` returns what the router needs between
requests: the engine's stats, step timings and the changes of its prefix cache.

Requests also move between replicas (``loom.engine.handoff``): a prefill replica hands each
request off after its first token, and a running request migrates in stages (``migrate_out``).
The last stage's handoff comes on the output stream, after the request's last outputs here, as a
``Moved`` whose handoff is a Ray object the target fetches directly (``adopt``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from loom.config import EngineConfig
from loom.engine import AsyncEngine, Engine, EngineDeadError, EngineOverloadedError, EngineStats, ModelInfo, StepTiming
from loom.engine.async_engine import RequestMovedError
from loom.engine.handoff import Handoff
from loom.kvcache import PrefixEvents
from loom.outputs import RequestOutput
from loom.request import RequestTags
from loom.sampling import SamplingParams

log = logging.getLogger(__name__)

MAX_STEP_TIMINGS = 4096  # kept between two reports; older ones are dropped


@dataclass(frozen=True)
class Submit:
    request_id: str
    prompt: str | list[int]
    prompt_token_ids: list[int]
    params: SamplingParams
    tags: RequestTags
    embed: bool = False
    hand_off: bool = False  # a prefill replica's request: moves (``Moved``) after its first token


@dataclass(frozen=True)
class Refusal:
    """Why a replica did not run (or could not finish) a request: ``kind`` is ``invalid`` (a
    ValueError: bad prompt or parameters), ``overloaded`` (its queue is full) or ``dead``."""

    kind: str
    message: str


@dataclass(frozen=True)
class Moved:
    """The request left this replica: ``handoff`` (a Ray object ref of a ``Handoff``, or the handoff
    itself outside Ray) is for the target's ``adopt``."""

    handoff: Any
    num_tokens: int  # its context: prompt and output so far
    num_blocks: int  # blocks in this stage
    kv_bytes: int
    export_seconds: float  # copying its blocks out and publishing them


@dataclass(frozen=True)
class Stage:
    """A stage of a migration: blocks for the target's ``import_blocks`` (a Ray object ref, or the
    handoff itself outside Ray; None for the final stage, whose handoff comes as ``Moved``)."""

    handoff: Any
    num_blocks: int
    kv_bytes: int


@dataclass(frozen=True)
class Hello:
    epoch: str  # new each time the replica (re)starts
    model_info: ModelInfo
    max_waiting: int | None
    can_move: bool  # its requests' KV blocks can move (Engine.blocks_cannot_move)


@dataclass(frozen=True)
class Report:
    epoch: str
    stats: EngineStats
    steps: tuple[StepTiming, ...]
    prefix: PrefixEvents


OutputBatch = list[tuple[str, RequestOutput | Refusal | Moved]]


class Replica:
    def __init__(self, config: EngineConfig, in_ray: bool = True) -> None:
        """``in_ray``: handoffs are published as Ray objects (``ray.put``); else passed as they are."""
        self.epoch = uuid.uuid4().hex
        self._publish: Callable[[Handoff], Any] = (lambda h: h)
        if in_ray:
            import ray

            self._publish = ray.put

        def build() -> Engine:
            engine = Engine(config)
            engine.kv.pool.track_events()
            return engine

        self.engine = AsyncEngine(build)
        self._steps: deque[StepTiming] = deque(maxlen=MAX_STEP_TIMINGS)
        self.engine.add_step_listener(self._steps.append)
        self._pending: OutputBatch = []
        self._ready: asyncio.Event | None = None  # the reader's, set when _pending has outputs
        self._tasks: dict[str, asyncio.Task[None]] = {}  # each request's; asyncio keeps only weak references

    def hello(self) -> Hello:
        return Hello(self.epoch, self.engine.model_info(), self.engine.max_waiting,
                     self.engine.engine.blocks_cannot_move is None)

    async def submit(self, msg: Submit) -> None:
        """Start a request; its outputs (or a Refusal) come on ``outputs``."""
        self._start(msg.request_id, self._run(msg))

    async def adopt(self, handoff: Handoff) -> None:
        """Continue a request another replica handed off; its outputs come on ``outputs``."""
        self._start(handoff.request_id, self._pump(handoff.request_id, self.engine.adopt(handoff)))

    async def import_blocks(self, handoff: Handoff) -> int:
        """An early stage of a migration: the blocks into this replica's prefix cache."""
        return await self.engine.import_blocks(handoff)

    async def migrate_out(self, request_id: str, start_block: int, final: bool) -> Stage | None:
        """A stage of moving a running request away: its blocks from ``start_block`` on. An early
        stage returns them (it keeps running here); the final one stops it, and its handoff comes
        on ``outputs`` as ``Moved`` (the Stage returned then has no handoff). None when the request
        is not here or cannot move (it finished meanwhile, or it has ``n`` > 1)."""
        if request_id not in self._tasks:
            return None
        try:
            handoff = await self.engine.export(request_id, start_block, stop=final)
        except ValueError:
            return None
        return Stage(None if final else self._publish(handoff), handoff.num_blocks, handoff.kv_bytes)

    async def abort(self, request_id: str) -> None:
        """Stop a request; its outputs end with finish_reason "abort"."""
        await self.engine.abort(request_id)

    def cancel(self, request_id: str) -> None:
        """The caller is gone: stop the request (even before the engine has it) and send nothing more."""
        task = self._tasks.get(request_id)
        if task is not None:
            task.cancel()

    async def outputs(self) -> AsyncIterator[OutputBatch]:
        """Every request's outputs, in batches, for as long as the caller reads (one reader: a new
        call takes over from the last)."""
        self._ready = ready = asyncio.Event()
        if self._pending:
            ready.set()
        while True:
            await ready.wait()
            ready.clear()
            batch, self._pending = self._pending, []
            if batch:
                yield batch

    def report(self) -> Report:
        steps = tuple(self._steps.popleft() for _ in range(len(self._steps)))
        return Report(self.epoch, self.engine.stats(), steps, self.engine.engine.kv.pool.take_events())

    def resync(self) -> None:
        """Report the whole prefix cache next time (the router lost its copy)."""
        self.engine.engine.kv.pool.track_events()

    def shutdown(self) -> None:
        self.engine.shutdown()

    # -- internals ------------------------------------------------------------------------------
    def _start(self, request_id: str, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks[request_id] = task
        task.add_done_callback(functools.partial(self._ended, request_id))

    def _ended(self, request_id: str, task: asyncio.Task[None]) -> None:
        """Drop a request's task when it ends, even one cancelled before it started running."""
        if self._tasks.get(request_id) is task:
            del self._tasks[request_id]

    def _push(self, request_id: str, item: RequestOutput | Refusal | Moved) -> None:
        self._pending.append((request_id, item))
        if self._ready is not None:
            self._ready.set()

    async def _run(self, msg: Submit) -> None:
        t = msg.tags
        if msg.embed:
            async def embedding() -> AsyncIterator[RequestOutput]:
                yield await self.engine.embed(msg.prompt, msg.request_id, priority=t.priority, tenant=t.tenant,
                                              slo_class=t.slo_class, prompt_token_ids=msg.prompt_token_ids)

            await self._pump(msg.request_id, embedding())
            return
        outputs = self.engine.generate(msg.prompt, msg.params, msg.request_id, priority=t.priority, tenant=t.tenant,
                                       slo_class=t.slo_class, session_id=t.session_id,
                                       prompt_token_ids=msg.prompt_token_ids)
        await self._pump(msg.request_id, outputs, hand_off=msg.hand_off)

    async def _pump(self, request_id: str, outputs: AsyncIterator[RequestOutput], hand_off: bool = False) -> None:
        """Push a request's outputs to the stream; with ``hand_off``, export it after its first token."""
        try:
            async for out in outputs:
                self._push(request_id, out)
                if hand_off and out.num_generated_tokens and not out.finished:
                    hand_off = False
                    try:
                        await self.engine.export(request_id, stop=True)
                    except ValueError:  # it finished meanwhile: its last output follows
                        pass
        except RequestMovedError as e:
            t0 = time.perf_counter()
            h = e.handoff
            ref = self._publish(h)
            self._push(request_id, Moved(ref, len(h.token_ids), h.num_blocks, h.kv_bytes,
                                         h.copy_seconds + time.perf_counter() - t0))
        except ValueError as e:
            self._push(request_id, Refusal("invalid", str(e)))
        except EngineOverloadedError as e:
            self._push(request_id, Refusal("overloaded", str(e)))
        except EngineDeadError as e:
            self._push(request_id, Refusal("dead", str(e)))
        except Exception as e:  # a bug: this request fails, the replica keeps serving
            log.exception("request %r failed", request_id)
            self._push(request_id, Refusal("dead", f"{type(e).__name__}: {e}"))


def refusal_error(refusal: Refusal, replica: int) -> Exception:
    """The exception an ``EngineClient`` raises for a replica's refusal."""
    if refusal.kind == "invalid":
        return ValueError(refusal.message)
    if refusal.kind == "overloaded":
        return EngineOverloadedError(refusal.message)
    return EngineDeadError(f"replica {replica}: {refusal.message}")
