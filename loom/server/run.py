"""``loom serve``: build the engine, wrap it, and run the app under uvicorn until SIGINT/SIGTERM."""

from __future__ import annotations

import logging

import uvicorn

from loom.config import EngineConfig
from loom.engine import AsyncEngine, Engine
from loom.server.app import build_app
from loom.server.config import ServerConfig

log = logging.getLogger(__name__)


def serve(engine_config: EngineConfig, config: ServerConfig) -> None:
    """Load the model (before the port opens, so a reachable server is a ready one) and serve.

    On SIGTERM uvicorn stops accepting connections, lets in-flight requests finish for up to
    ``config.graceful_timeout`` seconds (then cancels them, which aborts their engine requests),
    and runs the app's lifespan shutdown, which stops the engine thread."""
    engine = AsyncEngine(Engine(engine_config))
    app = build_app(engine, config)
    log.info("serving %s on http://%s:%d", ", ".join(config.served_model_names), config.host, config.port)
    uvicorn.run(
        app,
        host=config.host,
        port=config.port,
        log_level=config.log_level,
        timeout_graceful_shutdown=config.graceful_timeout,
    )
