"""Fixtures: the shared tiny-model server and its offline reference."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from live_server import TINY, TINY_ENGINE, LiveServer, start_server

from loom.server import ServerConfig


@pytest.fixture(scope="session")
def tiny_path(tiny_model: Callable[[str], Path]) -> Path:
    return tiny_model("llama")


@pytest.fixture(scope="session")
def tiny_server(tiny_path: Path) -> Iterator[LiveServer]:
    """The shared server on the tiny llama: tests must leave it idle."""
    srv = start_server(tiny_path, ServerConfig(served_model_names=(TINY, "tiny-alias")), **TINY_ENGINE)
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def tiny_offline(tiny_path: Path):
    """The same model and engine options, offline: the reference for the server's outputs."""
    from loom.engine import LLM

    return LLM(str(tiny_path), **TINY_ENGINE)
