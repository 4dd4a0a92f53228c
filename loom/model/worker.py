"""The worker: owns the model weights, the KV cache, the attention backend and the sampler, and
turns a step plan into plain results (token ids and logprobs). No tensor leaves it."""

from __future__ import annotations

import itertools
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from loom.config import EngineConfig, ModelConfig
from loom.model.arch import model_class
from loom.model.arch.base import CausalLM, quantize_model
from loom.model.attention import AttentionMetadata, PrefillChunk, StepAttention, make_attention_backend
from loom.model.device import keep_freed_memory, kv_cache_budget, resolve_device, resolve_dtype, set_threads, synchronize
from loom.model.kv_cache import KIVI_BITS, KVCacheSpec, SequenceWrite, make_kv_cache, write_blocks
from loom.model.kv_layer_plan import read_layer_plan
from loom.model.parallel.group import TensorGroup
from loom.model.parallel.shard import Shard, reduce_row_parallel
from loom.model.quant.formats import FORMATS, NONE
from loom.model.quant.gguf_blocks import gguf_packed_weights
from loom.model.quant.packed import PackedWeight
from loom.model.swap import SwapSpace, measure_swap_seconds_per_block
from loom.model.weights import iter_weights
from loom.outputs import TokenLogprob
from loom.request import Request
from loom.sampling import Sampler, SamplingParams, SamplingRow, TokenBitmask, compute_logprobs
from loom.step import RequestResult, ScheduledRequest, StepPlan, StepResult, SwitchCosts, tree_depths
from loom.structured import fill_bitmasks, new_bitmask

log = logging.getLogger(__name__)


def load_model(config: ModelConfig, model_dir: Path, dtype: torch.dtype, device: torch.device,
               quantization: str = NONE, gguf: Path | None = None, shard: Shard | None = None) -> CausalLM:
    """The model with its weights. ``quantization`` (``EngineConfig.quantization``): with ``auto``, the
    matrices of ``gguf`` (the file ``model_dir`` was converted from) stored in a type loom keeps
    packed stay packed; with a format name, those already in that format stay packed and every
    other matrix layer is quantized to it; with ``none`` everything is dense. ``shard``: load one
    tensor-parallel rank's part (``config`` is then that rank's, :meth:`Shard.config`)."""
    cls = model_class(config.architecture)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(config)
    finally:
        torch.set_default_dtype(prev)
    fmt = FORMATS.get(quantization)
    packed = dict(gguf_packed_weights(gguf, only=fmt)) if gguf is not None and quantization != NONE else {}
    weights = itertools.chain(iter_weights(model_dir, skip=packed.keys()), packed.items())
    model.load_weights(shard.weights(weights) if shard is not None else weights)
    if fmt is not None:
        quantize_model(model, fmt)
    return model.eval()


@dataclass
class _Batch:
    """A step's flat batch: its tensors and, per scheduled request, its first row."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    offsets: list[int]


@dataclass
class _Rows:
    """The logits rows a step needs, and which request each belongs to."""

    hidden_rows: list[int]
    sample: list[tuple[int, ScheduledRequest, int]]  # (first logits row, request, number of rows)
    prompt: list[tuple[int, ScheduledRequest, int]]


def draft_paths(drafts: tuple[int, ...], parents: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Per verification row (0: the last known token, ``j``: draft ``j - 1``), the draft tokens on
    the branch from the known token up to it."""
    paths: list[tuple[int, ...]] = [()]
    for j, t in enumerate(drafts):
        parent = parents[j] if parents else j - 1
        paths.append((*paths[parent + 1], t))
    return paths


def tree_mask(parents: tuple[int, ...], device: torch.device) -> tuple[list[int], torch.Tensor]:
    """A draft tree's depths (1 for children of the known token) and its attention mask over the
    verification rows (the known token, then each draft): a row sees its ancestors and itself."""
    mask = torch.eye(len(parents) + 1, dtype=torch.bool)
    mask[:, 0] = True
    for j, p in enumerate(parents):
        mask[j + 1] |= mask[p + 1]
    return tree_depths(parents), mask.to(device)


# KV of tokens to move in the cache: (source blocks, source offsets, target blocks, target offsets).
TokenMove = tuple[list[int], list[int], list[int], list[int]]
SHARED_SLOT_MAX = 64 << 20  # a rank's shared all-reduce slot; larger tensors (long prefill chunks) go over gloo


@dataclass
class PeerStep:
    """What a tensor-parallel peer rank needs of a step to run its part: the cache operations, in
    rank 0's order, and the flat batch (None: cache operations only). ``moves``: the previous
    step's accepted tree drafts, moved into place (rank 0 knows them only after sampling)."""

    moves: list[TokenMove]
    block_copies: list[tuple[int, int]]
    slot_copies: list[tuple[int, int]]
    batch: _Batch | None


def run_peer(group: TensorGroup, *worker_args: Any) -> None:
    """A tensor-parallel peer rank's process: its part of the model, then rank 0's steps until it stops."""
    worker = Worker(*worker_args, group=group)
    while (step := group.receive(worker.device)) is not None:
        worker.follow(step)


class Worker:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, model_dir: Path, max_model_len: int,
                 eos_token_ids: tuple[int, ...], gguf: Path | None = None, group: TensorGroup | None = None,
                 shared_kv_bytes_per_token: int = 0) -> None:
        """``group``: a peer rank's tensor-parallel group; rank 0 (``config.tensor_parallel_size`` > 1
        and no group) starts the peers. ``shared_kv_bytes_per_token``: what another cache that holds
        as many tokens as this one (a draft model's) takes per token, out of the same budget."""
        tp = config.tensor_parallel_size
        if group is None and tp > 1:
            Shard.of(model_config, 0, tp)  # a model that cannot split fails before any process starts
            # Ranks on the CPU share its memory: they sum a step's activations (fp32 at most) through it.
            shared = (min(SHARED_SLOT_MAX, config.scheduler.max_num_batched_tokens * model_config.hidden_size * 4)
                      if resolve_device(config.device).type == "cpu" else 0)
            group = TensorGroup.start(tp, run_peer, (config, model_config, model_dir, max_model_len, eos_token_ids, gguf),
                                      shared)
        self.group = group
        try:
            self._build(config, model_config, model_dir, max_model_len, eos_token_ids, gguf, shared_kv_bytes_per_token)
        except RuntimeError as e:  # a collective broke (gloo's errors are RuntimeErrors)
            if group is not None and group.rank == 0:
                group.check_peers(e)  # the peer's own error says more
            raise

    def _build(self, config: EngineConfig, model_config: ModelConfig, model_dir: Path, max_model_len: int,
               eos_token_ids: tuple[int, ...], gguf: Path | None, shared_kv_bytes_per_token: int) -> None:
        group = self.group
        self.device = resolve_device(config.device, group.rank if group else 0)
        if self.device.type == "cpu":
            set_threads(config.num_threads, config.tensor_parallel_size)
            keep_freed_memory()
        self.dtype = resolve_dtype(config.dtype, self.device)
        shard = Shard.of(model_config, group.rank, group.size) if group else None
        self.model_config = c = shard.config(model_config) if shard else model_config
        self.eos_token_ids = eos_token_ids
        self.model = load_model(c, model_dir, self.dtype, self.device, config.quantization, gguf, shard)
        self._pending_moves: list[TokenMove] = []  # for the peers
        if group is not None:
            reduce_row_parallel(self.model, group)
            group.barrier()  # every rank's weights are in memory before the cache is sized
        cc = config.cache
        layers = read_layer_plan(cc.kv_cache_layers, c.num_layers) if cc.kv_cache_layers else ()
        if layers and cc.kv_cache_dtype != "auto":
            raise ValueError("pass --kv-cache-dtype or --kv-cache-layers, not both")
        kivi = any(d in KIVI_BITS for d in (*layers, cc.kv_cache_dtype))
        spec = KVCacheSpec(c.num_layers, c.num_kv_heads, c.head_dim, cc.block_size, self.dtype, cc.kv_cache_dtype,
                           cc.kv_residual_tokens if kivi else 0, cc.kv_quant_group, layers)
        # A KIVI cache's residual: a slot for each sequence that may run.
        num_slots = config.scheduler.max_num_seqs if spec.kivi else 0
        num_blocks = self._num_blocks(config, spec, max_model_len, num_slots, model_config.num_kv_heads,
                                      shared_kv_bytes_per_token)
        if group is not None:
            num_blocks = group.min_int(num_blocks)  # block ids mean the same on every rank
        self.kv = make_kv_cache(spec, num_blocks, self.device, num_slots)
        self.attention = make_attention_backend(config.attention_backend, self.kv)
        self.sampler = Sampler(seed=config.seed)
        self.phase_seconds: dict[str, float] = defaultdict(float)  # prepare / forward / sample
        self.swap: SwapSpace | None = None
        self.switch_costs: SwitchCosts | None = None
        if cc.swap_space and cc.preemption_mode != "recompute":
            self.swap = SwapSpace(self.kv, compress=cc.swap_dtype == "int8")
            self.switch_costs = self._measure_switch_costs(cc.swap_space // self.swap.bytes_per_block,
                                                           cc.preemption_mode, max_model_len, cc.swap_blocks_per_step)
            self.phase_seconds.clear()

    def close(self) -> None:
        """Rank 0: stop the peer ranks (they also stop when this process exits)."""
        if self.group is not None:
            self.group.close()

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters()) + sum(w.shape[0] * w.shape[1] for w in self._packed())

    @property
    def weight_bytes(self) -> int:
        """Resident bytes of the weights (packed matrices at their packed size)."""
        dense = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return dense + sum(w.nbytes for w in self._packed())

    @property
    def weight_formats(self) -> tuple[str, ...]:
        """The quantized formats of the packed matrices (empty when every weight is dense)."""
        return tuple(sorted({w.fmt.name for w in self._packed()}))

    def _packed(self) -> list[PackedWeight]:
        found: list[PackedWeight] = []
        for m in self.model.modules():
            packed = getattr(m, "packed", None)
            found += packed if isinstance(packed, list) else [packed] if packed is not None else []
        return found

    def _num_blocks(self, config: EngineConfig, spec: KVCacheSpec, max_model_len: int, num_slots: int,
                    all_kv_heads: int, shared_bytes_per_token: int) -> int:
        """The blocks the budget buys after the residual slots. Tensor-parallel ranks that share the
        memory (the CPU's) size a block by every rank's heads (``all_kv_heads``), and so does
        ``kv_cache_bytes``: the budget is the whole cache's, and the share of it that a cache
        holding as many tokens takes (``shared_bytes_per_token``) is left to that one."""
        if config.cache.num_blocks is not None:
            return config.cache.num_blocks
        whole = replace(spec, num_kv_heads=all_kv_heads)
        share = whole.bytes_per_block / (whole.bytes_per_block + shared_bytes_per_token * spec.block_size)
        if config.cache.kv_cache_bytes is not None:
            return whole.num_blocks_for(int(config.cache.kv_cache_bytes * share), num_slots)
        # Measured: free memory less the headroom, and never more than max_num_seqs sequences
        # of max_model_len tokens can use at once.
        if self.device.type == "cpu":
            spec = whole
        useful = config.scheduler.max_num_seqs * -(-max_model_len // spec.block_size)
        budget = max(int(kv_cache_budget(self.device) * share), spec.bytes_per_block)
        return max(1, min(spec.num_blocks_for(budget, num_slots), useful))

    def _measure_switch_costs(self, capacity_blocks: int, mode: str, max_model_len: int,
                              blocks_per_step: int) -> SwitchCosts:
        """Time a swap round trip per block and a prefill forward pass per token, on blocks no request
        holds yet (at start-up)."""
        if capacity_blocks < 1:
            raise ValueError(f"--swap-space holds no KV block (a block takes {self.swap.bytes_per_block} bytes)")
        swap_seconds = measure_swap_seconds_per_block(self.swap)
        bs = self.kv.block_size
        tokens = max(1, min(256, max_model_len - 1, self.kv.num_blocks * bs))
        probe = Request("__probe__", [0] * tokens, SamplingParams(max_tokens=1), block_ids=list(range(-(-tokens // bs))))
        plan = StepPlan([ScheduledRequest(probe, 0, tokens, sample=False)])
        seconds = float("inf")
        for _ in range(2):  # the first pass may pay one-time costs
            t0 = time.perf_counter()
            self.execute(plan)
            seconds = min(seconds, time.perf_counter() - t0)
        costs = SwitchCosts(swap_seconds, seconds / tokens, capacity_blocks, mode, blocks_per_step)
        log.info("context switch costs: swap %.3f ms per block of %d tokens (out and in), recompute %.3f ms per token; "
                 "swap space %d blocks", swap_seconds * 1e3, bs, costs.recompute_seconds_per_token * 1e3, capacity_blocks)
        return costs

    def _probe_seconds(self, start: int, rows: int, verify: bool = True) -> float:
        """Seconds of a forward pass over one sequence's rows at positions ``start .. start + rows -
        1`` on blocks no request holds yet (at start-up; the cache holds zeros there, which cost
        what real keys cost): verification-shaped (logits and greedy sampling for every row) or
        prefill-shaped (for the last row only)."""
        bs = self.kv.block_size
        tokens = start + (1 if verify else rows)
        probe = Request("__probe__", [0] * tokens, SamplingParams(max_tokens=1, temperature=0.0),
                        block_ids=list(range(-(-(start + rows) // bs))), residual_slot=0 if self.kv.num_slots else -1)
        scheduled = (ScheduledRequest(probe, start, 1, sample=True, draft_token_ids=(0,) * (rows - 1)) if verify
                     else ScheduledRequest(probe, start, rows, sample=True))
        seconds = float("inf")
        for _ in range(2):  # the first pass may pay one-time costs
            t0 = time.perf_counter()
            self.execute(StepPlan([scheduled]))
            seconds = min(seconds, time.perf_counter() - t0)
        return seconds

    def measure_step_seconds(self, max_tokens: int, verify: bool = True) -> list[tuple[int, float]]:
        """Seconds of a pass over a short context at 1, 2, 4, ... query tokens up to ``max_tokens``,
        verification-shaped (the speculation controller's cost curve) or prefill-shaped (a draft
        model catching up)."""
        max_tokens = max(1, min(max_tokens, self.kv.num_blocks * self.kv.block_size))
        sizes = [n for n in (1 << i for i in range(16)) if n < max_tokens] + [max_tokens]
        points = [(n, self._probe_seconds(0, n, verify)) for n in sizes]
        self.phase_seconds.clear()
        return points

    def measure_context_seconds(self, max_model_len: int, rows: int = 9, context: int = 1024) -> float:
        """Seconds per query row and token of context it reads: ``rows`` rows over ``context``
        tokens (or what fits) against the same over none, per row and token."""
        context = min(context, self.kv.num_blocks * self.kv.block_size - rows, max_model_len - rows)
        if context < 64:
            return 0.0
        extra = self._probe_seconds(context - 1, rows) - self._probe_seconds(0, rows)
        self.phase_seconds.clear()
        return max(extra, 0.0) / (rows * context)

    # -- the step -----------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepResult:
        t0 = time.perf_counter()
        if self.swap is not None:
            for request_id, blocks in plan.swap_out:
                self.swap.save(request_id, blocks)
        for src, dst in plan.block_copies:
            self.kv.copy_block(src, dst)
        for src, dst in plan.slot_copies:
            self.kv.copy_slot(src, dst)
        for block, contents in plan.block_writes:
            write_blocks(self.kv.block_tensors(), [block], contents, [0])
        if self.swap is not None:
            for request_id in plan.swap_drop:
                self.swap.drop(request_id)
            for s in plan.swap_in:
                self.swap.load(s.request_id, list(s.block_ids), s.start)
                if s.last:
                    self.swap.drop(s.request_id)
        batch = self._prepare(plan.scheduled) if plan.scheduled else None
        if self.group is not None and (batch or plan.block_copies or plan.slot_copies or self._pending_moves):
            self.group.send(PeerStep(self._pending_moves, plan.block_copies, plan.slot_copies, batch))
            self._pending_moves = []
        if batch is None:
            self.phase_seconds["prepare"] += time.perf_counter() - t0
            return StepResult({}, time.monotonic())
        rows = self._logits_rows(plan.scheduled, batch.offsets)
        t1 = time.perf_counter()
        try:
            hidden = self.model(batch.input_ids, batch.positions, StepAttention(self.attention, batch.meta))
        except RuntimeError as e:  # an all-reduce found a peer gone: say why, if it said
            if self.group is not None:
                self.group.check_peers(e)
            raise
        logits = self.model.compute_logits(hidden[rows.hidden_rows]) if rows.hidden_rows else None
        synchronize(self.device)
        forward_end = time.monotonic()
        t2 = time.perf_counter()
        results: dict[str, RequestResult] = {}
        if logits is not None:
            for s, accepted in self._sample(logits, rows.sample, results):
                self._move_tokens(self._accepted_moves(s, accepted))
            self._prompt_logprobs(logits, rows.prompt, results)
        self._hidden_sums(hidden, plan.scheduled, batch.offsets, results)
        t3 = time.perf_counter()
        self.phase_seconds["prepare"] += t1 - t0
        self.phase_seconds["forward"] += t2 - t1
        self.phase_seconds["sample"] += t3 - t2
        if self.group is not None:
            self.phase_seconds["all_reduce"] += self.group.take_all_reduce_seconds()
        return StepResult(results, forward_end)

    @torch.inference_mode()
    def follow(self, step: PeerStep) -> None:
        """A peer rank's part of rank 0's step: the same cache operations and forward pass (whose
        all-reduces meet rank 0's); rank 0 alone computes logits and samples."""
        for move in step.moves:
            self._move_tokens(move)
        for src, dst in step.block_copies:
            self.kv.copy_block(src, dst)
        for src, dst in step.slot_copies:
            self.kv.copy_slot(src, dst)
        if step.batch is not None:
            b = step.batch
            self.model(b.input_ids, b.positions, StepAttention(self.attention, b.meta))

    def _prepare(self, scheduled: list[ScheduledRequest]) -> _Batch:
        """The flat batch: decode rows first (one per query token), then prefill chunks."""
        bs = self.kv.block_size
        ids: list[int] = []
        pos: list[int] = []
        slot_blocks: list[int] = []  # per new token: its cache block and offset in the block
        slot_offsets: list[int] = []
        offsets: list[int] = [0] * len(scheduled)
        tables: list[list[int]] = []
        lens: list[int] = []
        decodes = [i for i, s in enumerate(scheduled) if s.decode_rows]
        for i in decodes:
            s = scheduled[i]
            r = s.request
            offsets[i] = len(ids)
            ids.extend(r.token_ids_slice(s.start, s.end))
            ids.extend(s.draft_token_ids)
            for p in range(s.start, s.start + s.num_query_tokens):
                pos.append(p)
                slot_blocks.append(r.block_ids[p // bs])
                slot_offsets.append(p % bs)
                tables.append(r.block_ids)
                lens.append(p + 1)
        num_decode_rows = len(ids)
        prefills: list[PrefillChunk] = []
        for i, s in enumerate(scheduled):
            if s.decode_rows:
                continue
            r = s.request
            offsets[i] = len(ids)
            ids.extend(r.token_ids_slice(s.start, s.end))
            ids.extend(s.draft_token_ids)
            end = s.start + s.num_query_tokens
            blocks = r.block_ids[: -(-end // bs)]
            tree = None
            if s.draft_parents:  # a tree of drafts: each at its depth, in the slots after the known token
                depths, tree = tree_mask(s.draft_parents, self.device)
                pos.append(s.start)
                pos.extend(s.start + d for d in depths)
            else:
                pos.extend(range(s.start, end))
            for p in range(s.start, end):
                slot_blocks.append(blocks[p // bs])
                slot_offsets.append(p % bs)
            prefills.append(PrefillChunk(len(ids) - s.num_query_tokens, len(ids), s.start,
                                         torch.tensor(blocks, dtype=torch.int64, device=self.device), r.residual_slot,
                                         tree))
        width = max((len(t) for t in tables), default=0)
        device = self.device
        residual = self.kv.num_slots > 0  # a KIVI cache: each row's slot, and where the step's rows go
        meta = AttentionMetadata(
            slot_blocks=torch.tensor(slot_blocks, dtype=torch.int64, device=device),
            slot_offsets=torch.tensor(slot_offsets, dtype=torch.int64, device=device),
            num_decode_rows=num_decode_rows,
            decode_block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32,
                                             device=device).view(len(tables), width),
            decode_context_lens=torch.tensor(lens, dtype=torch.int32, device=device),
            prefills=prefills,
            decode_slots=torch.tensor([scheduled[i].request.residual_slot for i in decodes
                                       for _ in range(scheduled[i].num_query_tokens)], dtype=torch.int32,
                                      device=device) if residual else None,
            residual=self.kv.plan_residual_writes([
                SequenceWrite(off, s.start, s.start + s.num_query_tokens, s.request.block_ids, s.request.residual_slot)
                for s, off in zip(scheduled, offsets)]) if residual else None,
        )
        return _Batch(torch.tensor(ids, dtype=torch.int64, device=device),
                      torch.tensor(pos, dtype=torch.int64, device=device), meta, offsets)

    @staticmethod
    def _logits_rows(scheduled: list[ScheduledRequest], offsets: list[int]) -> _Rows:
        """Hidden rows that need logits: the rows that sample (the last known token, and every
        draft), and the prompt rows whose logprobs were asked for (row i scores token i + 1)."""
        rows = _Rows([], [], [])
        for s, off in zip(scheduled, offsets):
            r = s.request
            if s.sample:
                n = 1 + len(s.draft_token_ids)
                first = off + s.num_new_tokens - 1
                rows.sample.append((len(rows.hidden_rows), s, n))
                rows.hidden_rows.extend(range(first, first + n))
            if r.params.prompt_logprobs is not None and r.sample_index == 0 and s.start < r.num_prompt_tokens - 1:
                n = min(s.end, r.num_prompt_tokens - 1) - s.start
                rows.prompt.append((len(rows.hidden_rows), s, n))
                rows.hidden_rows.extend(range(off, off + n))
        return rows

    def _sample(self, logits: torch.Tensor, sample: list[tuple[int, ScheduledRequest, int]],
                results: dict[str, RequestResult]) -> list[tuple[ScheduledRequest, list[int]]]:
        """One sampler call for every row. A request verifying drafts samples at each of its
        ``1 + k`` rows (with the drafts on the row's branch as history), then walks from its last
        known token: it keeps the token drawn there and, while a draft on the branch is that
        token, moves to the draft's row and keeps the token drawn there.

        This is the rejection rule of speculative sampling for drafts proposed with certainty
        (q = 1 for the draft token): the draft is kept with probability p(draft), and otherwise
        the kept token is a draw from p without the draft, renormalised. Every kept token is a
        draw from the model's distribution given the tokens before it, so the output is
        distributed exactly as without drafts, and a seeded sample (one generator stream per
        position) is token for token what it would be without them.

        Returns the tree verifications whose accepted drafts are not the first rows (their KV must
        move into place), with the rows accepted."""
        sampling_rows: list[SamplingRow] = []
        logit_rows: list[int] = []
        owners: list[tuple[Request, ScheduledRequest, list[tuple[int, ...]]]] = []
        constrained: list[tuple[int, Request, ScheduledRequest]] = []  # (first sampling row, request, step)
        for first, s, n in sample:
            paths = draft_paths(s.draft_token_ids, s.draft_parents)
            for req in (s.request, *s.forks):
                if req.grammar is not None:
                    constrained.append((len(sampling_rows), req, s))
                owners.append((req, s, paths))
                for j in range(n):
                    history = [*req.output_token_ids, *paths[j]] if j else req.output_token_ids
                    sampling_rows.append(SamplingRow(req.params, req.prompt_token_ids, history, req.seed,
                                                     self.eos_token_ids))
                    logit_rows.append(first + j)
        if not sampling_rows:
            return []
        if len(logit_rows) != logits.shape[0] or logit_rows != list(range(len(logit_rows))):
            logits = logits[torch.tensor(logit_rows, device=logits.device)]
        sampled = self.sampler(logits, sampling_rows, self._grammar_bitmask(constrained, len(sampling_rows), logits.shape[1]))
        moves: list[tuple[ScheduledRequest, list[int]]] = []
        i = 0
        for req, s, paths in owners:
            n = len(paths)
            tokens: list[int] = []
            logprobs: list[TokenLogprob] = []
            row = 0
            rows = []  # the accepted drafts' rows
            while True:
                res = sampled[i + row]
                tokens.append(res.token_id)
                if res.logprob is not None:
                    logprobs.append(res.logprob)
                path = (*paths[row], res.token_id)
                row = next((c for c in range(row + 1, n) if paths[c] == path), 0)  # the draft it confirms
                if not row:
                    break
                rows.append(row)
            if rows != list(range(1, len(rows) + 1)):
                moves.append((s, rows))
            results[req.request_id] = RequestResult(tuple(tokens), tuple(logprobs))
            i += n
        return moves

    def _accepted_moves(self, s: ScheduledRequest, rows: list[int]) -> TokenMove:
        """Where the KV of a tree's accepted drafts is (slots ``start + row``) and where it goes (the
        positions they take in the sequence, ``start + 1, start + 2, ...``): (source blocks, source
        offsets, target blocks, target offsets)."""
        bs = self.kv.block_size
        blocks = s.request.block_ids
        src = [s.start + r for r in rows]
        dst = [s.start + 1 + j for j in range(len(rows))]
        return ([blocks[p // bs] for p in src], [p % bs for p in src], [blocks[p // bs] for p in dst],
                [p % bs for p in dst])

    def _move_tokens(self, move: TokenMove) -> None:
        """Move tokens' KV in this rank's cache; a tensor-parallel rank 0 has its peers do the same
        before their next step."""
        self.kv.move_tokens(*(torch.tensor(xs, dtype=torch.int64, device=self.device) for xs in move))
        if self.group is not None and self.group.rank == 0:
            self._pending_moves.append(move)

    @staticmethod
    def _grammar_bitmask(constrained: list[tuple[int, Request, ScheduledRequest]], num_rows: int,
                         vocab_size: int) -> TokenBitmask | None:
        """The tokens each constrained request's grammar allows at each row it samples."""
        if not constrained:
            return None
        bitmask = new_bitmask(num_rows, vocab_size)
        rows: list[int] = []
        states = []
        for first, req, s in constrained:
            assert req.grammar is not None
            states.append((req.grammar, first, s.draft_token_ids))
            rows.extend(range(first, first + 1 + len(s.draft_token_ids)))
        fill_bitmasks(states, bitmask)
        return TokenBitmask(rows, bitmask if rows == list(range(num_rows)) else bitmask[rows])

    @staticmethod
    def _hidden_sums(hidden: torch.Tensor, scheduled: list[ScheduledRequest], offsets: list[int],
                     results: dict[str, RequestResult]) -> None:
        """Embedding requests: the fp32 sum of the final hidden states of this step's prompt rows."""
        for s, off in zip(scheduled, offsets):
            if s.request.embed:
                total = hidden[off : off + s.num_new_tokens].float().sum(dim=0)
                results[s.request.request_id] = RequestResult(hidden_sum=tuple(total.tolist()))

    @staticmethod
    def _prompt_logprobs(logits: torch.Tensor, prompt: list[tuple[int, ScheduledRequest, int]],
                         results: dict[str, RequestResult]) -> None:
        for first, s, n in prompt:
            r = s.request
            targets = torch.tensor(r.prompt_token_ids[s.start + 1 : s.start + 1 + n], device=logits.device)
            lps = compute_logprobs(logits[first : first + n], targets, [r.params.prompt_logprobs] * n)
            prev = results.get(r.request_id, RequestResult())
            results[r.request_id] = RequestResult(prev.token_ids, prev.logprobs, tuple(lps))
