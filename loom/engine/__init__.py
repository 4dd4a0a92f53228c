"""The engine (step loop), its offline batch API and (for the server) its asyncio wrapper."""

from loom.engine.async_engine import AsyncEngine, EngineDeadError, EngineOverloadedError
from loom.engine.client import EngineClient
from loom.engine.engine import Engine, EngineStats, ModelInfo, StepTiming
from loom.engine.llm import LLM, engine_config

__all__ = [
    "LLM",
    "AsyncEngine",
    "Engine",
    "EngineClient",
    "EngineDeadError",
    "EngineOverloadedError",
    "EngineStats",
    "ModelInfo",
    "StepTiming",
    "engine_config",
]
