"""The engine (step loop), its offline batch API and (for the server) its asyncio wrapper."""

from loom.engine.engine import Engine, EngineStats
from loom.engine.llm import LLM, engine_config

__all__ = ["LLM", "Engine", "EngineStats", "engine_config"]
