"""Checks made before a request's body is read: the API key and the body's size. FastAPI reads and
parses a body before any dependency runs, so these live in an ASGI middleware."""

from __future__ import annotations

import secrets

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loom.server.errors import APIError

# Open even with an API key: probes and scrapers. Everything else (the API, /tokenize, the
# OpenAPI docs) needs the key.
OPEN_PATHS = frozenset({"/health", "/version", "/metrics"})


class RequestGuard:
    """401 without the API key (when one is set), 413 for a body over ``max_request_bytes``: both
    answered before a byte of the body is read (a body without Content-Length is cut off there)."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_request_bytes: int) -> None:
        self.app = app
        self.api_key = api_key
        self.max_request_bytes = max_request_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        error = self._key_error(scope["path"], headers) or self._size_error(headers)
        if error is not None:
            await error.response()(scope, receive, send)
            return
        await self.app(scope, self._capped(receive), send)

    def _key_error(self, path: str, headers: dict[str, str]) -> APIError | None:
        if self.api_key is None or path in OPEN_PATHS:
            return None
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), self.api_key.encode()):
            return None
        message = "Incorrect API key provided." if token else "Missing API key: send 'Authorization: Bearer <key>'."
        return APIError(401, message, code="invalid_api_key")

    def _size_error(self, headers: dict[str, str]) -> APIError | None:
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_request_bytes:
            return APIError(413, self._too_large(), code="request_too_large")
        return None

    def _too_large(self) -> str:
        return f"the request body is larger than {self.max_request_bytes} bytes (max_request_bytes)"

    def _capped(self, receive: Receive) -> Receive:
        """``receive`` that stops a body sent without Content-Length at the limit."""
        received = 0

        async def capped() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_request_bytes:
                    raise HTTPException(413, self._too_large())
            return message

        return capped
