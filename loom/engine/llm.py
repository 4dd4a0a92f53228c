"""The offline batch API: ``LLM(model=...).generate(prompts, params)``, ``.chat(conversations)``
and ``.embed(prompts)``."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from tqdm.auto import tqdm

from loom.config import EngineConfig
from loom.engine.engine import Engine, EngineStats, ModelInfo
from loom.outputs import RequestOutput
from loom.sampling import SamplingParams

Prompt = str | list[int]
Message = dict[str, Any]


class LLM:
    """Run many prompts through the engine at once, continuously batched.

    Keyword arguments are engine options (``loom.config.engine_options()`` lists them): ``dtype``,
    ``quantization``, ``device``, ``attention_backend``, ``num_threads``, ``max_model_len``, ``seed``,
    ``block_size``, ``num_blocks``, ``kv_cache_bytes``, ``kv_cache_dtype``, ``kv_cache_layers``,
    ``kv_residual_tokens``, ``kv_quant_group``, ``swap_space``, ``swap_dtype``, ``preemption_mode``,
    ``swap_blocks_per_step``, ``session_ttl``, ``session_ttl_max``, ``enable_prefix_caching``,
    ``max_num_batched_tokens``, ``max_num_seqs``, ``policy``, ``policy_config``, ``tenant_weights``,
    ``max_waiting``."""

    def __init__(self, model: str | None = None, **options: Any) -> None:
        self.engine = Engine(engine_config(model, **options))
        self.tokenizer = self.engine.tokenizer
        self._counter = 0

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Outputs in the order of ``prompts``. A bad prompt or parameter raises ValueError
        before anything runs."""
        prompts = _prompt_list(prompts)
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        params = list(params)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params)} sampling params")
        ids = self._add_all([functools.partial(self.engine.add_request, prompt=pr, params=p)
                             for pr, p in zip(prompts, params)])
        return self._run(ids, use_tqdm)

    def embed(self, prompts: Prompt | Sequence[Prompt], use_tqdm: bool = True) -> list[list[float]]:
        """One embedding per prompt, in order: the final hidden states (after the final norm)
        mean-pooled over the prompt's tokens and L2-normalised, as ``/v1/embeddings`` returns
        them. A bad prompt (e.g. longer than the context) raises ValueError before anything runs."""
        ids = self._add_all([functools.partial(self.engine.add_embedding_request, prompt=pr)
                             for pr in _prompt_list(prompts)])
        return [out.embedding or [] for out in self._run(ids, use_tqdm)]  # never aborted: always set

    def chat(
        self,
        conversations: list[Message] | Sequence[list[Message]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to each conversation, then generate (special tokens
        spelled out in message content are plain text: ``Tokenizer.encode_chat``)."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]  # type: ignore[list-item]
        ids = [self.tokenizer.encode_chat(list(c), add_generation_prompt=add_generation_prompt) for c in conversations]
        return self.generate(ids, params, use_tqdm)

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Generate one prompt, yielding its output after every step (deltas in ``delta_text``)."""
        rid = f"offline-{self._counter}"
        self._counter += 1
        self.engine.add_request(rid, prompt, params)
        try:
            while True:
                for out in self.engine.step():
                    if out.request_id == rid:
                        yield out
                        if out.finished:
                            return
        finally:
            self.engine.abort_request(rid)

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def model_info(self) -> ModelInfo:
        return self.engine.model_info()

    def _add_all(self, adds: list[Callable[..., None]]) -> list[str]:
        """Call each ``add(request_id)`` with a fresh id; all or nothing (ValueError aborts the rest)."""
        ids: list[str] = []
        try:
            for add in adds:
                rid = f"offline-{self._counter}"
                self._counter += 1
                add(rid)
                ids.append(rid)
        except ValueError:
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        return ids

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        results: dict[str, RequestOutput] = {}
        wanted = set(ids)
        with tqdm(total=len(ids), desc="generating", unit="req", disable=not use_tqdm) as bar:
            while len(results) < len(ids):
                for out in self.engine.step():
                    if out.finished and out.request_id in wanted:
                        results[out.request_id] = out
                        bar.update(1)
        return [results[i] for i in ids]


def _prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    """One prompt (text or token ids) or a sequence of them, as a list."""
    if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
        return [prompts]  # type: ignore[list-item]
    return list(prompts)  # type: ignore[arg-type]


def engine_config(model: str | None = None, **options: Any) -> EngineConfig:
    """An EngineConfig from flat keyword options (as ``LLM(...)`` and the CLI take them: the names
    ``loom.config.engine_options()`` lists), checked before anything loads: ValueError names an
    unknown option, a bad value, a scheduling policy or policy option that ``loom.scheduler.registry`` refuses, a
    speculative proposer option that ``loom.spec`` refuses, or a weight format not in
    ``loom.model.quant.formats.QUANTIZATION_CHOICES``."""
    from loom.model.quant.formats import QUANTIZATION_CHOICES
    from loom.scheduler import policy_from_config
    from loom.spec import check_speculation

    config = EngineConfig.from_options(model, **options)
    policy_from_config(config.scheduler)
    check_speculation(config)
    config.check_quantization(QUANTIZATION_CHOICES)
    return config
