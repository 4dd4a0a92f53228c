"""The pure PyTorch backend: runs on any device, and is the reference the others are tested
against. Decode rows gather their blocks and run one masked SDPA call."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loom.model.attention.base import AttentionBackend, AttentionMetadata


class TorchAttention(AttentionBackend):
    name = "torch"

    def decode(self, layer: int, q: torch.Tensor, meta: AttentionMetadata, scale: float, window: int) -> torch.Tensor:
        k, v = self.kv.gather_batch(layer, meta.decode_block_tables)  # [R, Hkv, nb * bs, D]
        lens = meta.decode_context_lens.long()
        pos = torch.arange(k.shape[2], device=q.device)
        mask = pos[None, :] < lens[:, None]
        if window > 0:
            mask &= pos[None, :] >= (lens[:, None] - window)
        out = F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=mask[:, None, None, :], scale=scale,
                                             enable_gqa=True)
        return out.squeeze(2)
