"""The engine behind asyncio: a background thread runs the step loop; each request gets a stream.

The ``Engine`` is not thread-safe and a step is a blocking forward pass, so exactly one thread
(the engine thread) ever touches it. Callers on any event loop hand it adds and aborts through a
thread-safe queue and receive outputs through a per-request ``asyncio.Queue``, fed with
``call_soon_threadsafe`` once per step. All requests in flight share every step (continuous
batching); when nothing is in flight the thread blocks on its command queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from loom.engine.client import OutputListener, StepListener, notify
from loom.engine.engine import EMBEDDING_PARAMS, Engine, EngineStats, ModelInfo, check_prompt_chars
from loom.engine.handoff import Handoff
from loom.outputs import RequestOutput
from loom.request import RequestTags
from loom.sampling import SamplingParams
from loom.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class EngineOverloadedError(RuntimeError):
    """The waiting queue is full (``SchedulerConfig.max_waiting``): retry later."""


class EngineDeadError(RuntimeError):
    """The engine was shut down or its step loop failed; it serves nothing any more."""


class RequestMovedError(Exception):
    """Ends the stream of a request exported with ``stop`` (it continues in another engine)."""

    def __init__(self, handoff: Handoff) -> None:
        super().__init__(f"request {handoff.request_id!r} moved to another engine")
        self.handoff = handoff


@dataclass(eq=False)
class _Stream:
    """Where one request's outputs go: a queue owned by the caller's event loop."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput | BaseException] = field(default_factory=asyncio.Queue)


@dataclass(frozen=True, eq=False)
class _Add:
    request_id: str
    prompt: str | list[int]
    prompt_token_ids: list[int] | None  # a text prompt's, tokenized off the engine thread
    params: SamplingParams
    tags: RequestTags
    arrival_time: float
    stream: _Stream
    accepted: asyncio.Future[None]
    embed: bool  # an embedding request (``params`` unused)
    resume: Handoff | None = None  # a request another engine exported: adopted, not added


@dataclass(frozen=True, eq=False)
class _Call:
    """Run ``fn`` on the engine thread between steps; its result or error goes to ``done``."""

    fn: Callable[[], Any]
    done: asyncio.Future[Any]


@dataclass(frozen=True, eq=False)
class _Abort:
    request_id: str
    done: asyncio.Future[None] | None = None


_STOP = object()


def _call(loop: asyncio.AbstractEventLoop, fn: Callable[..., object], *args: object) -> bool:
    """Run ``fn(*args)`` on ``loop`` from the engine thread; False if that loop is closed (its
    caller is gone for good)."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        return False
    return True


class AsyncEngine:
    """Serve one ``Engine`` to many concurrent asyncio callers (an ``EngineClient``). Takes
    ownership of ``engine``: after this, only the engine thread may call it.

    Pass a function that builds the engine rather than the engine itself to build it on the engine
    thread (``loom serve`` does). Then every OpenMP parallel region of the process starts from that
    one thread: a second thread that had run one (the caller's, loading the model) keeps its own
    idle OpenMP worker, libgomp then counts more threads than cores and makes its workers sleep
    between regions instead of spinning, and each of the ~300 regions of a decode step pays a
    wake-up (measured: a batch-1 step of the default model 10.8 ms instead of 5.3 ms)."""

    def __init__(self, engine: Engine | Callable[[], Engine]) -> None:
        self._thread = threading.Thread(target=self._run, args=(engine,), name="loom-engine", daemon=True)
        self._built = threading.Event()
        self._build_error: BaseException | None = None
        self._thread.start()
        self._built.wait()
        if self._build_error is not None:
            self._thread.join()
            raise self._build_error

    # -- caller side (any event loop) --------------------------------------------------------
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
        prompt_token_ids: list[int] | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs, one per step it progressed in, the last with ``finished``.
        ``prompt_token_ids``: a text prompt's ids when the caller has them (a router tokenizes to
        route), so they are not computed twice.

        Raises ValueError (bad prompt or parameters), EngineOverloadedError (waiting queue full)
        or EngineDeadError (shut down) before yielding anything; EngineDeadError later if the
        step loop fails. Leaving the loop early (``break``, cancellation, a closed client) aborts
        the request and frees its KV blocks."""
        return self._outputs(prompt, params or SamplingParams(), request_id,
                             RequestTags(priority, tenant, slo_class, session_id), embed=False, ids=prompt_token_ids)

    async def embed(
        self,
        prompt: str | list[int],
        request_id: str | None = None,
        *,
        priority: int = 0,
        tenant: str | None = None,
        slo_class: str | None = None,
        prompt_token_ids: list[int] | None = None,
    ) -> RequestOutput:
        """Run an embedding request (prefill only) and return its final output, whose
        ``embedding`` is None if it was aborted. Raises as ``generate`` does; cancelling the
        call aborts the request."""
        async with contextlib.aclosing(self._outputs(prompt, EMBEDDING_PARAMS, request_id,
                                                     RequestTags(priority, tenant, slo_class), embed=True,
                                                     ids=prompt_token_ids)) as outputs:
            return [out async for out in outputs][-1]

    def adopt(self, handoff: Handoff) -> AsyncIterator[RequestOutput]:
        """Continue a request another engine exported with ``stop`` (``Engine.adopt_request``) and
        stream its outputs from here on; raises as ``generate`` does."""
        return self._outputs(handoff.prompt or handoff.prompt_token_ids, handoff.params, handoff.request_id,
                             handoff.tags, embed=False, ids=handoff.prompt_token_ids, resume=handoff)

    async def export(self, request_id: str, start_block: int = 0, stop: bool = False) -> Handoff:
        """``Engine.export_request`` on the engine thread, between steps. With ``stop`` the
        request's stream ends with RequestMovedError. ValueError for what cannot move."""
        def export() -> Handoff:
            handoff = self.engine.export_request(request_id, start_block, stop)
            if stop:
                stream = self._streams.pop(request_id, None)
                if stream is not None:
                    _call(stream.loop, stream.queue.put_nowait, RequestMovedError(handoff))
            return handoff

        return await self._on_engine_thread(export)

    async def import_blocks(self, handoff: Handoff) -> int:
        """``Engine.import_blocks`` on the engine thread: a stage of a request's KV arriving ahead
        of the request; the number of blocks written."""
        return await self._on_engine_thread(lambda: self.engine.import_blocks(handoff))

    async def _on_engine_thread(self, fn: Callable[[], Any]) -> Any:
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._submit(_Call(fn, done))
        return await done

    async def _outputs(self, prompt: str | list[int], params: SamplingParams, request_id: str | None, tags: RequestTags,
                       embed: bool, ids: list[int] | None, resume: Handoff | None = None) -> AsyncIterator[RequestOutput]:
        check_prompt_type(prompt)
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        arrival_time = time.monotonic()
        if params.structured_outputs is not None:
            # Compile here, off the engine thread (the engine then finds it in the cache).
            await asyncio.to_thread(self.engine.grammars.compile, params.structured_outputs)
        if ids is None or not isinstance(prompt, str):
            ids = await prompt_ids(prompt, self.tokenizer, self._model_info.max_model_len)
        loop = asyncio.get_running_loop()
        request_id = request_id or uuid.uuid4().hex
        stream = _Stream(loop)
        accepted: asyncio.Future[None] = loop.create_future()
        self._submit(_Add(request_id, prompt, ids, params, tags, arrival_time, stream, accepted, embed, resume))
        await accepted  # a cancelled wait cancels the add (see _handle); an error means nothing runs
        finished = False
        try:
            while not finished:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self._commands.put(_Abort(request_id))

    async def abort(self, request_id: str) -> None:
        """Stop a request and free its blocks; its stream ends with finish_reason "abort".
        Returns once the engine thread has done it (a no-op for unknown or finished ids)."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._submit(_Abort(request_id, done))
        await done

    def add_listener(self, listener: OutputListener) -> None:
        """Call ``listener`` on the engine thread with every batch of outputs (each step's, and the
        final outputs of aborted requests). Keep it cheap and thread-safe (e.g. Prometheus metrics)."""
        self._listeners = (*self._listeners, listener)

    def add_step_listener(self, listener: StepListener) -> None:
        """Call ``listener`` on the engine thread with each step's phase timings."""
        self._step_listeners = (*self._step_listeners, listener)

    def stats(self) -> EngineStats:
        """The engine's stats as of the end of its latest step (a snapshot; never blocks)."""
        return self._stats

    def model_info(self) -> ModelInfo:
        return self._model_info

    @property
    def is_running(self) -> bool:
        return self._closed is None

    def shutdown(self, timeout: float | None = 30.0) -> None:
        """Abort everything in flight (streams end with finish_reason "abort") and stop the thread."""
        with self._lock:
            if self._closed is None:
                self._closed = EngineDeadError("the engine is shut down")
                self._commands.put(_STOP)
        self._thread.join(timeout)

    def _submit(self, command: _Add | _Abort | _Call) -> None:
        """Queue a command for the engine thread (EngineDeadError once it has stopped)."""
        with self._lock:
            if self._closed is not None:
                raise EngineDeadError(str(self._closed))
            self._commands.put(command)

    def _adopt(self, engine: Engine) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self._model_info = engine.model_info()
        self.max_waiting = engine.config.scheduler.max_waiting  # checked (>= 1 or None) by SchedulerConfig
        self._listeners: tuple[OutputListener, ...] = ()
        self._step_listeners: tuple[StepListener, ...] = ()
        self._commands: queue.SimpleQueue[_Add | _Abort | _Call | object] = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}  # engine thread only
        self._stats = engine.stats()
        self._lock = threading.Lock()  # orders "closed?" checks against the final drain
        self._closed: BaseException | None = None

    # -- engine thread ------------------------------------------------------------------------
    def _run(self, engine_or_factory: Engine | Callable[[], Engine]) -> None:
        try:
            self._adopt(engine_or_factory if isinstance(engine_or_factory, Engine) else engine_or_factory())
        except BaseException as e:  # the caller's constructor raises it
            self._build_error = e
            return
        finally:
            self._built.set()
        engine = self.engine
        try:
            while True:
                # Block while idle; otherwise take whatever arrived during the last step.
                commands = [] if engine.has_unfinished_requests() else [self._commands.get()]
                commands += _drain(self._commands)
                if any(c is _STOP for c in commands):
                    self._stop(commands)
                    return
                for c in commands:
                    self._handle(c)
                if engine.has_unfinished_requests():
                    steps = engine.steps
                    self._deliver(engine.step())
                    if engine.steps == steps:
                        if engine.has_unfinished_requests():
                            time.sleep(0.001)  # nothing schedulable this instant: do not spin hot
                    else:
                        notify(self._step_listeners, engine.last_step)
                self._stats = engine.stats()
        except Exception as e:  # a bug in the step loop: fail loudly, do not hang the callers
            log.exception("engine loop failed; the engine is no longer serving")
            error = EngineDeadError(f"the engine failed: {type(e).__name__}: {e}")
            with self._lock:
                self._closed = error
            for stream in self._streams.values():
                _call(stream.loop, stream.queue.put_nowait, error)
            self._streams.clear()
            self._reject_pending(_drain(self._commands), error)
        finally:
            engine.close()

    def _handle(self, command: _Add | _Abort | _Call | object) -> None:
        if isinstance(command, _Call):
            loop = command.done.get_loop()
            try:
                result = command.fn()
            except Exception as e:
                if not isinstance(e, ValueError):  # a bug: keep serving the others
                    log.exception("%r on the engine thread failed", command.fn)
                _call(loop, _set_exception, command.done, e)
            else:
                _call(loop, _set_result, command.done, result)
            return
        if isinstance(command, _Abort):
            final = self.engine.abort_request(command.request_id)
            if final is not None:
                self._deliver([final])
            if command.done is not None:
                _call(command.done.get_loop(), _set_result, command.done)
            return
        assert isinstance(command, _Add)
        if command.accepted.cancelled():
            return  # the caller went away before its request reached the engine
        try:
            if command.resume is None:  # a request moving here was admitted elsewhere: never refused for a full queue
                self._check_capacity()
            t = command.tags
            common: dict[str, Any] = dict(arrival_time=command.arrival_time, priority=t.priority, tenant=t.tenant,
                                          slo_class=t.slo_class, prompt_token_ids=command.prompt_token_ids)
            if command.resume is not None:
                self.engine.adopt_request(command.resume)
            elif command.embed:
                self.engine.add_embedding_request(command.request_id, command.prompt, **common)
            else:
                self.engine.add_request(command.request_id, command.prompt, command.params, session_id=t.session_id,
                                        **common)
        except Exception as e:
            if not isinstance(e, (ValueError, EngineOverloadedError)):  # a bug: keep serving the others
                log.exception("add_request(%r) failed", command.request_id)
            _call(command.stream.loop, _set_exception, command.accepted, e)
            return
        self._streams[command.request_id] = command.stream
        if not _call(command.stream.loop, self._accepted, command):
            self._abort_unheard([command.request_id])

    def _accepted(self, command: _Add) -> None:
        """On the caller's loop: tell it the request runs, unless it stopped waiting meanwhile,
        in which case nobody will read the stream and the request is aborted."""
        if command.accepted.cancelled():
            self._commands.put(_Abort(command.request_id))
        else:
            command.accepted.set_result(None)

    def _abort_unheard(self, request_ids: list[str]) -> None:
        """Abort requests whose caller's event loop is closed (engine thread)."""
        for request_id in request_ids:
            self._streams.pop(request_id, None)
            self.engine.abort_request(request_id)


    def _check_capacity(self) -> None:
        if self.max_waiting is not None and self.engine.num_waiting >= self.max_waiting:
            raise EngineOverloadedError(
                f"the server is at capacity ({self.engine.num_waiting} requests waiting, "
                f"max_waiting={self.max_waiting}); retry later"
            )

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """Hand outputs to their streams. Stats and listeners (metrics) are updated first, so a
        caller who sees an output also sees its effects there."""
        if not outputs:
            return
        self._stats = self.engine.stats()
        notify(self._listeners, outputs)
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, RequestOutput]]] = defaultdict(list)
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            if out.finished:
                del self._streams[out.request_id]
            by_loop[stream.loop].append((stream, out))
        for loop, items in by_loop.items():  # one wake-up per loop per step
            if not _call(loop, _put_all, items):
                self._abort_unheard([out.request_id for _, out in items if not out.finished])

    def _stop(self, commands: list[_Add | _Abort | _Call | object]) -> None:
        error = EngineDeadError("the engine is shut down")
        self._reject_pending([c for c in commands if c is not _STOP] + _drain(self._commands), error)
        for request_id in list(self._streams):
            final = self.engine.abort_request(request_id)
            if final is not None:
                self._deliver([final])
        self._stats = self.engine.stats()

    @staticmethod
    def _reject_pending(commands: list[_Add | _Abort | _Call | object], error: BaseException) -> None:
        for c in commands:
            if isinstance(c, _Add):
                _call(c.stream.loop, _set_exception, c.accepted, error)
            elif isinstance(c, _Call):
                _call(c.done.get_loop(), _set_exception, c.done, error)
            elif isinstance(c, _Abort) and c.done is not None:
                _call(c.done.get_loop(), _set_result, c.done)


async def prompt_ids(prompt: str | list[int], tokenizer: Tokenizer, max_model_len: int) -> list[int] | None:
    """A text prompt's ids, computed on a worker thread: neither the caller's event loop nor an
    engine thread (whose steps every request shares) waits for a long prompt's tokenization. None
    for token ids or an empty prompt (the engine checks, and refuses an empty one)."""
    if not isinstance(prompt, str) or not prompt:
        return None
    check_prompt_chars(len(prompt), tokenizer, max_model_len)
    return await asyncio.to_thread(tokenizer.encode, prompt)


def check_prompt_type(prompt: object) -> None:
    if isinstance(prompt, str):
        return
    if not isinstance(prompt, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        raise ValueError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")


def _drain(q: queue.SimpleQueue) -> list:
    items = []
    while True:
        try:
            items.append(q.get_nowait())
        except queue.Empty:
            return items


def _set_result(future: asyncio.Future[Any], value: Any = None) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future[None], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


def _put_all(items: list[tuple[_Stream, RequestOutput]]) -> None:
    for stream, out in items:
        stream.queue.put_nowait(out)
