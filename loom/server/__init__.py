"""The OpenAI-compatible HTTP server (``loom serve``)."""

from loom.server.app import build_app
from loom.server.config import ServerConfig
from loom.server.run import serve

__all__ = ["ServerConfig", "build_app", "serve"]
