"""Open-loop load client for OpenAI-compatible streaming endpoints.

Requests go out at their scheduled arrival times whether or not earlier ones
have finished (open loop), optionally capped at a maximum number in flight.
Every SSE chunk that carries text is timestamped; token counts come from the
final ``usage`` chunk when the server sends one (``stream_options.include_usage``),
else from the number of text chunks.

The streams are read with aiohttp: the client shares the CPU with the server it measures, and
reading 64 streams of 128 tokens took about 1.0 s of CPU with httpx against 0.5 s with aiohttp
(measured on 2 cores: the whole client process, 3.2 s against 2.8 s, start-up included).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import httpx

from loom.bench.prompts import PreparedRequest

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"


@dataclass(frozen=True)
class ClientConfig:
    base_url: str
    model: str
    endpoint: str = COMPLETIONS
    ignore_eos: bool = True
    max_concurrency: int | None = None
    request_timeout: float = 600.0
    api_key: str | None = None
    extra_body: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.endpoint not in (COMPLETIONS, CHAT):
            raise ValueError(f"endpoint must be {COMPLETIONS} or {CHAT}, got {self.endpoint!r}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max concurrency must be >= 1, got {self.max_concurrency}")
        if not self.request_timeout > 0:
            raise ValueError(f"request timeout must be > 0 s, got {self.request_timeout}")

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + self.endpoint

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


@dataclass(frozen=True)
class RequestRecord:
    """What happened to one request. Times are seconds on the run's clock (0 =
    when the run started); ``chunk_times`` are the arrivals of text chunks."""

    index: int
    scheduled: float
    sent: float
    finished: float
    chunk_times: tuple[float, ...]
    prompt_len: int  # the harness's count for the prompt it built
    max_tokens: int
    prompt_tokens: int | None  # from the server's usage
    output_tokens: int
    usage_reported: bool
    finish_reason: str | None
    error: str | None
    tenant: str | None = None
    priority: int = 0
    slo_class: str | None = None
    session_id: str | None = None
    turn: int = 0
    text: str = ""  # the generated text (kept for the next turn of a session; not saved in run files)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.sent if self.chunk_times else None

    @property
    def e2e(self) -> float:
        return self.finished - self.sent

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first; None with a single token."""
        ttft = self.ttft
        if ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - ttft) / (self.output_tokens - 1)

    @property
    def itl(self) -> list[float]:
        """Gaps between consecutive text chunks."""
        t = self.chunk_times
        return [b - a for a, b in zip(t, t[1:])]

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "scheduled": self.scheduled,
            "sent": self.sent,
            "finished": self.finished,
            "ok": self.ok,
            "error": self.error,
            "prompt_len": self.prompt_len,
            "max_tokens": self.max_tokens,
            "prompt_tokens": self.prompt_tokens,
            "output_tokens": self.output_tokens,
            "usage_reported": self.usage_reported,
            "finish_reason": self.finish_reason,
            "tenant": self.tenant,
            "priority": self.priority,
            "slo_class": self.slo_class,
            "session_id": self.session_id,
            "turn": self.turn,
            "ttft": self.ttft,
            "tpot": self.tpot,
            "e2e": self.e2e,
            "chunk_times": list(self.chunk_times),
        }

    @staticmethod
    def from_json(d: dict[str, Any]) -> RequestRecord:
        return RequestRecord(
            index=d["index"],
            scheduled=d["scheduled"],
            sent=d["sent"],
            finished=d["finished"],
            chunk_times=tuple(d["chunk_times"]),
            prompt_len=d["prompt_len"],
            max_tokens=d["max_tokens"],
            prompt_tokens=d["prompt_tokens"],
            output_tokens=d["output_tokens"],
            usage_reported=d["usage_reported"],
            finish_reason=d["finish_reason"],
            error=d["error"],
            tenant=d.get("tenant"),
            priority=d.get("priority", 0),
            slo_class=d.get("slo_class"),
            session_id=d.get("session_id"),
            turn=d.get("turn", 0),
        )


@dataclass(frozen=True)
class RunResult:
    records: list[RequestRecord]
    duration: float  # run start to the last request's end
    started_at: float  # wall clock (epoch seconds) of the run's start


def request_body(cfg: ClientConfig, req: PreparedRequest) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": cfg.model,
        "max_tokens": req.max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if cfg.endpoint == CHAT:
        body["messages"] = [{"role": "user", "content": req.prompt}]
    else:
        body["prompt"] = req.prompt
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    if req.tenant is not None:
        body["user"] = req.tenant
    if req.priority:
        body["priority"] = req.priority
    if req.slo_class is not None:
        body["slo_class"] = req.slo_class
    if req.session_id is not None:
        body["session_id"] = req.session_id
    body.update(cfg.extra_body)
    return body


def chunk_text(chunk: dict[str, Any]) -> str:
    """The generated text in one streamed chunk, from either endpoint's shape."""
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    c = choices[0]
    if "text" in c:
        return c.get("text") or ""
    delta = c.get("delta") or {}
    return (delta.get("content") or "") + (delta.get("reasoning_content") or "")


class _Stream:
    """Mutable state of one streaming response while it is read."""

    def __init__(self) -> None:
        self.chunk_times: list[float] = []
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.text = ""

    def feed(self, data: str, now: float) -> bool:
        """Take one SSE ``data:`` payload; False once the stream is done."""
        if data == "[DONE]":
            return False
        try:
            chunk = json.loads(data)
        except json.JSONDecodeError:
            self.error = f"bad SSE payload: {data[:120]!r}"
            return False
        if "error" in chunk:
            self.error = f"server error in stream: {str(chunk['error'])[:300]}"
            return False
        text = chunk_text(chunk)
        if text:
            self.chunk_times.append(now)
            self.text += text
        for c in chunk.get("choices") or []:
            if c.get("finish_reason"):
                self.finish_reason = c["finish_reason"]
        usage = chunk.get("usage")
        if usage:
            self.prompt_tokens = usage.get("prompt_tokens", self.prompt_tokens)
            self.completion_tokens = usage.get("completion_tokens", self.completion_tokens)
        return True


async def send_one(
    client: aiohttp.ClientSession, cfg: ClientConfig, req: PreparedRequest, clock: Callable[[], float]
) -> RequestRecord:
    """Send one request, read its stream, and return its record (never raises
    for request failures: they become the record's ``error``)."""
    sent = clock()
    s = _Stream()
    try:
        async with asyncio.timeout(cfg.request_timeout):
            async with client.post(cfg.url, json=request_body(cfg, req)) as resp:
                if resp.status != 200:
                    body = (await resp.read()).decode(errors="replace")
                    s.error = f"HTTP {resp.status}: {body[:300]}"
                else:
                    async for line in resp.content:  # one SSE line at a time
                        if line.startswith(b"data:") and not s.feed(line[5:].strip().decode(errors="replace"), clock()):
                            break
    except TimeoutError:
        s.error = f"timed out after {cfg.request_timeout:g} s"
    except (aiohttp.ClientError, ValueError) as e:  # ValueError: a line longer than aiohttp's buffer
        s.error = f"{type(e).__name__}: {e}"
    finished = clock()
    if s.error is None and not s.chunk_times:
        s.error = "the stream carried no generated text"
    usage_reported = s.completion_tokens is not None
    return RequestRecord(
        index=req.index,
        scheduled=req.arrival,
        sent=sent,
        finished=finished,
        chunk_times=tuple(s.chunk_times),
        prompt_len=req.prompt_len,
        max_tokens=req.max_tokens,
        prompt_tokens=s.prompt_tokens,
        output_tokens=s.completion_tokens if usage_reported else len(s.chunk_times),
        usage_reported=usage_reported,
        finish_reason=s.finish_reason,
        error=s.error,
        tenant=req.tenant,
        priority=req.priority,
        slo_class=req.slo_class,
        session_id=req.session_id,
        turn=req.turn,
        text=s.text,
    )


def http_client(cfg: ClientConfig) -> aiohttp.ClientSession:
    """A client for a whole run: no cap on connections (the replay decides what is in flight); each
    request's own deadline is ``request_timeout`` (see ``send_one``)."""
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30.0)
    return aiohttp.ClientSession(headers=cfg.headers, timeout=timeout, connector=aiohttp.TCPConnector(limit=0))


class RunClock:
    """Seconds since the run started (``started_at``: its wall-clock time)."""

    def __init__(self) -> None:
        self.started_at = time.time()
        self._t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self._t0


async def run(
    requests: Sequence[PreparedRequest],
    cfg: ClientConfig,
    on_done: Callable[[RequestRecord], None] | None = None,
) -> RunResult:
    """Replay ``requests`` open-loop at their arrival times."""
    sem = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
    async with http_client(cfg) as client:
        clock = RunClock()

        async def one(req: PreparedRequest) -> RequestRecord:
            if sem is None:
                rec = await send_one(client, cfg, req, clock)
            else:
                async with sem:
                    rec = await send_one(client, cfg, req, clock)
            if on_done is not None:
                on_done(rec)
            return rec

        tasks = []
        for req in sorted(requests, key=lambda r: r.arrival):
            delay = req.arrival - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(req)))
        records = await asyncio.gather(*tasks)
        duration = clock()
    return RunResult(records=sorted(records, key=lambda r: r.index), duration=duration, started_at=clock.started_at)


async def list_models(base_url: str, headers: dict[str, str] | None = None) -> list[str]:
    """Model ids the server lists at ``/v1/models``."""
    async with httpx.AsyncClient(base_url=base_url, headers=headers or {}, timeout=30.0) as client:
        r = await client.get("/v1/models")
        if r.status_code != 200:
            raise ValueError(f"{base_url}/v1/models answered {r.status_code}: {r.text[:200]}")
        return [m["id"] for m in r.json().get("data", [])]
