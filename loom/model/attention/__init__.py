"""Attention over the paged KV cache, one backend per device (chosen at start-up)."""

from __future__ import annotations

from loom.model.attention.base import AttentionBackend, AttentionMetadata, PrefillChunk, StepAttention
from loom.model.attention.cpu import CPUAttention
from loom.model.attention.cuda import CUDAAttention
from loom.model.attention.torch_sdpa import TorchAttention
from loom.model.kernels import native_ops
from loom.model.kv_cache import KVCache

BACKENDS: dict[str, type[AttentionBackend]] = {b.name: b for b in (CPUAttention, TorchAttention, CUDAAttention)}


def make_attention_backend(name: str, kv: KVCache) -> AttentionBackend:
    """``auto``: ``cuda`` on a GPU, ``cpu`` where the native kernels build, else ``torch``."""
    if name == "auto":
        if kv.device.type == "cuda":
            name = "cuda"
        else:
            name = "cpu" if kv.device.type == "cpu" and native_ops() is not None else "torch"
    try:
        cls = BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown attention backend {name!r} (choose auto, {', '.join(BACKENDS)})") from None
    return cls(kv)


__all__ = [
    "BACKENDS",
    "AttentionBackend",
    "AttentionMetadata",
    "PrefillChunk",
    "StepAttention",
    "make_attention_backend",
]
