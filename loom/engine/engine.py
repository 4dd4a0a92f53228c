"""The engine: one ``step()`` = schedule -> execute -> sample -> update."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from loom.config import EngineConfig, ModelConfig
from loom.engine.group import RequestGroup, SampleState, finish
from loom.kvcache import KVCacheManager
from loom.model.files import resolve_model
from loom.model.runner import ModelRunner
from loom.outputs import RequestOutput
from loom.request import Request
from loom.sampling import Sampler, SamplingParams, SamplingRow, compute_logprobs, make_generator
from loom.scheduler import ScheduledRequest, Scheduler
from loom.tokenizer import Tokenizer

log = logging.getLogger(__name__)

STEP_PHASES = ("schedule", "prepare", "forward", "sample", "update")


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    num_blocks: int
    num_free_blocks: int
    prefix_cache_hit_rate: float
    prefix_cache_hit_tokens: int
    num_preemptions: int
    prompt_tokens: int
    generation_tokens: int
    steps: int
    phase_seconds: dict[str, float] = field(default_factory=dict)


class Engine:
    def __init__(self, config: EngineConfig | None = None) -> None:
        self.config = config = config or EngineConfig()
        t0 = time.perf_counter()
        self.model_dir = resolve_model(config.model)
        self.model_config = ModelConfig.from_hf_dir(self.model_dir)
        self.tokenizer = Tokenizer.from_dir(self.model_dir)
        self.runner = ModelRunner(config, self.model_config, self.model_dir)
        self.kv = KVCacheManager(self.runner.num_blocks, config.cache.block_size, config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.kv)
        self.sampler = Sampler(seed=config.seed)
        self.max_model_len = min(config.max_model_len or self.model_config.max_position, self.model_config.max_position)
        self.eos_token_ids = tuple(self.model_config.eos_token_ids) or tuple(self.tokenizer.eos_token_ids)
        self.groups: dict[str, RequestGroup] = {}
        self._sample_of: dict[int, tuple[RequestGroup, SampleState]] = {}
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.steps = 0
        self.phase_seconds: dict[str, float] = defaultdict(float)
        log.info("engine ready in %.1fs: %s, %d KV blocks of %d tokens", time.perf_counter() - t0,
                 self.model_config.architecture, self.runner.num_blocks, config.cache.block_size)

    # -- requests ---------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        *,
        arrival_time: float | None = None,
        priority: int = 0,
        tenant: str | None = None,
    ) -> None:
        """Queue a request. Raises ValueError (naming the problem) for input it can never serve."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        if request_id in self.groups:
            raise ValueError(f"request id {request_id!r} is already in use")
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty")
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, ids = None, [int(t) for t in prompt]
            bad = [t for t in ids if not 0 <= t < self.model_config.vocab_size]
            if bad:
                raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary (0..{self.model_config.vocab_size - 1})")
        if not ids:
            raise ValueError("prompt is empty (it encodes to no tokens)")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"prompt is {len(ids)} tokens long but the context holds {self.max_model_len} tokens "
                f"(max_model_len); shorten the prompt"
            )
        capacity = self.kv.num_blocks * self.kv.block_size
        if len(ids) >= capacity:
            raise ValueError(f"prompt is {len(ids)} tokens long but the KV cache holds only {capacity} tokens")
        limit = min(self.max_model_len, capacity)
        if params.max_tokens is not None:
            limit = min(limit, len(ids) + params.max_tokens)
        group = RequestGroup(request_id, text, ids, params, self.tokenizer)
        now = time.monotonic() if arrival_time is None else arrival_time
        # Sample 0 prefills alone; the others fork from it once the prompt is in the cache.
        first = Request(
            request_id=f"{request_id}#0" if params.n > 1 else request_id,
            prompt_token_ids=ids,
            params=params,
            arrival_time=now,
            priority=priority,
            tenant=tenant,
            group_id=request_id,
            max_total_tokens=limit,
            generator=make_generator(params, 0),
        )
        self.groups[request_id] = group
        self.prompt_tokens += len(ids)
        self._register(group, first)
        if params.max_tokens == 0:  # echo / loglikelihood: only the prompt (and its logprobs)
            for i in range(1, params.n):
                finish(self._register(group, self._child(group, i)).request, "length")
            group.forked = True
            if params.prompt_logprobs is None:
                finish(first, "length")
                return
        self.scheduler.add(first)

    def _register(self, group: RequestGroup, req: Request) -> SampleState:
        state = group.new_sample(req)
        self._sample_of[id(req)] = (group, state)
        return state

    def _child(self, group: RequestGroup, index: int) -> Request:
        first = group.samples[0].request
        return Request(
            request_id=f"{group.request_id}#{index}",
            prompt_token_ids=group.prompt_token_ids,
            params=group.params,
            arrival_time=first.arrival_time,
            priority=first.priority,
            tenant=first.tenant,
            group_id=group.request_id,
            sample_index=index,
            max_total_tokens=first.max_total_tokens,
            generator=make_generator(group.params, index),
        )

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request and free its blocks. Returns its final output (finish_reason "abort")."""
        group = self.groups.pop(request_id, None)
        if group is None:
            return None
        for s in group.samples:
            if not s.request.is_finished:
                self.scheduler.remove(s.request)
                finish(s.request, "abort")
            self._sample_of.pop(id(s.request), None)
        while len(group.samples) < group.params.n:
            child = self._child(group, len(group.samples))
            finish(child, "abort")
            group.new_sample(child)
        return group.output()

    def has_unfinished_requests(self) -> bool:
        return bool(self.groups)

    # -- the step ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        t = time.perf_counter()
        plan = self.scheduler.schedule()
        t = self._tick("schedule", t)
        if not plan:
            return self._collect_finished_without_step()
        batch = self.runner.prepare(plan.scheduled)
        t = self._tick("prepare", t)
        hidden = self.runner.forward(batch)
        self._prompt_logprobs(batch.order, batch.token_offsets, hidden)
        completing: list[tuple[ScheduledRequest, int]] = []
        prompt_only: list[SampleState] = []
        for s, off in zip(batch.order, batch.token_offsets):
            r = s.request
            r.num_computed_tokens += s.num_new_tokens
            self.kv.cache_full_blocks(r)
            if r.num_computed_tokens < r.num_tokens:
                continue
            if r.params.max_tokens == 0:
                finish(r, "length")
                prompt_only.append(self._sample_of[id(r)][1])
            else:
                completing.append((s, off))
        rows = [off + s.num_new_tokens - 1 for s, off in completing]
        logits = self.runner.logits(hidden, rows) if rows else None
        t = self._tick("forward", t)
        touched = self._sample(completing, logits)
        t = self._tick("sample", t)
        outputs = self._update(prompt_only + touched)
        self._tick("update", t)
        self.steps += 1
        return outputs

    def _tick(self, phase: str, t: float) -> float:
        now = time.perf_counter()
        self.phase_seconds[phase] += now - t
        return now

    def _collect_finished_without_step(self) -> list[RequestOutput]:
        done = [g for g in self.groups.values() if g.finished]
        for g in done:
            del self.groups[g.request_id]
        return [g.output() for g in done]

    def _prompt_logprobs(self, order: list[ScheduledRequest], offsets: list[int], hidden: torch.Tensor) -> None:
        """Logprobs of prompt tokens (for echo / loglikelihood): row i predicts token i+1."""
        for s, off in zip(order, offsets):
            r = s.request
            k = r.params.prompt_logprobs
            if k is None or r.sample_index != 0 or s.start >= r.num_prompt_tokens:
                continue
            if s.start == 0:
                r.prompt_logprobs = [None]  # the first token has no context
            end = min(s.start + s.num_new_tokens, r.num_prompt_tokens - 1)
            if end <= s.start:
                continue
            logits = self.runner.logits(hidden, list(range(off, off + end - s.start)))
            targets = torch.tensor(r.prompt_token_ids[s.start + 1 : end + 1])
            r.prompt_logprobs.extend(compute_logprobs(logits, targets, [k] * len(targets)))

    def _sample(self, completing: list[tuple[ScheduledRequest, int]], logits: torch.Tensor | None) -> list[SampleState]:
        if logits is None:
            return []
        rows: list[SamplingRow] = []
        row_logits: list[int] = []
        states: list[SampleState] = []
        for i, (s, _) in enumerate(completing):
            group, state = self._sample_of[id(s.request)]
            targets = [state]
            if group.params.n > 1 and not group.forked and s.request.sample_index == 0:
                targets += self._fork(group, s.request)
            for st in targets:
                r = st.request
                rows.append(SamplingRow(r.params, r.prompt_token_ids, r.output_token_ids, r.generator, self.eos_token_ids))
                row_logits.append(i)
                states.append(st)
        if len(row_logits) != logits.shape[0]:
            logits = logits[torch.tensor(row_logits)]
        results = self.sampler(logits, rows)
        now = time.monotonic()
        for st, res in zip(states, results):
            r = st.request
            r.output_token_ids.append(res.token_id)
            if res.logprob is not None:
                r.output_logprobs.append(res.logprob)
            if r.metrics.first_token_time is None:
                r.metrics.first_token_time = now
            r.metrics.last_token_time = now
        self.generation_tokens += len(states)
        return states

    def _fork(self, group: RequestGroup, parent: Request) -> list[SampleState]:
        """Create samples 1..n-1 sharing the parent's prompt blocks (the partial last block is copied)."""
        group.forked = True
        children = []
        for i in range(1, group.params.n):
            child = self._child(group, i)
            try:
                copy = self.kv.fork(parent, child)
            except MemoryError:  # no block for the copy: the child prefills on its own (prefix cache helps)
                self._register(group, child)
                self.scheduler.add(child)
                continue
            if copy is not None:
                self.runner.copy_block(*copy)
            child.num_computed_tokens = parent.num_computed_tokens
            child.metrics.first_scheduled_time = parent.metrics.first_scheduled_time
            children.append(self._register(group, child))
            self.scheduler.add_running(child)
        return children

    def _update(self, states: list[SampleState]) -> list[RequestOutput]:
        touched: dict[str, RequestGroup] = {}
        for st in states:
            r = st.request
            group, _ = self._sample_of[id(r)]
            touched[group.request_id] = group
            if not r.is_finished:  # finished already: a prompt-only (max_tokens=0) request
                delta = st.detok.add([r.output_token_ids[-1]])
                st.text += delta
                self._check_stop(st, len(delta))
            if r.is_finished:
                if not isinstance(r.stop_reason, str):  # a stop string cut the text; else emit held-back bytes
                    st.text += st.detok.flush()
                r.metrics.finished_time = time.monotonic()
                self.scheduler.remove(r)
                self._sample_of.pop(id(r), None)
        outputs = []
        for group in touched.values():
            outputs.append(group.output())
            if group.finished:
                del self.groups[group.request_id]
        outputs += self._collect_finished_without_step()
        return outputs

    def _check_stop(self, st: SampleState, new_chars: int) -> None:
        r, p = st.request, st.request.params
        token = r.output_token_ids[-1]
        past_min = len(r.output_token_ids) >= p.min_tokens
        if past_min and not p.ignore_eos and token in self.eos_token_ids:
            finish(r, "stop")
        elif past_min and p.stop_token_ids and token in p.stop_token_ids:
            finish(r, "stop", token)
        elif past_min and p.stop and (m := st.stop.check(st.text, new_chars)) is not None:
            st.text = st.text[: m.end]
            finish(r, "stop", m.stop)
        elif r.num_tokens >= r.max_total_tokens:
            finish(r, "length")

    # -- introspection ----------------------------------------------------------------------
    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_blocks=self.kv.num_blocks,
            num_free_blocks=self.kv.num_free_blocks,
            prefix_cache_hit_rate=self.kv.prefix_cache_hit_rate,
            prefix_cache_hit_tokens=self.kv.hit_tokens,
            num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens=self.prompt_tokens,
            generation_tokens=self.generation_tokens,
            steps=self.steps,
            phase_seconds=dict(self.phase_seconds),
        )

