"""Settings of the HTTP layer (the engine's own are in ``loom.config.EngineConfig``)."""

from __future__ import annotations

from dataclasses import dataclass

from loom.server.tool_parsers import PARSERS

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
TOOL_CALL_PARSERS = ("auto", *PARSERS, "none")


@dataclass(frozen=True)
class ServerConfig:
    """``served_model_names``: the names clients may put in ``model`` (the first is the one
    ``/v1/models`` lists first). ``api_key``: if set, ``/v1/*``, ``/tokenize`` and ``/detokenize``
    need ``Authorization: Bearer <api_key>``. ``graceful_timeout``: on SIGTERM, seconds to let
    in-flight requests finish before they are cancelled. ``tool_call_parser``: how tool calls are
    read from the output under ``tool_choice: "auto"`` (``loom.server.tool_parsers``): ``auto``
    picks one from the chat template, ``none`` turns ``"auto"`` tool calling off."""

    served_model_names: tuple[str, ...] = (DEFAULT_MODEL_NAME,)
    api_key: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    graceful_timeout: float = 30.0
    log_level: str = "info"
    tool_call_parser: str = "auto"
    max_request_bytes: int = 32 * 1024 * 1024  # far above any prompt a context holds, as JSON

    def __post_init__(self) -> None:
        if not self.served_model_names or not all(isinstance(n, str) and n for n in self.served_model_names):
            raise ValueError(f"served_model_names must be non-empty strings, got {self.served_model_names!r}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.graceful_timeout < 0:
            raise ValueError(f"graceful_timeout must be >= 0, got {self.graceful_timeout}")
        if self.tool_call_parser not in TOOL_CALL_PARSERS:
            raise ValueError(f"tool_call_parser must be one of {', '.join(TOOL_CALL_PARSERS)}, got {self.tool_call_parser!r}")
        if self.max_request_bytes < 1:
            raise ValueError(f"max_request_bytes must be >= 1, got {self.max_request_bytes}")
        if self.api_key == "":
            raise ValueError("api_key must not be empty (omit it to disable authentication)")
