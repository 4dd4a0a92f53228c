"""One engine replica: the body of a Ray actor (``ray.remote(Replica)``), a plain class otherwise.

A replica runs an ``AsyncEngine`` in its own process. The front end hands it requests with
``submit`` and reads every request's outputs from one stream (``outputs``), a batch per wake-up of
the replica's event loop, rather than one Ray stream per request: one object crosses processes
per engine step, whatever the batch size. ``report`` returns what the router needs between
requests: the engine's stats, step timings and the changes of its prefix cache.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

from loom.config import EngineConfig
from loom.engine import AsyncEngine, Engine, EngineDeadError, EngineOverloadedError, EngineStats, ModelInfo, StepTiming
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


@dataclass(frozen=True)
class Refusal:
    """Why a replica did not run (or could not finish) a request: ``kind`` is ``invalid`` (a
    ValueError: bad prompt or parameters), ``overloaded`` (its queue is full) or ``dead``."""

    kind: str
    message: str


@dataclass(frozen=True)
class Hello:
    epoch: str  # new each time the replica (re)starts
    model_info: ModelInfo
    max_waiting: int | None


@dataclass(frozen=True)
class Report:
    epoch: str
    stats: EngineStats
    steps: tuple[StepTiming, ...]
    prefix: PrefixEvents


OutputBatch = list[tuple[str, RequestOutput | Refusal]]


class Replica:
    def __init__(self, config: EngineConfig) -> None:
        self.epoch = uuid.uuid4().hex

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
        return Hello(self.epoch, self.engine.model_info(), self.engine.max_waiting)

    async def submit(self, msg: Submit) -> None:
        """Start a request; its outputs (or a Refusal) come on ``outputs``."""
        self._tasks[msg.request_id] = asyncio.create_task(self._run(msg))

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

    def shutdown(self) -> None:
        self.engine.shutdown()

    # -- internals ------------------------------------------------------------------------------
    def _push(self, request_id: str, item: RequestOutput | Refusal) -> None:
        self._pending.append((request_id, item))
        if self._ready is not None:
            self._ready.set()

    async def _run(self, msg: Submit) -> None:
        t = msg.tags
        try:
            if msg.embed:
                out = await self.engine.embed(msg.prompt, msg.request_id, priority=t.priority, tenant=t.tenant,
                                              slo_class=t.slo_class, prompt_token_ids=msg.prompt_token_ids)
                self._push(msg.request_id, out)
            else:
                async for out in self.engine.generate(msg.prompt, msg.params, msg.request_id, priority=t.priority,
                                                      tenant=t.tenant, slo_class=t.slo_class,
                                                      session_id=t.session_id,
                                                      prompt_token_ids=msg.prompt_token_ids):
                    self._push(msg.request_id, out)
        except ValueError as e:
            self._push(msg.request_id, Refusal("invalid", str(e)))
        except EngineOverloadedError as e:
            self._push(msg.request_id, Refusal("overloaded", str(e)))
        except EngineDeadError as e:
            self._push(msg.request_id, Refusal("dead", str(e)))
        except Exception as e:  # a bug: this request fails, the replica keeps serving
            log.exception("request %r failed", msg.request_id)
            self._push(msg.request_id, Refusal("dead", f"{type(e).__name__}: {e}"))
        finally:
            self._tasks.pop(msg.request_id, None)


def refusal_error(refusal: Refusal, replica: int) -> Exception:
    """The exception an ``EngineClient`` raises for a replica's refusal."""
    if refusal.kind == "invalid":
        return ValueError(refusal.message)
    if refusal.kind == "overloaded":
        return EngineOverloadedError(refusal.message)
    return EngineDeadError(f"replica {replica}: {refusal.message}")
