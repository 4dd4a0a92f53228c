"""``POST /v1/completions``: prompts as text or token ids (one or many), echo, legacy logprobs
(including ``max_tokens=0`` + ``echo`` + ``logprobs`` for loglikelihood scoring), ``best_of``,
``suffix`` (fill-in-the-middle), streaming."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from loom.outputs import RequestOutput, TokenLogprob
from loom.server.errors import APIError
from loom.server.protocol import CompletionRequest, prompt_list
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


def _prompts(req: CompletionRequest, serving: Serving) -> list[str | list[int]]:
    prompts = [""] if req.prompt is None else prompt_list(req.prompt, "prompt")
    if req.suffix:
        if serving.fim is None:
            raise APIError(400, "suffix (fill-in-the-middle) needs a model whose vocabulary has FIM tokens "
                                "(e.g. <|fim_prefix|>, <|fim_suffix|>, <|fim_middle|>); this model has none",
                           param="suffix")
        return [serving.fim.prompt(serving.tokenizer, p, req.suffix) for p in prompts]
    return [p if p != "" else _empty_prompt(serving) for p in prompts]


def _empty_prompt(serving: Serving) -> list[int]:
    """OpenAI reads a missing or empty prompt as <|endoftext|>: generate as from a document start."""
    tok = serving.tokenizer
    token = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    if token is None:
        raise APIError(400, "prompt is empty and the model has no BOS/EOS token to start from", param="prompt")
    return [token]


class _Choice:
    """Builds one choice's text and legacy logprobs, in one piece or chunk by chunk."""

    def __init__(self, serving: Serving, req: CompletionRequest, first: RequestOutput) -> None:
        self.serving = serving
        self.echo = bool(req.echo)
        self.want_logprobs = req.logprobs is not None
        self.offset = 0  # characters of this choice's text sent so far
        self.echoed = False
        self.prompt_text = ""
        if self.echo:
            self.prompt_text = first.prompt if first.prompt is not None else serving.tokenizer.decode(
                first.prompt_token_ids, skip_special_tokens=False)

    def piece(self, out: RequestOutput, text: str, token_ids: list[int], entries: list[TokenLogprob] | None) -> dict[str, Any]:
        """Text and logprobs of new output tokens, preceded by the prompt the first time if echoing."""
        lp_ids: list[int] = []
        lp_entries: list[TokenLogprob | None] = []
        if self.echo and not self.echoed:
            self.echoed = True
            text = self.prompt_text + text
            if self.want_logprobs:
                lp_ids += out.prompt_token_ids
                lp_entries += out.prompt_logprobs or [None] * len(out.prompt_token_ids)
        logprobs = None
        if self.want_logprobs:
            lp_ids += token_ids
            lp_entries += entries or []
            logprobs = self.serving.logprobs.legacy(lp_ids, lp_entries, self.offset)
        self.offset += len(text)
        return {"text": text, "logprobs": logprobs}


async def create_completion(req: CompletionRequest, raw: Request, serving: Serving) -> Any:
    model = serving.model_name(req.model)
    params = req.to_sampling_params()
    prompts = _prompts(req, serving)
    request_id = new_id("cmpl")
    created = int(time.time())
    header = {"id": request_id, "object": "text_completion", "created": created, "model": model,
              "system_fingerprint": serving.system_fingerprint}

    async def run() -> Any:
        started = await serving.start(request_id, prompts, params, priority=req.priority,
                                      tenant=request_tenant(req.user, raw), slo_class=req.slo_class,
                                      session_id=req.session_id,
                                      prompt_param="prompt")
        if req.stream:
            return StreamingResponse(_stream(serving, req, params.n, started, header), media_type="text/event-stream")
        finals = await serving.collect(started)
        choices = []
        for i, out in enumerate(finals):
            for c in out.outputs:
                builder = _Choice(serving, req, out)
                part = builder.piece(out, c.text, c.token_ids, c.logprobs)
                choices.append({"index": i * params.n + c.index, **part, "finish_reason": c.finish_reason})
        return JSONResponse({**header, "choices": choices, "usage": finals_usage(finals)})

    return await cancel_on_disconnect(raw, run())


async def _stream(serving: Serving, req: CompletionRequest, n: int, started: list[Started],
                  header: dict[str, Any]) -> AsyncIterator[str]:
    builders = {(s.index, k): _Choice(serving, req, s.first) for s in started for k in range(n)}
    done: set[tuple[int, int]] = set()
    usage = UsageCounter()
    for s in started:
        usage.update(s.index, s.first)
    merged = serving.merge(started)
    try:
        async for i, out in merged:
            usage.update(i, out)
            for c in out.outputs:
                key = (i, c.index)
                if key in done:
                    continue
                b = builders[key]
                has_news = bool(c.delta_text) or (b.want_logprobs and bool(c.delta_token_ids)) or (b.echo and not b.echoed)
                if not has_news and not c.finished:
                    continue
                part = b.piece(out, c.delta_text, c.delta_token_ids, c.delta_logprobs)
                if c.finished:
                    done.add(key)
                extra = {"usage": usage.usage()} if req.continuous_usage else {}
                yield sse({**header, "choices": [{"index": i * n + c.index, **part, "finish_reason": c.finish_reason}],
                           **extra})
        if req.include_usage:
            yield sse({**header, "choices": [], "usage": usage.usage()})
    except APIError as e:  # the engine cut the request short: say so in the stream
        yield sse(e.body())
    finally:
        await merged.aclose()
    yield SSE_DONE
