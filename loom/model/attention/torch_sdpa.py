"""The pure PyTorch backend: runs on any device, and is the reference the others are tested
against. Decode rows gather their blocks and run one masked SDPA call."""

from __future__ import annotations

import torch

from loom.model.attention.base import AttentionBackend, AttentionMetadata


class TorchAttention(AttentionBackend):
    name = "torch"

    def decode(self, layer: int, q: torch.Tensor, meta: AttentionMetadata, scale: float, window: int) -> torch.Tensor:
        return self.gathered_decode(layer, q, meta, scale, window)
