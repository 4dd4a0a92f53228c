"""What a server (or a router of replicas) needs of an engine: the one seam between HTTP and
the step loop. ``AsyncEngine`` implements it in-process; a replica proxy implements it remotely."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from loom.engine.engine import EngineStats, ModelInfo, StepTiming
from loom.outputs import RequestOutput
from loom.sampling import SamplingParams
from loom.tokenizer import Tokenizer

OutputListener = Callable[[list[RequestOutput]], None]
StepListener = Callable[[StepTiming], None]

log = logging.getLogger(__name__)


def notify(listeners: tuple[Callable[[Any], None], ...], payload: Any) -> None:
    """Call each listener with ``payload``; one that fails is logged, and the others still run."""
    for listener in listeners:
        try:
            listener(payload)
        except Exception:  # metrics must never stop the serving
            log.exception("listener %r failed", listener)


class EngineClient(Protocol):
    tokenizer: Tokenizer
    max_waiting: int | None  # requests the waiting queue holds (None: unbounded)

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
        """Stream a request's outputs; ValueError for a prompt or parameters it can never
        serve, EngineOverloadedError when full, EngineDeadError when it stopped serving."""
        ...

    async def embed(
        self,
        prompt: str | list[int],
        request_id: str | None = None,
        *,
        priority: int = 0,
        tenant: str | None = None,
        slo_class: str | None = None,
    ) -> RequestOutput:
        """Run an embedding request: the final output, with ``embedding`` (None if aborted);
        raises as ``generate`` does."""
        ...

    async def abort(self, request_id: str) -> None: ...

    def stats(self) -> EngineStats: ...

    def model_info(self) -> ModelInfo: ...

    def add_listener(self, listener: OutputListener) -> None:
        """Called with every batch of outputs (for metrics)."""
        ...

    def add_step_listener(self, listener: StepListener) -> None:
        """Called with each step's phase timings (for metrics)."""
        ...

    @property
    def is_running(self) -> bool: ...

    def shutdown(self, timeout: float | None = 30.0) -> None: ...
