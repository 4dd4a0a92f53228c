"""An ``EngineClient`` that answers every request with a text the test sets, token by token (every
choice alike), so the server's reading of model output (tool calls) can be tested end to end
without a model that would really write it. It records the prompts and parameters it got."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from loom.engine import EngineStats, ModelInfo
from loom.outputs import CompletionOutput, RequestMetrics, RequestOutput
from loom.sampling import SamplingParams
from loom.tokenizer import IncrementalDetokenizer, Tokenizer


class ScriptedEngine:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.script = ""
        self.prompts: list[str] = []
        self.params: list[SamplingParams] = []
        self.max_waiting: int | None = None

    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None, request_id: str | None = None,
                       *, priority: int = 0, tenant: str | None = None,
                       slo_class: str | None = None, session_id: str | None = None) -> AsyncIterator[RequestOutput]:
        params = params or SamplingParams()
        self.prompts.append(prompt if isinstance(prompt, str) else self.tokenizer.decode(prompt, skip_special_tokens=False))
        self.params.append(params)
        prompt_ids = prompt if isinstance(prompt, list) else self.tokenizer.encode(prompt)
        ids = self.tokenizer.encode(self.script, add_special_tokens=False)
        detokenizers = [IncrementalDetokenizer(self.tokenizer) for _ in range(params.n)]
        choices = [CompletionOutput(index=i) for i in range(params.n)]
        metrics = RequestMetrics(arrival_time=time.monotonic())
        for k, token in enumerate(ids):
            last = k == len(ids) - 1
            for c, detok in zip(choices, detokenizers):
                c.delta_text = detok.add([token]) + (detok.flush() if last else "")
                c.text += c.delta_text
                c.token_ids.append(token)
                c.delta_token_ids = [token]
                c.finish_reason = "stop" if last else None
            yield RequestOutput(request_id or "scripted", None, list(prompt_ids), [_copy(c) for c in choices], last, metrics)

    async def embed(self, prompt: str | list[int], request_id: str | None = None, *, priority: int = 0,
                    tenant: str | None = None, slo_class: str | None = None) -> RequestOutput:
        raise NotImplementedError("the scripted engine only generates")

    async def abort(self, request_id: str) -> None:
        pass

    def stats(self) -> EngineStats:
        return EngineStats(0, 0, 0, 0, 0, 0.0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)

    def model_info(self) -> ModelInfo:
        return ModelInfo("scripted", "scripted", "float32", "cpu", "none", 512, self.tokenizer.vocab_size, 64, 0, 0)

    def add_listener(self, listener: object) -> None:
        pass

    def add_step_listener(self, listener: object) -> None:
        pass

    @property
    def is_running(self) -> bool:
        return True

    def shutdown(self, timeout: float | None = 30.0) -> None:
        pass


def _copy(c: CompletionOutput) -> CompletionOutput:
    return CompletionOutput(c.index, c.text, list(c.token_ids), None, c.finish_reason, None, c.delta_text,
                            list(c.delta_token_ids))
