"""Attention over the paged KV cache for a mixed batch of decodes and prefill chunks.

The flat batch holds the decode tokens first (one per sequence), then the prefill chunks. Decodes
go through one call of the native paged kernel (keys read in place through the block table);
each prefill chunk goes through PyTorch's SDPA, on its fresh keys when it has no earlier context,
else on its context gathered block by block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loom.model.kernels import native_ops


@dataclass
class PrefillChunk:
    token_start: int  # rows of the flat batch
    token_end: int
    start_pos: int  # tokens of this sequence already in the cache before the chunk
    block_ids: torch.Tensor  # int64 [num_blocks covering start_pos + chunk]


@dataclass
class AttentionMetadata:
    """Per-step tensors shared by every layer (built once by the model runner)."""

    slot_mapping: torch.Tensor  # int64 [T]: cache slot of each new token (block * block_size + offset)
    num_decodes: int
    decode_block_tables: torch.Tensor  # int32 [num_decodes, max_blocks]
    decode_context_lens: torch.Tensor  # int32 [num_decodes], including the new token
    prefills: list[PrefillChunk]
    block_size: int
    use_kernel: bool

    def __post_init__(self) -> None:
        # Split once per step; every layer writes its new keys at these (block, offset) pairs.
        self.slot_blocks = self.slot_mapping // self.block_size
        self.slot_offsets = self.slot_mapping % self.block_size


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> None:
    k_cache[meta.slot_blocks, :, meta.slot_offsets] = k
    v_cache[meta.slot_blocks, :, meta.slot_offsets] = v


def _gather(cache: torch.Tensor, block_ids: torch.Tensor, length: int) -> torch.Tensor:
    """One sequence's first ``length`` keys (or values) as [Hkv, length, D]."""
    blocks = cache[block_ids]  # [nb, Hkv, bs, D]
    return blocks.transpose(0, 1).flatten(1, 2)[:, :length]


def _decode_fallback(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float, window: int
) -> torch.Tensor:
    """Pure PyTorch decode attention: gather each sequence's blocks, mask the padding."""
    bt = meta.decode_block_tables.long()
    lens = meta.decode_context_lens.long()
    n, nb = bt.shape
    bs = meta.block_size
    k = k_cache[bt].transpose(1, 2).flatten(2, 3)  # [n, Hkv, nb * bs, D]
    v = v_cache[bt].transpose(1, 2).flatten(2, 3)
    pos = torch.arange(nb * bs)
    mask = pos[None, :] < lens[:, None]
    if window > 0:
        mask &= pos[None, :] >= (lens[:, None] - window)
    out = F.scaled_dot_product_attention(
        q.unsqueeze(2), k, v, attn_mask=mask[:, None, None, :], scale=scale, enable_gqa=True
    )
    return out.squeeze(2)


def _prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    chunk: PrefillChunk,
    scale: float,
    window: int,
) -> torch.Tensor:
    """Causal attention of one chunk's queries over its context plus itself."""
    n = q.shape[0]
    total = chunk.start_pos + n
    qh = q.transpose(0, 1)
    if chunk.start_pos == 0:
        kh, vh = k.transpose(0, 1), v.transpose(0, 1)
    else:
        kh, vh = _gather(k_cache, chunk.block_ids, total), _gather(v_cache, chunk.block_ids, total)
    # 4-D inputs: with 3-D ones SDPA takes its slow math path on the CPU instead of flash attention.
    qh, kh, vh = qh.unsqueeze(0), kh.unsqueeze(0), vh.unsqueeze(0)
    if chunk.start_pos == 0 and (window <= 0 or total <= window):
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=True)
    else:
        qpos = torch.arange(chunk.start_pos, total)[:, None]
        kpos = torch.arange(total)[None, :]
        mask = kpos <= qpos
        if window > 0:
            mask &= kpos > qpos - window
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    window: int = 0,
) -> torch.Tensor:
    """q: [T, H, D]; k, v: [T, Hkv, D] (this step's keys, already rotated); caches:
    [num_blocks, Hkv, block_size, D]. Writes k, v into the cache and returns [T, H, D]."""
    write_kv(k_cache, v_cache, k, v, meta)
    nd = meta.num_decodes
    if not meta.prefills:
        return _decode(q, k_cache, v_cache, meta, scale, window)
    out = torch.empty_like(q)
    if nd:
        out[:nd] = _decode(q[:nd], k_cache, v_cache, meta, scale, window)
    for c in meta.prefills:
        s, e = c.token_start, c.token_end
        out[s:e] = _prefill(q[s:e], k[s:e], v[s:e], k_cache, v_cache, c, scale, window)
    return out


def _decode(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float, window: int
) -> torch.Tensor:
    if meta.use_kernel:
        ops = native_ops()
        assert ops is not None
        return ops.decode_attention(
            q, k_cache, v_cache, meta.decode_block_tables, meta.decode_context_lens, scale, window
        )
    return _decode_fallback(q, k_cache, v_cache, meta, scale, window)
