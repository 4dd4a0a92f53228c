"""The engine: one ``step()`` = schedule -> execute -> update -> outputs.

The scheduler plans the step and owns every change to request progress; the worker turns the
plan into token ids and logprobs (no tensor reaches the engine); the engine keeps what the user
sees: detokenized text, stop strings and the ``n`` samples of a request."""

from __future__ import annotations

import dataclasses
import gc
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field

from loom.config import EngineConfig
from loom.engine.group import RequestGroup, SampleState
from loom.engine.handoff import Handoff
from loom.kvcache import KVCacheManager
from loom.model.arch import load_model_config
from loom.model.files import gguf_file, resolve_model
from loom.model.kv_cache import kv_layout, read_blocks, write_blocks
from loom.model.quant.formats import QUANTIZATION_CHOICES
from loom.model.worker import Worker
from loom.outputs import RequestMetrics, RequestOutput
from loom.request import Request, RequestTags
from loom.sampling import SamplingParams, sample_seed
from loom.scheduler import Scheduler, policy_from_config
from loom.scheduler.sessions import SessionTTL
from loom.spec import (Proposer, SpecStats, Target, check_speculation, make_proposer, make_speculator,
                       proposer_kv_bytes_per_token)
from loom.structured import GrammarCompiler
from loom.tokenizer import Tokenizer

log = logging.getLogger(__name__)

EMBEDDING_PARAMS = SamplingParams(max_tokens=0)  # an embedding request computes its prompt and stops


def check_prompt_chars(num_chars: int, tokenizer: Tokenizer, max_model_len: int) -> None:
    """ValueError for a text prompt too long to fit the context whatever it tokenizes to: a cheap
    bound checked before tokenizing (which, for megabytes of text, takes seconds).

    A token spans at most ``tokenizer.max_chars_per_token`` characters of normalized text; Unicode
    normalization (NFC in e.g. Qwen2's tokenizer) can compose up to 4 characters into one (a
    Hangul syllable from 3 jamo, a letter with stacked marks), hence the factor 4: generous, so
    that no prompt that fits is refused."""
    limit = max_model_len * tokenizer.max_chars_per_token * 4
    if num_chars > limit:
        raise ValueError(
            f"prompt is {num_chars} characters long, more than the {limit} that can fit in a context of "
            f"{max_model_len} tokens (max_model_len); shorten the prompt"
        )


@dataclass
class TenantStats:
    """What one tenant asked for and got (requests counted when added, queue time when first scheduled)."""

    requests: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0  # served from the prefix cache
    generation_tokens: int = 0
    queue_seconds: float = 0.0  # summed over its requests' first scheduling


MAX_TENANTS = 1000  # tenants tracked by name; the rest are counted together as OTHER_TENANTS
OTHER_TENANTS = "(other)"


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    num_blocks: int
    num_free_blocks: int
    kv_cache_tokens: int  # tokens the KV cache holds
    prefix_cache_hit_rate: float  # cached / prompt tokens of admitted requests (each counted once)
    prefix_cache_hit_tokens: int
    num_preemptions: int
    num_swap_preemptions: int  # of num_preemptions, those by swapping (the rest recompute)
    swap_blocks_used: int
    swap_blocks_total: int  # 0: no swap tier
    pinned_blocks: int  # held for sessions' next turns (Continuum)
    pinned_sessions: int
    session_followups: int  # turns of a session that had finished a turn before
    pinned_hits: int  # of those, turns admitted while their session's pin held
    pins_expired: int
    pins_released_for_memory: int
    prompt_tokens: int
    generation_tokens: int
    steps: int
    prefix_cache_queried_tokens: int = 0  # the prompt tokens of admitted requests (the hit rate's denominator)
    # Cumulative seconds per phase: schedule / execute / update of the step, and inside execute
    # the worker's prepare / forward / sample.
    phase_seconds: dict[str, float] = field(default_factory=dict)
    tenants: dict[str, TenantStats] = field(default_factory=dict)  # "" for requests without a tenant
    slo_classes: dict[str, tuple[int, int]] = field(default_factory=dict)  # class -> (finished, met); slo policy
    spec: SpecStats | None = None  # speculative decoding's counters, when it is on


@dataclass(frozen=True)
class StepTiming:
    """Seconds of one step's phases (``update`` includes detokenizing and building outputs)."""

    schedule: float
    execute: float
    update: float


@dataclass(frozen=True)
class ModelInfo:
    """What a server or router needs to know about the model an engine serves."""

    model_path: str
    architecture: str
    dtype: str
    device: str
    attention_backend: str
    max_model_len: int
    vocab_size: int
    hidden_size: int  # the length of an embedding
    num_parameters: int
    weight_bytes: int  # resident: packed matrices at their packed size (process 0's share when tensor parallel)
    weight_formats: tuple[str, ...] = ()  # the quantized formats kept packed; () when all weights are dense


class Engine:
    def __init__(self, config: EngineConfig | None = None, proposer: Proposer | None = None) -> None:
        """``proposer``: speculate with it (with ``config.speculation``'s lengths) instead of the
        proposer ``config.speculation.speculative`` names."""
        self.config = config = config or EngineConfig()
        policy = policy_from_config(config.scheduler)  # before anything loads: a bad option fails fast
        check_speculation(config)
        config.check_quantization(QUANTIZATION_CHOICES)
        t0 = time.perf_counter()
        self.model_dir = resolve_model(config.model)
        self.model_config = load_model_config(self.model_dir)
        self.tokenizer = Tokenizer.from_dir(self.model_dir)
        self.max_model_len = min(config.max_model_len or self.model_config.max_position, self.model_config.max_position)
        self.eos_token_ids = tuple(self.model_config.eos_token_ids) or tuple(self.tokenizer.eos_token_ids)
        # A draft model's cache holds as many tokens as this one: it takes its share of the budget.
        shared_kv = proposer_kv_bytes_per_token(config) if proposer is None else 0
        self.worker = Worker(config, self.model_config, self.model_dir, self.max_model_len, self.eos_token_ids,
                             gguf_file(config.model), shared_kv_bytes_per_token=shared_kv)
        kv = self.worker.kv
        self.kv = KVCacheManager(kv.num_blocks, config.cache.block_size, config.cache.enable_prefix_caching,
                                 kv.spec.residual_tokens, kv.num_slots)
        cc = config.cache
        sessions = SessionTTL(cc.session_ttl, cc.session_ttl_max) if cc.session_ttl > 0 else None
        self.scheduler = Scheduler(config.scheduler, self.kv, self.eos_token_ids, policy, self.worker.switch_costs,
                                   sessions)
        self.grammars = GrammarCompiler(self.tokenizer, self.model_config.vocab_size, self.eos_token_ids)
        if proposer is None and config.speculation.speculative != "none":
            proposer = make_proposer(Target(config, self.tokenizer, self.kv.num_blocks * self.kv.block_size,
                                            self.max_model_len))
        self.speculator = (make_speculator(config, proposer, self.worker, self.max_model_len, trees=not kv.num_slots)
                           if proposer is not None else None)
        self.groups: dict[str, RequestGroup] = {}
        self._sample_of: dict[str, tuple[RequestGroup, SampleState]] = {}
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.steps = 0
        self.phase_seconds: dict[str, float] = defaultdict(float)
        self.tenants: dict[str, TenantStats] = {}
        self.last_step = StepTiming(0.0, 0.0, 0.0)
        # Everything built so far (weights' modules, tokenizer, caches, the imports) lives as long as
        # the engine: out of the cyclic collector's sight (after collecting what is already garbage),
        # so that a full collection during a step scans only what steps allocate. Without it, one
        # extra module imported by the CLI tipped the collector into full passes during decode:
        # 0.3 ms a step at batch 1 (5% of the step). The engine itself holds no reference cycles, so
        # dropping it still frees it.
        gc.collect()
        gc.freeze()
        kv_spec = self.worker.kv.spec
        residual = (f" + {kv.num_slots} residual slots x {kv_spec.residual_tokens} tokens "
                    f"({kv.num_slots * kv_spec.bytes_per_residual_slot / 1e6:.1f} MB)" if kv.num_slots else "")
        tp = config.tensor_parallel_size
        log.info("engine ready in %.1fs: %s on %s (%s attention)%s, weights %.1f MB (%s), KV cache of %d blocks x %d "
                 "tokens = %d tokens (%s, %.1f MB)%s", time.perf_counter() - t0, self.model_config.architecture,
                 self.worker.device, self.worker.attention.name,
                 f" split over {tp} processes (weights and KV cache: process 0's share)" if tp > 1 else "",
                 self.worker.weight_bytes / 1e6,
                 ", ".join(self.worker.weight_formats) or self.worker.dtype, self.kv.num_blocks,
                 config.cache.block_size, self.kv.num_blocks * config.cache.block_size,
                 ("per layer: " + ",".join(kv_spec.layer_dtypes) if kv_spec.mixed else kv_spec.cache_dtype)
                 if kv_spec.quantized else str(kv_spec.storage_dtype).removeprefix("torch."),
                 self.kv.num_blocks * kv_spec.bytes_per_block / 1e6, residual)

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
        slo_class: str | None = None,
        session_id: str | None = None,
        prompt_token_ids: list[int] | None = None,
    ) -> None:
        """Queue a request. Raises ValueError (naming the problem) for input it can never serve.
        ``priority`` (lower is more important), ``tenant`` and ``slo_class`` are for the scheduling
        policy (``--policy``): a policy that does not use one ignores it. ``session_id``: turns of one
        conversation; the last turn's KV stays pinned for the next (``--session-ttl``).
        ``prompt_token_ids``: a text prompt's ids, when the caller tokenized it already (off the
        engine's thread: a long prompt then delays nobody else's step)."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        self._add(request_id, prompt, prompt_token_ids, params, arrival_time,
                  RequestTags(priority, tenant, slo_class, session_id), embed=False)

    def add_embedding_request(
        self,
        request_id: str,
        prompt: str | list[int],
        *,
        arrival_time: float | None = None,
        priority: int = 0,
        tenant: str | None = None,
        slo_class: str | None = None,
        prompt_token_ids: list[int] | None = None,
    ) -> None:
        """Queue a request that only computes its prompt; its final output carries the prompt's
        final hidden states, mean-pooled and L2-normalised, as ``embedding``."""
        self._add(request_id, prompt, prompt_token_ids, EMBEDDING_PARAMS, arrival_time,
                  RequestTags(priority, tenant, slo_class), embed=True)

    def _add(self, request_id: str, prompt: str | list[int], prompt_token_ids: list[int] | None, params: SamplingParams,
             arrival_time: float | None, tags: RequestTags, embed: bool,
             resume: tuple[Handoff, RequestMetrics] | None = None) -> None:
        if request_id in self.groups:
            raise ValueError(f"request id {request_id!r} is already in use")
        text, ids = self._tokenize(prompt, prompt_token_ids)
        self._check_vocab_params(params)
        capacity = self.kv.num_blocks * self.kv.block_size
        if len(ids) >= capacity:
            raise ValueError(f"prompt is {len(ids)} tokens long but the KV cache holds only {capacity} tokens")
        limit = min(self.max_model_len, capacity)
        if params.max_tokens is not None:
            limit = min(limit, len(ids) + params.max_tokens)
        group = RequestGroup(request_id, text, ids, params, self.tokenizer, embed=embed)
        now = time.monotonic() if arrival_time is None else arrival_time
        num_samples = params.num_samples
        samples = [
            Request(
                request_id=f"{request_id}#{i}" if num_samples > 1 else request_id,
                prompt_token_ids=ids,
                params=params,
                arrival_time=now,
                priority=tags.priority,
                tenant=tags.tenant,
                slo_class=tags.slo_class,
                session_id=tags.session_id,
                group_id=request_id,
                sample_index=i,
                max_total_tokens=limit,
                seed=sample_seed(params, i),
                grammar=self.grammars.new_state(params.structured_outputs) if params.structured_outputs else None,
                embed=embed,
            )
            for i in range(num_samples)
        ]
        self.scheduler.check(samples[0])
        self.groups[request_id] = group
        if resume is None:  # a moved request was counted where it arrived
            self.prompt_tokens += len(ids)
            account = self._tenant(tags.tenant)
            account.requests += 1
            account.prompt_tokens += len(ids)
        for req in samples:
            self._sample_of[req.request_id] = (group, group.new_sample(req))
        if resume is not None:
            self._resume(group, *resume)
        first, forks = samples[0], samples[1:]
        if params.max_tokens == 0:  # echo / loglikelihood / embedding: only the prompt
            for req in forks:
                self.scheduler.finish(req, "length")
            if params.prompt_logprobs is None and not embed:
                self.scheduler.finish(first, "length")
                return
        else:
            first.forks = list(forks)  # they fork from sample 0 once the prompt is in the cache
        self.scheduler.add(first)

    @staticmethod
    def _resume(group: RequestGroup, h: Handoff, metrics: RequestMetrics) -> None:
        """Give a single-sample group the output, metrics and sent counts a handoff carries."""
        (st,) = group.samples
        req = st.request
        req.output_token_ids = list(h.output_token_ids)
        req.output_logprobs = list(h.output_logprobs)
        req.cumulative_logprob = h.cumulative_logprob
        req.metrics = metrics
        req.num_cached_tokens = h.num_cached_tokens
        req.num_served_prompt_tokens = len(h.prompt_token_ids)
        if h.tail is not None:
            bs = h.block_size
            req.adopted_tail = (h.num_computed_tokens // bs, h.num_computed_tokens % bs, h.tail)
        if req.grammar is not None:
            for token in h.output_token_ids:
                req.grammar.accept(token)
        st.text = st.detok.add(h.output_token_ids)
        st.num_detokenized = len(h.output_token_ids)
        st.sent_chars, st.sent_tokens, st.sent_logprobs = h.sent_chars, h.sent_tokens, h.sent_logprobs

    def _tokenize(self, prompt: str | list[int], prompt_token_ids: list[int] | None) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty")
            if prompt_token_ids is None:
                check_prompt_chars(len(prompt), self.tokenizer, self.max_model_len)
                prompt_token_ids = self.tokenizer.encode(prompt)
            text, ids = prompt, prompt_token_ids
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
        return text, ids

    def _tenant(self, tenant: str | None) -> TenantStats:
        name = tenant or ""
        if name not in self.tenants and len(self.tenants) >= MAX_TENANTS:
            name = OTHER_TENANTS
        return self.tenants.setdefault(name, TenantStats())

    def _check_vocab_params(self, params: SamplingParams) -> None:
        vocab = self.model_config.vocab_size
        bad = [t for t in params.logit_bias or () if t >= vocab]
        if bad:
            raise ValueError(f"logit_bias token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request and free its blocks. Returns its final output (finish_reason "abort")."""
        group = self.groups.pop(request_id, None)
        if group is None:
            return None
        for s in group.samples:
            if not s.request.is_finished:
                self.scheduler.finish(s.request, "abort")
            self._sample_of.pop(s.request.request_id, None)
        if self.speculator is not None:
            self.speculator.forget(s.request.request_id for s in group.samples)
        return group.output()

    def has_unfinished_requests(self) -> bool:
        return bool(self.groups)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # -- moving requests between engines (disaggregation, migration) ---------------------------
    def export_request(self, request_id: str, start_block: int = 0, stop: bool = False) -> Handoff:
        """The request ``request_id`` with the KV of its computed full blocks from ``start_block``
        on, for another engine's ``adopt_request``. ``stop``: it leaves this engine (no final
        output; its full blocks stay in the prefix cache). ValueError for what cannot move: an
        unknown or finished request, ``n``/``best_of`` > 1, an embedding, or an engine whose blocks
        cannot move (:attr:`blocks_cannot_move`)."""
        group = self.groups.get(request_id)
        if group is None or group.finished:
            raise ValueError(f"no request {request_id!r} is running here")
        if group.embed or group.params.num_samples > 1 or group.params.prompt_logprobs is not None:
            raise ValueError("only single-sample generation requests move between engines (not n or best_of > 1, "
                             "not embeddings, not with prompt_logprobs)")
        self._check_blocks_move()
        (st,) = group.samples
        req = st.request
        tensors = self.worker.kv.block_tensors()
        full = min(req.num_computed_tokens, len(req.block_ids) * self.kv.block_size) // self.kv.block_size
        blocks = req.block_ids[start_block:full] if req.block_ids else []
        t0 = time.perf_counter()
        kv = read_blocks(tensors, blocks)
        partial = req.num_computed_tokens % self.kv.block_size
        tail = read_blocks(tensors, [req.block_ids[full]]) if stop and partial and len(req.block_ids) > full else None
        handoff = Handoff(
            request_id=request_id, prompt=group.prompt, prompt_token_ids=list(group.prompt_token_ids),
            params=group.params, tags=RequestTags(req.priority, req.tenant, req.slo_class, req.session_id),
            output_token_ids=list(req.output_token_ids), output_logprobs=list(req.output_logprobs),
            cumulative_logprob=req.cumulative_logprob, metrics=dataclasses.replace(req.metrics),
            num_cached_tokens=req.num_cached_tokens, sent_chars=st.sent_chars, sent_tokens=st.sent_tokens,
            sent_logprobs=st.sent_logprobs, block_size=self.kv.block_size, start_block=start_block,
            kv=kv, layout=kv_layout(tensors), copy_seconds=time.perf_counter() - t0,
            num_computed_tokens=req.num_computed_tokens if req.block_ids else 0, tail=tail,
            clock_offset=time.monotonic() - time.time(),
        )
        if stop:
            self.abort_request(request_id)
        return handoff

    def close(self) -> None:
        """Stop the worker's tensor-parallel processes, if any; the engine cannot step afterwards."""
        self.worker.close()

    @property
    def blocks_cannot_move(self) -> str | None:
        """Why this engine's KV blocks cannot move to or from another engine, or None when they can."""
        if self.config.tensor_parallel_size > 1:
            return ("KV blocks do not move between engines with --tensor-parallel-size > 1 (each process holds a "
                    "share of every block)")
        if self.worker.kv.num_slots:
            return ("a KV cache with a residual (int4/int2) cannot move its blocks between engines; use "
                    "--kv-cache-dtype auto, bf16, fp32 or int8")
        return None

    def _check_blocks_move(self) -> None:
        if (reason := self.blocks_cannot_move) is not None:
            raise ValueError(reason)

    def import_blocks(self, handoff: Handoff) -> int:
        """Write the handoff's blocks into this engine's prefix cache (blocks it already holds are
        skipped, and as many as there is room for are written); the number written."""
        self._check_blocks_move()
        if handoff.block_size != self.kv.block_size or handoff.layout != kv_layout(self.worker.kv.block_tensors()):
            raise ValueError("the KV blocks come from an engine with another block size or KV cache format")
        rows, blocks = self.kv.adopt_blocks(handoff.token_ids, handoff.start_block, handoff.num_blocks)
        write_blocks(self.worker.kv.block_tensors(), blocks, handoff.kv, rows)
        self.kv.release_adopted(blocks)
        return len(blocks)

    def adopt_request(self, handoff: Handoff) -> None:
        """Continue a request another engine exported (with ``stop``): its blocks into the prefix
        cache, and the request, with its output so far and its partial last block, into the queue.
        Its outputs carry the whole output; the deltas start after what the source had sent."""
        if handoff.request_id in self.groups:
            raise ValueError(f"request id {handoff.request_id!r} is already in use")
        self.import_blocks(handoff)
        metrics = handoff.local_metrics()
        self._add(handoff.request_id, handoff.prompt or handoff.prompt_token_ids, handoff.prompt_token_ids,
                  handoff.params, metrics.arrival_time, handoff.tags, embed=False, resume=(handoff, metrics))

    # -- the step ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        t0 = time.perf_counter()
        if self.speculator is not None:
            self.speculator.prepare(self.scheduler.running, self.scheduler.prefill_backlog)
        plan = self.scheduler.schedule()
        if not plan:
            return self._collect_finished()
        t1 = time.perf_counter()
        result = self.worker.execute(plan)
        t2 = time.perf_counter()
        self.scheduler.observe_step(plan, t2 - t1)
        if self.speculator is not None:
            self.speculator.observe(plan, result, t2 - t1)
        outputs = self._outputs(self.scheduler.update(plan, result))
        t3 = time.perf_counter()
        self._record(StepTiming(t1 - t0, t2 - t1, t3 - t2))
        return outputs

    def _record(self, timing: StepTiming) -> None:
        self.last_step = timing
        self.steps += 1
        for phase in ("schedule", "execute", "update"):
            self.phase_seconds[phase] += getattr(timing, phase)

    def _outputs(self, changed: list[Request]) -> list[RequestOutput]:
        """Detokenize new tokens, apply stop strings, and build the outputs of touched groups."""
        touched: dict[str, RequestGroup] = {}
        for req in changed:
            group, st = self._sample_of[req.request_id]
            touched[group.request_id] = group
            new = req.output_token_ids[st.num_detokenized :]
            account = self._tenant(req.tenant)
            if st.num_detokenized == 0 and new and req.sample_index == 0:
                account.cached_prompt_tokens += req.num_cached_tokens
                account.queue_seconds += req.metrics.queue_time or 0.0
            before = st.num_detokenized
            self._detokenize(req, st, new)
            self.generation_tokens += st.num_detokenized - before
            account.generation_tokens += st.num_detokenized - before
            if req.is_finished:
                del self._sample_of[req.request_id]
                if self.speculator is not None:
                    self.speculator.forget([req.request_id])
        outputs = []
        for group in touched.values():
            outputs.append(group.output())
            if group.finished:
                del self.groups[group.request_id]
        return outputs + self._collect_finished()

    def _detokenize(self, req: Request, st: SampleState, new: list[int]) -> None:
        """Add ``new`` tokens to the sample's text and apply its stop strings. Several tokens of one
        step (accepted drafts) go one at a time when there are stop strings, so that the tokens
        after the one that completes a stop are dropped, as if they had come one per step."""
        p = req.params
        pieces = [[t] for t in new] if p.stop and len(new) > 1 else [new]
        count = len(req.output_token_ids) - len(new)
        for piece in pieces:
            count += len(piece)
            delta = st.detok.add(piece)
            st.text += delta
            if (delta and p.stop and req.finish_reason in (None, "length") and count >= p.min_tokens
                    and (m := st.stop.check(st.text, len(delta))) is not None):
                st.text = st.text[: m.end]
                req.cumulative_logprob -= sum(lp.logprob for lp in req.output_logprobs[count:])
                del req.output_token_ids[count:], req.output_logprobs[count:]
                self.scheduler.finish(req, "stop", m.stop)
                break
        else:
            if req.is_finished:
                st.text += st.detok.flush()  # held-back bytes of an incomplete character
        st.num_detokenized = len(req.output_token_ids)

    def _collect_finished(self) -> list[RequestOutput]:
        """Groups that finished without a step (e.g. ``max_tokens=0`` without prompt logprobs)."""
        done = [g for g in self.groups.values() if g.finished]
        for g in done:
            del self.groups[g.request_id]
        return [g.output() for g in done]

    # -- introspection ----------------------------------------------------------------------
    def stats(self) -> EngineStats:
        s = self.scheduler
        return EngineStats(
            num_running=len(s.running),
            num_waiting=len(s.waiting),
            num_blocks=self.kv.num_blocks,
            num_free_blocks=self.kv.num_free_blocks,
            kv_cache_tokens=self.kv.num_blocks * self.kv.block_size,
            prefix_cache_hit_rate=s.prompt_tokens_cached / s.prompt_tokens_admitted if s.prompt_tokens_admitted else 0.0,
            prefix_cache_hit_tokens=s.prompt_tokens_cached,
            num_preemptions=s.num_preemptions,
            num_swap_preemptions=s.num_swap_preemptions,
            swap_blocks_used=(s.switch.swap_capacity_blocks - s.swap_free_blocks) if s.switch else 0,
            swap_blocks_total=s.switch.swap_capacity_blocks if s.switch else 0,
            pinned_blocks=self.kv.num_pinned_blocks,
            pinned_sessions=len(self.kv.pins),
            session_followups=s.session_followups,
            pinned_hits=s.pinned_hits,
            pins_expired=self.kv.pins_expired,
            pins_released_for_memory=self.kv.pins_released_for_memory,
            prompt_tokens=self.prompt_tokens,
            generation_tokens=self.generation_tokens,
            steps=self.steps,
            prefix_cache_queried_tokens=s.prompt_tokens_admitted,
            phase_seconds={**self.phase_seconds, **self.worker.phase_seconds},
            tenants={name: dataclasses.replace(t) for name, t in self.tenants.items()},
            slo_classes=s.policy.slo_report(),
            spec=self.speculator.stats() if self.speculator is not None else None,
        )

    def model_info(self) -> ModelInfo:
        w = self.worker
        return ModelInfo(
            model_path=str(self.model_dir),
            architecture=self.model_config.architecture,
            dtype=str(w.dtype).removeprefix("torch."),
            device=str(w.device),
            attention_backend=w.attention.name,
            max_model_len=self.max_model_len,
            vocab_size=self.model_config.vocab_size,
            hidden_size=self.model_config.hidden_size,
            num_parameters=w.num_parameters,
            weight_bytes=w.weight_bytes,
            weight_formats=w.weight_formats,
        )
