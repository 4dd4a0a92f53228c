"""The CPU backend: decode rows go through the native AVX-512 paged kernels, which read keys and
values in place through the block table (no gather copy), int8 and KIVI codes included; prefill
chunks use SDPA."""

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
        spec = kv.spec
        # The KIVI kernel's shapes; elsewhere the reference path (gathered, dequantized blocks) serves.
        self._kivi = (ops.decode_attention_kivi if ops.has_kivi_attention() and spec.head_dim % 32 == 0
                      and spec.head_dim <= 256 and spec.dtype in (torch.float32, torch.bfloat16) else None)

    @property
    def serves_kivi_natively(self) -> bool:
        """Whether the native KIVI kernel serves this cache's shapes (else the reference path does)."""
        return self._kivi is not None

    def decode(self, layer: int, q: torch.Tensor, meta: AttentionMetadata, scale: float, window: int) -> torch.Tensor:
        kv, i = self.kv.layer_cache(layer)
        if kv.spec.kivi:
            if self._kivi is None:
                return self.gathered_decode(layer, q, meta, scale, window)
            return self._kivi(q, kv.keys[i], kv.values[i], kv.key_scales[i], kv.key_zeros[i], kv.value_scales[i],
                              kv.value_zeros[i], kv.residual_keys[i], kv.residual_values[i], meta.decode_block_tables,
                              meta.decode_context_lens, meta.decode_slots, kv.spec.bits, kv.spec.residual_tokens,
                              scale, window)
        if kv.spec.quantized:
            return self._decode(q, kv.keys[i], kv.values[i], meta.decode_block_tables, meta.decode_context_lens,
                                scale, window, kv.key_scales[i], kv.value_scales[i])
        # A plain cache in another dtype than the compute dtype: the kernel computes in the cache's.
        out = self._decode(q.to(kv.dtype), kv.keys[i], kv.values[i], meta.decode_block_tables,
                           meta.decode_context_lens, scale, window)
        return out.to(q.dtype)
