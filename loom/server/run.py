"""``loom serve``: build the engine, wrap it, and run the app under uvicorn until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Iterator

import uvicorn
from fastapi import APIRouter
from prometheus_client.registry import Collector

from loom.cluster.config import ClusterConfig
from loom.config import EngineConfig
from loom.engine import AsyncEngine, Engine, EngineClient
from loom.server.app import build_app
from loom.server.config import ServerConfig

log = logging.getLogger(__name__)

# Past the grace period the engine aborts what is in flight; the aborted responses then get this
# long to send their last bytes (a streamed error event and [DONE]) before uvicorn cancels them.
ABORT_DRAIN_SECONDS = 5.0


class _Server(uvicorn.Server):
    """uvicorn's server, with a shutdown that ends every response properly: when the grace period
    runs out, the engine aborts its requests (streams end with an error event and ``[DONE]``,
    waiting clients get a 503) instead of uvicorn cancelling their tasks mid-write; and a signal
    that led to a clean drain is not re-raised, so the process exits with status 0."""

    def __init__(self, config: uvicorn.Config, engine: EngineClient, graceful_timeout: float) -> None:
        super().__init__(config)
        self.engine = engine
        self.graceful_timeout = graceful_timeout

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        cutoff = asyncio.get_running_loop().call_later(self.graceful_timeout, self._abort_in_flight)
        try:
            await super().shutdown(sockets)
        finally:
            cutoff.cancel()

    def _abort_in_flight(self) -> None:
        self._aborting = asyncio.get_running_loop().run_in_executor(None, self.engine.shutdown)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        originals = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in originals.items():
                signal.signal(sig, handler)


def serve(engine_config: EngineConfig, config: ServerConfig, cluster: ClusterConfig | None = None) -> None:
    """Load the model (before the port opens, so a reachable server is a ready one) and serve.
    With ``cluster``, the model is served by replicas on Ray behind a router.

    On SIGTERM uvicorn stops accepting connections and lets in-flight requests finish for up to
    ``config.graceful_timeout`` seconds; then the engine aborts them (each response still ends
    properly), and the app's lifespan shutdown stops the engine thread (or the replicas)."""
    engine: EngineClient
    collectors: tuple[Collector, ...] = ()
    routes: tuple[APIRouter, ...] = ()
    if cluster is None:
        engine = AsyncEngine(lambda: Engine(engine_config))  # built on the engine thread (see AsyncEngine)
    else:
        try:
            from loom.cluster.admin import admin_routes
            from loom.cluster.client import ClusterClient  # imports Ray: only for a cluster
            from loom.cluster.metrics import ClusterCollector
        except ModuleNotFoundError as e:
            if e.name != "ray":
                raise
            raise ValueError("replicas run on Ray, which is not installed: pip install 'loom[cluster]'") from None

        engine = ClusterClient(engine_config, cluster)
        collectors = (ClusterCollector(engine),)
        routes = (admin_routes(engine),)
    app = build_app(engine, config, collectors, routes)
    log.info("serving %s on http://%s:%d%s", ", ".join(config.served_model_names), config.host, config.port,
             "" if cluster is None else f" with {cluster.replicas} replicas ({cluster.router} router"
             + (f", {cluster.prefill_replicas} of them prefill only)" if cluster.disaggregated else ")"))
    uvicorn_config = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        log_level=config.log_level,
        timeout_graceful_shutdown=config.graceful_timeout + ABORT_DRAIN_SECONDS,
    )
    _Server(uvicorn_config, engine, config.graceful_timeout).run()
