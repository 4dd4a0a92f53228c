"""The FastAPI app: OpenAI routes, vLLM's tokenizer routes, health, version and Prometheus metrics.
Every GET route answers HEAD too (same status and headers, no body)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

import loom
from loom.engine import EngineClient
from loom.server.chat import chat_prompt, create_chat_completion
from loom.server.completions import create_completion
from loom.server.embeddings import create_embeddings
from loom.server.config import ServerConfig
from loom.server.errors import APIError, install_error_handlers
from loom.server.guard import RequestGuard
from loom.server.metrics import ServerMetrics
from loom.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    TokenizeRequest,
)
from loom.server.serving import Serving
from loom.server.tool_choice import template_tools

Endpoint = TypeVar("Endpoint", bound=Callable[..., Any])



def _get(app: FastAPI, path: str) -> Callable[[Endpoint], Endpoint]:
    """Register ``GET path``, and ``HEAD path`` (uvicorn sends a HEAD answer's status and headers,
    never its body) kept out of the OpenAPI schema, where it would repeat the GET operation."""

    def register(endpoint: Endpoint) -> Endpoint:
        app.add_api_route(path, endpoint, methods=["GET"])
        app.add_api_route(path, endpoint, methods=["HEAD"], include_in_schema=False)
        return endpoint

    return register


def build_app(engine: EngineClient, config: ServerConfig | None = None,
              collectors: Sequence[Collector] = (), routes: Sequence[APIRouter] = ()) -> FastAPI:
    """The app serving ``engine``. The app owns the engine from here on: its lifespan shutdown
    (uvicorn's, after in-flight requests had their grace period) shuts the engine down.
    ``collectors``: more Prometheus metrics for ``/metrics``; ``routes``: more routes (a cluster's
    ``/admin``)."""
    config = config or ServerConfig()
    serving = Serving(engine, config)
    metrics = ServerMetrics(engine.stats, collectors)
    engine.add_listener(metrics.observe)
    engine.add_step_listener(metrics.observe_step)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(engine.shutdown)

    app = FastAPI(title="loom", version=loom.__version__, lifespan=lifespan)
    install_error_handlers(app)
    app.add_middleware(RequestGuard, api_key=config.api_key, max_request_bytes=config.max_request_bytes)
    app.state.serving = serving
    app.state.metrics = metrics
    for extra in routes:
        app.include_router(extra)

    @_get(app, "/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(name, serving) for name in config.served_model_names]}

    @_get(app, "/v1/models/{model:path}")
    async def retrieve_model(model: str) -> dict[str, Any]:
        return _model_card(serving.model_name(model), serving)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        return await create_completion(body, request, serving)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        return await create_chat_completion(body, request, serving)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest, request: Request) -> dict[str, Any]:
        return await create_embeddings(body, request, serving)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        serving.model_name(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "send exactly one of 'prompt' and 'messages'", param="prompt")
        if body.messages is not None:
            ids = await chat_prompt(serving, body, template_tools(body.tools or []) or None)
        else:
            add_special = True if body.add_special_tokens is None else body.add_special_tokens
            ids = await asyncio.to_thread(serving.tokenizer.encode, body.prompt or "", add_special)
        strs = serving.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
        return {"count": len(ids), "max_model_len": serving.model_info.max_model_len, "tokens": ids, "token_strs": strs}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        serving.model_name(body.model)
        vocab = serving.model_info.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", param="tokens")
        return {"prompt": serving.tokenizer.decode(body.tokens, skip_special_tokens=False)}

    @_get(app, "/health")
    async def health() -> Response:
        if not engine.is_running:
            raise APIError(503, "the engine is not running", code="engine_unavailable")
        return Response(status_code=200)

    @_get(app, "/version")
    async def version() -> dict[str, str]:
        return {"version": loom.__version__}

    @_get(app, "/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


def _model_card(name: str, serving: Serving) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": serving.created, "owned_by": "loom",
            "max_model_len": serving.model_info.max_model_len}

