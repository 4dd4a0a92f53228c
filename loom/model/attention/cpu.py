"""The CPU backend: decode rows go through the native AVX-512 paged kernel, which reads keys and
values in place through the block table (no gather copy); prefill chunks use SDPA."""

from __future__ import annotations

import torch

from loom.model.attention.base import AttentionBackend, AttentionMetadata
from loom.model.kernels import native_ops
from loom.model.kv_cache import KVCache


class CPUAttention(AttentionBackend):
    name = "cpu"

    def __init__(self, kv: KVCache) -> None:
        if kv.device.type != "cpu":
            raise ValueError(f"the cpu attention backend needs the KV cache on the CPU, not {kv.device}")
        ops = native_ops()
        if ops is None:
            raise ValueError("the cpu attention backend needs the native kernels, which could not be built "
                             "(see the warning above); use the torch backend")
        super().__init__(kv)
        self._decode = ops.decode_attention

    def decode(self, layer: int, q: torch.Tensor, meta: AttentionMetadata, scale: float, window: int) -> torch.Tensor:
        return self._decode(q, self.kv.keys[layer], self.kv.values[layer], meta.decode_block_tables,
                            meta.decode_context_lens, scale, window)
