"""Live servers for the end-to-end tests: the real app under uvicorn, in a thread, on a loopback
port the OS picks; clients talk to it over HTTP (the official ``openai`` SDK, or httpx)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import uvicorn
from fastapi import FastAPI

from loom.engine import AsyncEngine, Engine, EngineClient, engine_config
from loom.server import ServerConfig, build_app

TINY = "tiny"
# Small and deterministic: fp32, one compute thread, a modest KV cache.
TINY_ENGINE = dict(dtype="float32", num_threads=1, num_blocks=512, block_size=16, max_num_seqs=64, max_num_batched_tokens=512)


@dataclass
class LiveServer:
    base_url: str
    engine: EngineClient
    app: FastAPI
    server: uvicorn.Server
    thread: threading.Thread

    def client(self, **kwargs: Any) -> openai.OpenAI:
        kwargs.setdefault("api_key", "unused")
        return openai.OpenAI(base_url=self.base_url + "/v1", max_retries=0, timeout=120, **kwargs)

    def async_client(self, **kwargs: Any) -> openai.AsyncOpenAI:
        kwargs.setdefault("api_key", "unused")
        return openai.AsyncOpenAI(base_url=self.base_url + "/v1", max_retries=0, timeout=120, **kwargs)

    def http(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=120, **kwargs)

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Until no request is running or waiting (e.g. after a client went away)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = self.engine.stats()
            if s.num_running == 0 and s.num_waiting == 0:
                return
            time.sleep(0.02)
        raise AssertionError(f"the engine did not go idle within {timeout}s: {self.engine.stats()}")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def start_server(model: Path | None, config: ServerConfig, **engine_options: Any) -> LiveServer:
    built = engine_config(None if model is None else str(model), **engine_options)
    return serve_engine(AsyncEngine(lambda: Engine(built)), config)


def serve_engine(engine: EngineClient, config: ServerConfig, collectors: tuple = (), routes: tuple = ()) -> LiveServer:
    app = build_app(engine, config, collectors, routes)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    return LiveServer(f"http://127.0.0.1:{port}", engine, app, server, thread)
