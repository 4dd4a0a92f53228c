"""What every attention backend shares: the per-step metadata, and the step's flat batch split
into rows served by the paged decode path and prefill chunks served by SDPA.

The flat batch holds the decode rows first, then the prefill chunks. A decode row is one query
token: a plain decode has one, a decode verifying ``k`` draft tokens has ``1 + k`` consecutive
rows of the same sequence, each seeing the keys up to its own position (the causal mask inside
the new tokens). Each prefill chunk attends to its context plus itself."""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loom.model.kv_cache import KVCache, ResidualWrites


@dataclass
class PrefillChunk:
    token_start: int  # rows of the flat batch
    token_end: int
    start_pos: int  # tokens of this sequence already in the cache before the chunk
    block_ids: torch.Tensor  # int64 [num_blocks covering start_pos + chunk]
    slot: int = -1  # the sequence's residual slot (a cache with a residual)
    # A tree of drafts to verify: which of the chunk's rows each row sees (its ancestors and itself)
    # instead of the causal mask; the rows sit in consecutive slots but at their depths' positions.
    tree: torch.Tensor | None = None  # bool [rows, rows]


@dataclass
class AttentionMetadata:
    """Per-step tensors shared by every layer (built once by the worker)."""

    slot_blocks: torch.Tensor  # int64 [T]: cache block of each new token
    slot_offsets: torch.Tensor  # int64 [T]: its offset in the block
    num_decode_rows: int
    decode_block_tables: torch.Tensor  # int32 [num_decode_rows, max_blocks]
    decode_context_lens: torch.Tensor  # int32 [num_decode_rows]: keys visible to the row, itself included
    prefills: list[PrefillChunk]
    # A cache with a residual (KIVI): each decode row's slot, and where the step's rows go.
    decode_slots: torch.Tensor | None = None  # int32 [num_decode_rows]
    residual: ResidualWrites | None = None


class AttentionBackend(ABC):
    """Attention over the paged cache for one device and cache format. Architectures call
    ``forward`` and never see the cache's storage."""

    name: str = ""

    def __init__(self, kv: KVCache) -> None:
        self.kv = kv

    def forward(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata,
        scale: float, window: int = 0,
    ) -> torch.Tensor:
        """q: [T, H, D]; k, v: [T, Hkv, D] (this step's keys, already rotated). Writes k, v into
        layer ``layer`` of the cache and returns [T, H, D]. ``window > 0``: sliding window."""
        kv, i = self.kv.layer_cache(layer)
        # A residual's open group as it was before this step's write (which may seal and reuse it).
        open_groups = [kv.open_group(i, c.slot, c.start_pos) for c in meta.prefills] if kv.num_slots else []
        kv.write(i, k, v, meta.slot_blocks, meta.slot_offsets, meta.residual)
        nd = meta.num_decode_rows
        if not meta.prefills:
            return self.decode(layer, q, meta, scale, window)
        out = torch.empty_like(q)
        if nd:
            out[:nd] = self.decode(layer, q[:nd], meta, scale, window)
        for j, c in enumerate(meta.prefills):
            s, e = c.token_start, c.token_end
            if c.tree is not None:
                if open_groups:
                    raise ValueError("a tree of drafts cannot be verified over a cache with a residual")
                out[s:e] = self.tree_prefill(layer, q[s:e], c, scale, window)
            elif open_groups:
                out[s:e] = self.residual_prefill(layer, q[s:e], k[s:e], v[s:e], c, scale, window, open_groups[j])
            else:
                out[s:e] = self.prefill(layer, q[s:e], k[s:e], v[s:e], c, scale, window)
        return out

    @abstractmethod
    def decode(self, layer: int, q: torch.Tensor, meta: AttentionMetadata, scale: float, window: int) -> torch.Tensor:
        """Attention of the decode rows ``q`` [num_decode_rows, H, D] over the cache."""

    def gathered_decode(self, layer: int, q: torch.Tensor, meta: AttentionMetadata, scale: float,
                        window: int) -> torch.Tensor:
        """Decode rows by gathering their blocks (dequantized) and one masked SDPA call: the
        reference path, for any device and format."""
        kv, i = self.kv.layer_cache(layer)
        k, v = kv.gather_batch(i, meta.decode_block_tables, meta.decode_context_lens, meta.decode_slots)
        lens = meta.decode_context_lens.long()
        pos = torch.arange(k.shape[2], device=q.device)
        mask = pos[None, :] < lens[:, None]
        if window > 0:
            mask &= pos[None, :] >= (lens[:, None] - window)
        out = F.scaled_dot_product_attention(q.unsqueeze(2).to(k.dtype), k, v, attn_mask=mask[:, None, None, :],
                                             scale=scale, enable_gqa=True)
        return out.squeeze(2).to(q.dtype)

    def prefill(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: PrefillChunk, scale: float,
        window: int,
    ) -> torch.Tensor:
        """Causal attention of one chunk's queries over its context plus itself (SDPA). A lossy cache's
        chunk attends to its own keys as read back from the cache."""
        n = q.shape[0]
        total = chunk.start_pos + n
        kv, i = self.kv.layer_cache(layer)
        if chunk.start_pos == 0 and not kv.lossy:
            kh, vh = k.transpose(0, 1), v.transpose(0, 1)
        else:
            kh, vh = kv.gather(i, chunk.block_ids, total, chunk.slot)
        # 4-D inputs: with 3-D ones SDPA takes its slow math path on the CPU instead of flash attention.
        qh, kh, vh = q.transpose(0, 1).unsqueeze(0), kh.unsqueeze(0), vh.unsqueeze(0)
        if chunk.start_pos == 0 and (window <= 0 or total <= window):
            out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=True)
        else:
            qpos = torch.arange(chunk.start_pos, total, device=q.device)[:, None]
            kpos = torch.arange(total, device=q.device)[None, :]
            mask = kpos <= qpos
            if window > 0:
                mask &= kpos > qpos - window
            out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=True)
        return out[0].transpose(0, 1)


    def tree_prefill(self, layer: int, q: torch.Tensor, chunk: PrefillChunk, scale: float, window: int) -> torch.Tensor:
        """A tree of drafts (with the known token first): each row attends to the cached context and
        to its own branch (``chunk.tree``), all read back from the cache."""
        assert chunk.tree is not None
        n = q.shape[0]
        kv, i = self.kv.layer_cache(layer)
        kh, vh = kv.gather(i, chunk.block_ids, chunk.start_pos + n, chunk.slot)
        context = torch.ones(n, chunk.start_pos, dtype=torch.bool, device=q.device)
        if window > 0:  # rows sit at their depths; the branch itself is never wider than the window
            depth = chunk.tree.sum(dim=1) - 1
            qpos = (chunk.start_pos + depth)[:, None]
            context &= torch.arange(chunk.start_pos, device=q.device)[None, :] > qpos - window
        mask = torch.cat([context, chunk.tree], dim=1)
        qh, kh, vh = q.transpose(0, 1).unsqueeze(0), kh.unsqueeze(0), vh.unsqueeze(0)
        out = F.scaled_dot_product_attention(qh, kh.to(q.dtype), vh.to(q.dtype), attn_mask=mask, scale=scale,
                                             enable_gqa=True)
        return out[0].transpose(0, 1)

    def residual_prefill(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: PrefillChunk, scale: float,
        window: int, open_group: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """A chunk over a cache with a residual of ``R`` tokens, attending as decoding token by token
        would: query ``p`` reads key ``j`` quantized when ``j``'s group of ``R`` was complete at
        ``p`` (``(j // R + 1) * R <= p + 1``), and in full precision otherwise. Both versions of the
        recent keys are in one SDPA call per piece of ``RESIDUAL_PREFILL_PIECE`` queries, each version
        visible where it applies (a piece reads only the keys its queries can see). ``open_group``:
        the residual's positions from the start of the open group to the chunk, before this step's
        write."""
        kv, i = self.kv.layer_cache(layer)
        n, r, start = q.shape[0], kv.spec.residual_tokens, chunk.start_pos
        kq, vq = kv.gather(i, chunk.block_ids, start + n, chunk.slot)  # [H, L, D], sealed groups quantized
        first = start - open_group[0].shape[1]  # the open group's start: exact keys from here on
        kf = torch.cat([open_group[0], k.transpose(0, 1).to(kq.dtype)], dim=1)
        vf = torch.cat([open_group[1], v.transpose(0, 1).to(vq.dtype)], dim=1)
        qh = q.transpose(0, 1).to(kq.dtype)
        out = torch.empty_like(qh)
        for a in range(start, start + n, RESIDUAL_PREFILL_PIECE):
            b = min(a + RESIDUAL_PREFILL_PIECE, start + n)
            quantized, exact = b // r * r, a // r * r  # keys [0, quantized) as stored, [exact, b) exact
            keys = torch.cat([kq[:, :quantized], kf[:, exact - first : b - first]], dim=1)
            values = torch.cat([vq[:, :quantized], vf[:, exact - first : b - first]], dim=1)
            mask = _residual_mask(a, b, quantized, exact, r, window, q.device, kq.dtype)
            out[:, a - start : b - start] = F.scaled_dot_product_attention(
                qh[None, :, a - start : b - start], keys[None], values[None], attn_mask=mask, scale=scale,
                enable_gqa=True)[0]
        return out.transpose(0, 1).to(q.dtype)


RESIDUAL_PREFILL_PIECE = 128  # queries per SDPA call of a residual prefill


@functools.lru_cache(maxsize=8)  # a step's pieces (a mask is pieces x context: keep few)
def _residual_mask(a: int, b: int, quantized: int, exact: int, r: int, window: int, device: torch.device,
                   dtype: torch.dtype) -> torch.Tensor:
    """The additive mask of queries [a, b) over keys [0, quantized) as stored then [exact, b) exact
    (``residual_prefill``); the same for every layer of a step, so built once."""
    qpos = torch.arange(a, b, device=device)[:, None]
    kpos = torch.cat([torch.arange(quantized, device=device), torch.arange(exact, b, device=device)])[None, :]
    stored = torch.arange(kpos.shape[1], device=device)[None, :] < quantized
    visible = (kpos <= qpos) & (((kpos // r + 1) * r <= qpos + 1) == stored)
    if window > 0:
        visible &= kpos > qpos - window
    return torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill_(~visible, float("-inf"))


class StepAttention:
    """A backend bound to one step's metadata: what the architectures call, per layer."""

    __slots__ = ("backend", "meta")

    def __init__(self, backend: AttentionBackend, meta: AttentionMetadata) -> None:
        self.backend = backend
        self.meta = meta

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int = 0) -> torch.Tensor:
        return self.backend.forward(layer, q, k, v, self.meta, scale, window)
