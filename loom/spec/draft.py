"""Draft-model proposals: a smaller model with the target's tokenizer, run by the same process
through its own worker, with its own paged KV cache and blocks.

Each request being speculated on has a shadow request in the draft's cache. A round first brings
the shadow up to the target's tokens (rolling back the drafts the target rejected, then one
forward pass over the tokens it lacks, usually one or two), then runs one more pass per further
draft token. Every pass is batched over the requests that still want tokens (BASS), and each
request stops at its own length."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from loom.config import CacheConfig, EngineConfig, SchedulerConfig
from loom.kvcache import KVCacheManager
from loom.model.arch import load_model_config
from loom.model.device import resolve_device, resolve_dtype
from loom.model.files import gguf_file, resolve_model
from loom.model.kv_cache import KVCacheSpec
from loom.model.quant.formats import QUANTIZATION_CHOICES
from loom.model.worker import Worker
from loom.request import Request
from loom.sampling import SamplingParams
from loom.spec.controller import StepCostModel
from loom.spec.proposer import Draft, Proposer
from loom.step import ScheduledRequest, StepPlan
from loom.tokenizer import Tokenizer

log = logging.getLogger(__name__)

MAX_KV_CACHE_TOKENS = 1 << 24
GREEDY = SamplingParams(temperature=0.0)  # drafts are the draft model's most likely tokens


@dataclass(frozen=True)
class DraftOptions:
    kv_cache_tokens: int = 0  # tokens the draft's KV cache holds (0: as many as the target's)
    # The draft's weight format, as --quantization names them ("": the target's --quantization). A
    # pass of the draft reads all its weights, so on a CPU a smaller format makes every draft token
    # cheaper; drafts are only proposals, verified by the target in its own format.
    quantization: str = ""

    def __post_init__(self) -> None:
        if not 0 <= self.kv_cache_tokens <= MAX_KV_CACHE_TOKENS:
            raise ValueError(f"draft proposer: kv_cache_tokens must be from 0 to {MAX_KV_CACHE_TOKENS}, "
                             f"got {self.kv_cache_tokens}")
        if self.quantization and self.quantization not in QUANTIZATION_CHOICES:
            raise ValueError(f"draft proposer: quantization must be one of {', '.join(QUANTIZATION_CHOICES)}, "
                             f"got {self.quantization!r}")


def kv_bytes_per_token(config: EngineConfig) -> int:
    """What a token of the draft model's KV cache takes (in the compute dtype, as its worker keeps it)."""
    c = load_model_config(resolve_model(config.speculation.speculative_model))
    dtype = resolve_dtype(config.dtype, resolve_device(config.device))
    bs = config.cache.block_size
    return KVCacheSpec(c.num_layers, c.num_kv_heads, c.head_dim, bs, dtype).bytes_per_block // bs


class DraftModelProposer(Proposer):
    name = "draft"

    def __init__(self, options: DraftOptions, config: EngineConfig, target: Tokenizer, target_tokens: int,
                 max_model_len: int) -> None:
        model = config.speculation.speculative_model
        model_dir = resolve_model(model)
        draft_tokenizer = Tokenizer.from_dir(model_dir)
        if draft_tokenizer.backend.get_vocab(with_added_tokens=True) != target.backend.get_vocab(with_added_tokens=True):
            raise ValueError(f"the draft model {model} has another vocabulary than the target model "
                             f"({draft_tokenizer.vocab_size} tokens against {target.vocab_size}); a draft model must "
                             "share the target's tokenizer")
        model_config = load_model_config(model_dir)
        bs = config.cache.block_size
        tokens = options.kv_cache_tokens or target_tokens
        draft_config = dataclasses.replace(
            config, model=model, tensor_parallel_size=1,  # the draft is small: whole, in the engine's process
            quantization=options.quantization or config.quantization,
            cache=CacheConfig(block_size=bs, num_blocks=max(1, -(-tokens // bs)),
                              enable_prefix_caching=config.cache.enable_prefix_caching),
            scheduler=SchedulerConfig(max_num_batched_tokens=config.scheduler.max_num_batched_tokens,
                                      max_num_seqs=config.scheduler.max_num_seqs),
        )
        self.max_model_len = min(max_model_len, model_config.max_position)
        self.worker = Worker(draft_config, model_config, model_dir, self.max_model_len,
                             tuple(model_config.eos_token_ids), gguf_file(model))
        self.kv = KVCacheManager(self.worker.kv.num_blocks, bs, config.cache.enable_prefix_caching)
        self.shadows: dict[str, Request] = {}
        self.probes: dict[str, Request] = {}  # shadow-less requests' prompts, to ask the prefix cache what it holds
        self.pass_cost = StepCostModel(self.worker.measure_step_seconds(config.scheduler.max_num_seqs))
        # Catching a shadow up is a prefill: logits for its last row only.
        self.catch_up_cost = StepCostModel(self.worker.measure_step_seconds(config.scheduler.max_num_batched_tokens,
                                                                            verify=False))
        log.info("draft model %s: %s, weights %s, KV cache of %d tokens", model, model_config.architecture,
                 ", ".join(self.worker.weight_formats) or "dense", self.kv.num_blocks * bs)

    def _computed(self, req: Request) -> int:
        """How many of ``req``'s tokens the draft's cache holds: its shadow's, up to where the two
        agree, or else what the prefix cache holds of its prompt."""
        shadow = self.shadows.get(req.request_id)
        if shadow is not None:
            return min(shadow.num_computed_tokens, req.num_prompt_tokens + _agreeing(shadow, req))
        if req.num_tokens <= 1:
            return 0
        probe = self.probes.get(req.request_id)
        if probe is None:
            probe = self.probes[req.request_id] = Request(req.request_id, req.prompt_token_ids, GREEDY)
        return self.kv.cached_prefix_tokens(probe)

    def setup_seconds(self, requests: Sequence[Request]) -> list[float]:
        """A pass over the tokens each shadow lacks before the last one (all of a new request's
        prompt, less what the prefix cache holds), beyond the one-token pass that drafts."""
        one = self.catch_up_cost(1)
        return [max(self.catch_up_cost(r.num_tokens - self._computed(r)) - one, 0.0) for r in requests]

    def _sync(self, req: Request, k: int) -> Request | None:
        """The request's shadow holding the target's tokens (computed up to where they agree), with
        blocks for ``k`` more; None when the draft's cache has no room (no draft this step)."""
        shadow = self.shadows.get(req.request_id)
        if shadow is None:
            self._drop_probe(req.request_id)
            shadow = self.shadows[req.request_id] = Request(req.request_id, req.prompt_token_ids, GREEDY)
            hits = self.kv.match_prefix(shadow) if req.num_tokens > 1 else []
            shadow.num_computed_tokens = len(hits) * self.kv.block_size
            if not self.kv.allocate(shadow, shadow.num_computed_tokens, hits):
                del self.shadows[req.request_id]
                return None
        shadow.num_computed_tokens = self._computed(req)
        shadow.output_token_ids = list(req.output_token_ids)
        self.kv.truncate(shadow, shadow.num_computed_tokens)
        if req.num_tokens + k - 1 > self.max_model_len or not self.kv.allocate(shadow, req.num_tokens + k - 1):
            self._drop(req.request_id)
            return None
        return shadow

    def propose(self, requests: Sequence[Request], ks: Sequence[int]) -> list[Draft]:
        shadows = {r.request_id: self._sync(r, k) for r, k in zip(requests, ks) if k > 0}
        live = [(shadows[r.request_id], k) for r, k in zip(requests, ks) if k > 0 and shadows[r.request_id]]
        drafts: dict[str, list[int]] = {s.request_id: [] for s, _ in live}
        # Pass 1 catches each shadow up and drafts its first token; pass j drafts token j.
        for j in range(1, max((k for _, k in live), default=0) + 1):
            step = [(s, s.num_computed_tokens, s.num_tokens - s.num_computed_tokens) for s, k in live if k >= j]
            result = self.worker.execute(StepPlan([ScheduledRequest(s, start, n, sample=True) for s, start, n in step]))
            for s, start, n in step:
                s.num_computed_tokens = start + n
                if j == 1:
                    self.kv.cache_full_blocks(s)  # only the target's tokens so far
                token = result.results[s.request_id].token_ids[0]
                s.output_token_ids.append(token)
                drafts[s.request_id].append(token)
        return [Draft(tuple(drafts.get(r.request_id, ()))) for r in requests]

    def _drop(self, request_id: str) -> None:
        shadow = self.shadows.pop(request_id, None)
        if shadow is not None:
            self.kv.free(shadow)

    def _drop_probe(self, request_id: str) -> None:
        probe = self.probes.pop(request_id, None)
        if probe is not None:
            self.kv.free(probe)  # its memo of block keys

    def forget(self, request_ids: Iterable[str]) -> None:
        for rid in request_ids:
            self._drop(rid)
            self._drop_probe(rid)


def _agreeing(shadow: Request, req: Request) -> int:
    """Output tokens at the start of ``shadow``'s that ``req``'s output also has."""
    old, new = shadow.output_token_ids, req.output_token_ids
    return next((i for i, (a, b) in enumerate(zip(old, new)) if a != b), min(len(old), len(new)))
