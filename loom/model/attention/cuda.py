"""The CUDA backend: PyTorch SDPA over the paged cache on the GPU (no custom CUDA kernels).

Decode rows gather their blocks and run one masked SDPA call, which PyTorch dispatches to its
memory-efficient CUDA kernel; prefill chunks run causal SDPA (flash attention on the GPU)."""

from __future__ import annotations

from loom.model.attention.torch_sdpa import TorchAttention
from loom.model.kv_cache import KVCache


class CUDAAttention(TorchAttention):
    name = "cuda"

    def __init__(self, kv: KVCache) -> None:
        if kv.device.type != "cuda":
            raise ValueError(f"the cuda attention backend needs the KV cache on a GPU, not {kv.device}")
        super().__init__(kv)
