"""A small OpenAI-compatible streaming server with known timing, for the
harness's end-to-end tests. Words are tokens: ``/tokenize`` splits on
whitespace, and a completion streams ``max_tokens`` one-word chunks, the first
after ``ttft`` seconds and the rest ``itl`` seconds apart."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from dataclasses import dataclass, field

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse


@dataclass
class FakeConfig:
    ttft: float = 0.05
    itl: float = 0.01
    model: str = "fake-model"
    reject_fields: frozenset[str] = frozenset()
    send_usage: bool = True
    received: list[dict] = field(default_factory=list)


class Vocab:
    """Word <-> id, grown as words are seen."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}
        self.words: list[str] = []

    def encode(self, text: str) -> list[int]:
        out = []
        for w in text.split():
            if w not in self.ids:
                self.ids[w] = len(self.words)
                self.words.append(w)
            out.append(self.ids[w])
        return out

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.words[i] for i in ids)


def make_app(cfg: FakeConfig) -> FastAPI:
    app = FastAPI()
    vocab = Vocab()

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": cfg.model, "object": "model"}]}

    @app.post("/tokenize")
    async def tokenize(req: Request) -> dict:
        body = await req.json()
        return {"tokens": vocab.encode(body["prompt"]), "count": 0}

    @app.post("/detokenize")
    async def detokenize(req: Request) -> dict:
        body = await req.json()
        return {"prompt": vocab.decode(body["tokens"])}

    async def complete(req: Request, chat: bool):
        body = await req.json()
        cfg.received.append(body)
        bad = sorted(cfg.reject_fields & body.keys())
        if bad:
            return JSONResponse({"error": {"message": f"unknown field(s) {bad}"}}, status_code=400)
        prompt = body["messages"][-1]["content"] if chat else body["prompt"]
        n_prompt = len(prompt.split())
        n_out = int(body["max_tokens"])
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def chunk(text: str | None, finish: str | None = None) -> str:
            if chat:
                delta = {} if text is None else {"content": text}
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish}
            return "data: " + json.dumps({"id": "x", "object": "chunk", "model": cfg.model, "choices": [choice]}) + "\n\n"

        async def stream():
            if chat:  # like real servers: a role-only first chunk with no text
                yield "data: " + json.dumps({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}) + "\n\n"
            await asyncio.sleep(cfg.ttft)
            for i in range(n_out):
                if i:
                    await asyncio.sleep(cfg.itl)
                yield chunk(f"w{i} ", "length" if i == n_out - 1 else None)
            if include_usage and cfg.send_usage:
                usage = {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}
                yield "data: " + json.dumps({"choices": [], "usage": usage}) + "\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(req: Request):
        return await complete(req, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: Request):
        return await complete(req, chat=True)

    return app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeServer:
    """Runs the app with uvicorn in a daemon thread on a loopback port."""

    def __init__(self, cfg: FakeConfig):
        self.cfg = cfg
        self.port = free_port()
        self._server = uvicorn.Server(uvicorn.Config(make_app(cfg), host="127.0.0.1", port=self.port, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> FakeServer:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("fake server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)


if __name__ == "__main__":  # used by the peers test as a stand-in server process
    import sys

    uvicorn.run(make_app(FakeConfig()), host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
