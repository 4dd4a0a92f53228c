"""Turns a scheduled batch into tensors, runs the model over the paged KV cache, returns hidden
states and logits. Owns the model weights and the KV cache tensors."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from loom.config import EngineConfig, ModelConfig
from loom.model.arch import model_class
from loom.model.arch.base import CausalLM
from loom.model.attention import AttentionMetadata, PrefillChunk
from loom.model.device import keep_freed_memory, resolve_dtype, set_threads, zeros_on_huge_pages
from loom.model.weights import iter_weights
from loom.model.kernels import native_ops
from loom.scheduler import ScheduledRequest

log = logging.getLogger(__name__)

DEFAULT_KV_CACHE_BYTES = 1 << 30


@dataclass
class Batch:
    """A step's flat batch. ``order`` lists the scheduled requests as laid out (decodes first)."""

    order: list[ScheduledRequest]
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    token_offsets: list[int]  # row of each request's first token in the flat batch


def load_model(config: ModelConfig, model_dir: Path, dtype: torch.dtype) -> CausalLM:
    cls = model_class(config.architecture)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = cls(config)
    finally:
        torch.set_default_dtype(prev)
    model.load_weights(iter_weights(model_dir))
    return model.eval()


class ModelRunner:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, model_dir: Path) -> None:
        set_threads(config.num_threads)
        keep_freed_memory()
        self.dtype = resolve_dtype(config.dtype)
        self.model_config = model_config
        self.block_size = config.cache.block_size
        self.model = load_model(model_config, model_dir, self.dtype)
        self.num_blocks = self._num_blocks(config)
        c = model_config
        shape = (self.num_blocks, c.num_kv_heads, self.block_size, c.head_dim)
        self.kv_caches = [(zeros_on_huge_pages(shape, self.dtype), zeros_on_huge_pages(shape, self.dtype)) for _ in range(c.num_layers)]
        self.use_kernel = native_ops() is not None

    @property
    def bytes_per_block(self) -> int:
        c = self.model_config
        return 2 * c.num_layers * self.block_size * c.num_kv_heads * c.head_dim * torch.finfo(self.dtype).bits // 8

    def _num_blocks(self, config: EngineConfig) -> int:
        if config.cache.num_blocks is not None:
            return config.cache.num_blocks
        budget = config.cache.kv_cache_bytes or DEFAULT_KV_CACHE_BYTES
        n = budget // self.bytes_per_block
        if n < 1:
            raise ValueError(f"KV cache budget of {budget} bytes holds no block ({self.bytes_per_block} bytes each)")
        return int(n)

    def copy_block(self, src: int, dst: int) -> None:
        for k, v in self.kv_caches:
            k[dst].copy_(k[src])
            v[dst].copy_(v[src])

    def prepare(self, scheduled: list[ScheduledRequest]) -> Batch:
        bs = self.block_size
        decodes = [s for s in scheduled if s.num_new_tokens == 1]
        chunks = [s for s in scheduled if s.num_new_tokens > 1]
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        offsets: list[int] = []
        max_blocks = max((len(s.request.block_ids) for s in decodes), default=0)
        tables = torch.zeros((len(decodes), max_blocks), dtype=torch.int32)
        lens: list[int] = []
        for i, s in enumerate(decodes):
            r, p = s.request, s.start
            offsets.append(len(ids))
            ids.append(r.token_ids_slice(p, p + 1)[0])
            pos.append(p)
            slots.append(r.block_ids[p // bs] * bs + p % bs)
            tables[i, : len(r.block_ids)] = torch.tensor(r.block_ids, dtype=torch.int32)
            lens.append(p + 1)
        prefills: list[PrefillChunk] = []
        for s in chunks:
            r, start, n = s.request, s.start, s.num_new_tokens
            offsets.append(len(ids))
            ids.extend(r.token_ids_slice(start, start + n))
            p = torch.arange(start, start + n)
            blocks = torch.tensor(r.block_ids[: (start + n + bs - 1) // bs], dtype=torch.int64)
            pos.extend(p.tolist())
            slots.extend((blocks[p // bs] * bs + p % bs).tolist())
            prefills.append(PrefillChunk(len(ids) - n, len(ids), start, blocks))
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            num_decodes=len(decodes),
            decode_block_tables=tables,
            decode_context_lens=torch.tensor(lens, dtype=torch.int32),
            prefills=prefills,
            block_size=bs,
            use_kernel=self.use_kernel,
        )
        return Batch(
            order=decodes + chunks,
            input_ids=torch.tensor(ids, dtype=torch.int64),
            positions=torch.tensor(pos, dtype=torch.int64),
            meta=meta,
            token_offsets=offsets,
        )

    @torch.inference_mode()
    def forward(self, batch: Batch) -> torch.Tensor:
        """Hidden states [T, hidden] of every token of the batch (KV written to the cache)."""
        return self.model(batch.input_ids, batch.positions, batch.meta, self.kv_caches)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor, rows: list[int] | torch.Tensor) -> torch.Tensor:
        idx = rows if isinstance(rows, torch.Tensor) else torch.tensor(rows, dtype=torch.int64)
        return self.model.compute_logits(hidden.index_select(0, idx))
