"""The engine (step loop), its offline batch API and (for the server) its asyncio wrapper."""

from loom.engine.async_engine import AsyncEngine, EngineDeadError, EngineOverloadedError
from loom.engine.engine import Engine, EngineStats
from loom.engine.llm import LLM, engine_config

__all__ = ["LLM", "AsyncEngine", "Engine", "EngineDeadError", "EngineOverloadedError", "EngineStats", "engine_config"]
