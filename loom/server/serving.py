"""What the endpoints share: the model check, starting engine requests (and turning their errors
into HTTP errors before any byte is sent), merging the streams of several prompts, running
embedding requests, usage, SSE framing, and aborting work whose client went away."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Request

import loom
from loom.engine import EngineClient, EngineDeadError, EngineOverloadedError
from loom.fim import FimTokens
from loom.outputs import RequestOutput
from loom.sampling import SamplingParams
from loom.server.config import ServerConfig
from loom.server.errors import APIError, ClientDisconnected
from loom.server.logprobs import LogprobFormatter
from loom.server.tool_parsers import auto_parser
from loom.server.tool_prompt import template_renders_tools
from loom.structured import GrammarError

T = TypeVar("T")

SSE_DONE = "data: [DONE]\n\n"


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Run ``work`` unless the client disconnects first, in which case it is cancelled (which
    aborts its engine requests and frees their KV blocks). Starlette only watches streaming
    responses for disconnects; this covers the time before a response exists."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait((task,))  # let the cancellation run (its aborts) before answering
    if task.cancelled():
        raise ClientDisconnected()
    return task.result()


MAX_TENANT_CHARS = 256
TENANT_HEADER = "x-tenant"


def request_tenant(user: str | None, raw: Request) -> str | None:
    """The tenant a request is served and accounted as: the ``X-Tenant`` header (set by a gateway)
    when present, else the body's ``user``. 400 when longer than ``MAX_TENANT_CHARS``."""
    header = raw.headers.get(TENANT_HEADER)
    tenant, param = (header, "X-Tenant") if header is not None else (user, "user")
    if tenant is not None and len(tenant) > MAX_TENANT_CHARS:
        raise APIError(400, f"the tenant ({param}) is {len(tenant)} characters long; at most {MAX_TENANT_CHARS}",
                       param=param)
    return tenant or None


@dataclass
class Started:
    """A request the engine accepted: its first output, then the rest of its stream."""

    index: int
    first: RequestOutput
    rest: AsyncIterator[RequestOutput]


class Serving:
    """State shared by the endpoint handlers of one app."""

    def __init__(self, engine: EngineClient, config: ServerConfig) -> None:
        self.engine = engine
        self.config = config
        self.tokenizer = engine.tokenizer
        self.logprobs = LogprobFormatter(engine.tokenizer)
        self.template_renders_tools = template_renders_tools(engine.tokenizer)
        parser = config.tool_call_parser
        self.tool_parser = auto_parser(engine.tokenizer.chat_template, self.template_renders_tools) if parser == "auto" else parser
        self.fim = FimTokens.find(engine.tokenizer)
        self.created = int(time.time())
        self.model_info = info = engine.model_info()
        source = f"loom-{loom.__version__}:{info.model_path}:{info.dtype}:{info.device}"
        self.system_fingerprint = "fp_" + hashlib.blake2b(source.encode(), digest_size=5).hexdigest()

    def model_name(self, requested: str | None) -> str:
        """The name to report for a request's ``model``; 404 for a model this server does not serve."""
        if requested is None:
            return self.config.served_model_names[0]
        if requested not in self.config.served_model_names:
            raise APIError(404, f"The model `{requested}` does not exist (this server serves "
                                f"{', '.join(map(repr, self.config.served_model_names))}).",
                           param="model", code="model_not_found")
        return requested

    async def start(
        self,
        request_id: str,
        prompts: Sequence[str | list[int]],
        params: SamplingParams,
        *,
        priority: int,
        tenant: str | None,
        slo_class: str | None,
        session_id: str | None,
        prompt_param: str,
        constraint_param: str = "response_format",
    ) -> list[Started]:
        """Submit every prompt and wait for each one's first output, so that a bad prompt (or a
        full queue) becomes an HTTP error before a response starts; on any error, nothing runs."""
        self._check_admissible(len(prompts), params, prompt_param)
        gens = [
            self.engine.generate(p, params, f"{request_id}-{i}", priority=priority, tenant=tenant, slo_class=slo_class,
                                 session_id=session_id)
            for i, p in enumerate(prompts)
        ]
        firsts = await asyncio.gather(*(anext(g) for g in gens), return_exceptions=True)
        error = next((f for f in firsts if isinstance(f, BaseException)), None)
        if error is None:
            return [Started(i, f, g) for i, (f, g) in enumerate(zip(firsts, gens))]  # type: ignore[arg-type]
        for g in gens:
            await g.aclose()
        if isinstance(error, GrammarError):
            raise APIError(400, str(error), param=constraint_param)
        raise _api_error(error, firsts.index(error), len(prompts), prompt_param)

    async def embed(self, request_id: str, prompts: Sequence[str | list[int]], *, tenant: str | None,
                    prompt_param: str) -> list[RequestOutput]:
        """Run an embedding request per prompt, all at once; the first error cancels the rest."""
        tasks = [asyncio.ensure_future(self.engine.embed(p, f"{request_id}-{i}", tenant=tenant))
                 for i, p in enumerate(prompts)]
        try:
            outs = await asyncio.gather(*tasks)
        except Exception as error:
            for t in tasks:
                t.cancel()
            index = next(i for i, t in enumerate(tasks) if t.done() and not t.cancelled() and t.exception() is error)
            raise _api_error(error, index, len(prompts), prompt_param) from None
        if any(o.embedding is None for o in outs):
            raise APIError(503, "the request was aborted: the server is shutting down", code="engine_unavailable")
        return outs

    def _check_admissible(self, num_prompts: int, params: SamplingParams, prompt_param: str) -> None:
        """400 for what no amount of waiting makes servable (unlike a full queue's 429)."""
        max_waiting = self.engine.max_waiting
        if max_waiting is not None and num_prompts > max_waiting:
            raise APIError(400, f"{prompt_param} has {num_prompts} prompts but the server queues at most "
                                f"{max_waiting} requests (max_waiting); send fewer at once", param=prompt_param)
        max_model_len = self.model_info.max_model_len
        if params.max_tokens is not None and params.max_tokens > max_model_len:
            raise APIError(400, f"max_tokens is {params.max_tokens} but the context holds {max_model_len} tokens "
                                f"(max_model_len), prompt included", param="max_tokens")

    @staticmethod
    async def merge(started: list[Started]) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Outputs of all requests as they come, tagged with the prompt index. Closing this
        iterator (or cancelling its consumer) aborts whatever is still running. A request cut
        short by the engine (shutdown, failure) raises a 503 APIError."""
        queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

        async def pump(s: Started) -> None:
            try:
                queue.put_nowait((s.index, s.first))
                async for out in s.rest:
                    queue.put_nowait((s.index, out))
            except Exception as e:
                queue.put_nowait((s.index, e))
            finally:
                queue.put_nowait((s.index, None))

        tasks = [asyncio.create_task(pump(s)) for s in started]
        try:
            remaining = len(tasks)
            while remaining:
                index, item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, EngineDeadError):
                    raise APIError(503, str(item), code="engine_unavailable")
                elif isinstance(item, BaseException):
                    raise item
                elif any(c.finish_reason == "abort" for c in item.outputs):
                    raise APIError(503, "the request was aborted: the server is shutting down", code="engine_unavailable")
                else:
                    yield index, item
        finally:
            for t in tasks:
                t.cancel()

    async def collect(self, started: list[Started]) -> list[RequestOutput]:
        """The final output of each request (non-streaming responses)."""
        finals: dict[int, RequestOutput] = {}
        async for index, out in self.merge(started):
            if out.finished:
                finals[index] = out
        return [finals[i] for i in range(len(started))]


def _api_error(error: BaseException, index: int, num_prompts: int, prompt_param: str) -> BaseException:
    """The HTTP error for what the engine raised when prompt ``index`` was submitted (a bug as it is)."""
    if isinstance(error, ValueError):
        where = f"{prompt_param}[{index}]: " if num_prompts > 1 else ""
        return APIError(400, f"{where}{error}", param=prompt_param)
    if isinstance(error, EngineOverloadedError):
        return APIError(429, str(error), code="queue_full", headers={"Retry-After": "1"})
    if isinstance(error, EngineDeadError):
        return APIError(503, str(error), code="engine_unavailable")
    return error


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int, num_preemptions: int = 0) -> dict[str, Any]:
    """OpenAI's usage object; loom adds ``num_preemptions`` when the work was preempted (KV blocks ran
    out: swapped out or recomputed), so that a slow response can be told from a slow model."""
    out: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }
    if num_preemptions:
        out["num_preemptions"] = num_preemptions
    return out


class UsageCounter:
    """Token counts of a streamed response, from the latest output of each request (generated
    tokens include the samples ``best_of`` ran but did not return, as OpenAI counts them)."""

    def __init__(self) -> None:
        self._latest: dict[int, RequestOutput] = {}

    def update(self, index: int, out: RequestOutput) -> None:
        self._latest[index] = out

    def usage(self) -> dict[str, Any]:
        outs = self._latest.values()
        return usage(
            sum(len(o.prompt_token_ids) for o in outs),
            sum(o.num_generated_tokens for o in outs),
            sum(o.num_cached_tokens for o in outs),
            sum(o.metrics.num_preemptions for o in outs),
        )


def finals_usage(finals: list[RequestOutput]) -> dict[str, Any]:
    counter = UsageCounter()
    for i, f in enumerate(finals):
        counter.update(i, f)
    return counter.usage()
