"""``POST /v1/chat/completions``: the conversation (and the tools) through the model's chat
template, tool calls read from the output, logprobs in the chat shape, streaming as
``chat.completion.chunk`` deltas."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from loom.engine.engine import check_prompt_chars
from loom.outputs import TokenLogprob
from loom.server.errors import APIError
from loom.server.protocol import ChatCompletionRequest, TokenizeRequest
from loom.server.tool_choice import ToolOutput, ToolPlan, plan_tools
from loom.server.tool_prompt import template_inputs
from loom.server.serving import (
    SSE_DONE,
    Serving,
    Started,
    UsageCounter,
    cancel_on_disconnect,
    finals_usage,
    new_id,
    request_tenant,
    sse,
)


async def chat_prompt(serving: Serving, req: ChatCompletionRequest | TokenizeRequest,
                      tools: list[dict[str, Any]] | None) -> list[int]:
    """The conversation's token ids, offering ``tools``, tokenized on a worker thread (a long one
    delays nobody)."""
    messages, template_tools = template_inputs([m.to_template() for m in req.messages or []], tools,
                                               serving.template_renders_tools)
    try:
        check_prompt_chars(sum(len(m.get("content") or "") for m in messages), serving.tokenizer,
                           serving.model_info.max_model_len)
        return await asyncio.to_thread(serving.tokenizer.encode_chat, messages, req.add_generation_prompt,
                                       req.allow_special_tokens_in_content, tools=template_tools)
    except ValueError as e:
        raise APIError(400, str(e), param="messages") from None


def _logprobs(serving: Serving, entries: list[TokenLogprob] | None) -> dict[str, Any] | None:
    return None if entries is None else {"content": serving.logprobs.chat(entries), "refusal": None}


async def create_chat_completion(req: ChatCompletionRequest, raw: Request, serving: Serving) -> Any:
    model = serving.model_name(req.model)
    plan = plan_tools(req, serving.tool_parser)
    params = req.to_sampling_params(plan.structured_outputs)
    prompt = await chat_prompt(serving, req, plan.tools)
    request_id = new_id("chatcmpl")
    created = int(time.time())

    async def run() -> Any:
        started = await serving.start(request_id, [prompt], params, priority=req.priority,
                                      tenant=request_tenant(req.user, raw), slo_class=req.slo_class,
                                      session_id=req.session_id,
                                      prompt_param="messages",
                                      constraint_param="tools" if plan.structured_outputs else "response_format")
        header = {"id": request_id, "object": "chat.completion", "created": created, "model": model,
                  "system_fingerprint": serving.system_fingerprint}
        if req.stream:
            chunk_header = {**header, "object": "chat.completion.chunk"}
            return StreamingResponse(_stream(serving, req, plan, params.n, started[0], chunk_header),
                                     media_type="text/event-stream")
        finals = await serving.collect(started)
        choices = []
        for c in finals[0].outputs:
            output = ToolOutput(plan)
            choices.append({
                "index": c.index,
                "message": output.message(c.text),
                "logprobs": _logprobs(serving, c.logprobs),
                "finish_reason": output.finish_reason(c.finish_reason),
            })
        return JSONResponse({**header, "choices": choices, "usage": finals_usage(finals)})

    return await cancel_on_disconnect(raw, run())


async def _stream(serving: Serving, req: ChatCompletionRequest, plan: ToolPlan, n: int, started: Started,
                  header: dict[str, Any]) -> AsyncIterator[str]:
    usage = UsageCounter()
    usage.update(0, started.first)

    def chunk(index: int, delta: dict[str, Any], logprobs: dict[str, Any] | None, finish_reason: str | None) -> str:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        extra = {"usage": usage.usage() if req.continuous_usage else None} if req.include_usage else {}
        return sse({**header, "choices": [choice], **extra})

    want_logprobs = req.logprobs is True
    outputs = [ToolOutput(plan) for _ in range(n)]
    done: set[int] = set()
    merged = serving.merge([started])
    try:
        for i in range(n):
            yield chunk(i, {"role": "assistant", "content": ""}, None, None)
        async for _, out in merged:
            usage.update(0, out)
            for c in out.outputs:
                if c.index in done:
                    continue
                output = outputs[c.index]
                deltas = output.deltas(c.delta_text, c.finished)
                if not (deltas or (want_logprobs and c.delta_token_ids) or c.finished):
                    continue
                if c.finished:
                    done.add(c.index)
                deltas = deltas or [{} if c.finished else {"content": ""}]
                for k, delta in enumerate(deltas):
                    first, last = k == 0, k == len(deltas) - 1
                    yield chunk(c.index, delta, _logprobs(serving, c.delta_logprobs) if first else None,
                                output.finish_reason(c.finish_reason) if last else None)
        if req.include_usage:
            yield sse({**header, "choices": [], "usage": usage.usage()})
    except APIError as e:  # the engine cut the request short: say so in the stream
        yield sse(e.body())
    finally:
        await merged.aclose()
    yield SSE_DONE
