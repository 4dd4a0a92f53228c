"""The paged KV cache's storage: per-layer key and value blocks in one element format.

A block holds ``block_size`` tokens of every KV head, head-major (``[num_kv_heads, block_size,
head_dim]``), so one head's keys within a block are contiguous for the decode kernel. Block
tables (which blocks a sequence owns) live in ``loom/kvcache``; this object only stores.

Formats (``--kv-cache-dtype``): ``auto`` stores the compute dtype, ``bf16`` / ``fp32`` store that
dtype whatever the compute dtype, and ``int8`` stores int8 codes with one fp16 scale per token and
head (``Int8KVCache``). Reads (``gather``) always return the compute dtype."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loom.config import KV_CACHE_DTYPES
from loom.model.device import zeros
from loom.model.kernels import native_ops

PLAIN_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
INT8 = "int8"
INT8_SCALE_DTYPE = torch.float16


@dataclass(frozen=True)
class KVCacheSpec:
    """Layout and element format of the cache (what sizes a block)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype  # the compute dtype: what attention reads back
    cache_dtype: str = "auto"  # one of KV_CACHE_DTYPES

    def __post_init__(self) -> None:
        if self.cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"unknown KV cache dtype {self.cache_dtype!r} (choose {', '.join(KV_CACHE_DTYPES)})")

    @property
    def storage_dtype(self) -> torch.dtype:
        """The element type of the key and value tensors."""
        if self.cache_dtype == INT8:
            return torch.int8
        return PLAIN_DTYPES.get(self.cache_dtype, self.dtype)

    @property
    def quantized(self) -> bool:
        return self.cache_dtype == INT8

    @property
    def bytes_per_token(self) -> int:
        per_head = self.head_dim * self.storage_dtype.itemsize
        if self.quantized:
            per_head += INT8_SCALE_DTYPE.itemsize
        return 2 * self.num_layers * self.num_kv_heads * per_head

    @property
    def bytes_per_block(self) -> int:
        return self.block_size * self.bytes_per_token

    def num_blocks_for(self, budget_bytes: int) -> int:
        n = budget_bytes // self.bytes_per_block
        if n < 1:
            raise ValueError(f"a KV cache budget of {budget_bytes} bytes holds no block "
                             f"({self.bytes_per_block} bytes each)")
        return int(n)


class KVCache:
    """A cache that stores keys and values as they are (in ``spec.storage_dtype``)."""

    def __init__(self, spec: KVCacheSpec, num_blocks: int, device: torch.device) -> None:
        self.spec = spec
        self.num_blocks = num_blocks
        self.device = device
        shape = (num_blocks, spec.num_kv_heads, spec.block_size, spec.head_dim)
        self.keys = [zeros(shape, spec.storage_dtype, device) for _ in range(spec.num_layers)]
        self.values = [zeros(shape, spec.storage_dtype, device) for _ in range(spec.num_layers)]
        # A quantized format's scales, one per (block, head, token), read by the kernels beside the codes.
        self.key_scales: list[torch.Tensor] = []
        self.value_scales: list[torch.Tensor] = []
        ops = native_ops() if device.type == "cpu" else None
        self._native_write = ops.kv_write if ops is not None else None  # one call per layer for k and v

    @property
    def block_size(self) -> int:
        return self.spec.block_size

    @property
    def dtype(self) -> torch.dtype:
        """The element type of the stored keys and values."""
        return self.spec.storage_dtype

    @property
    def lossy(self) -> bool:
        """Whether a read returns other values than were written. Prefill then attends to the keys
        as read back, never to the exact ones, so that a prompt's output does not depend on where
        chunks or cached prefixes begin."""
        return self.spec.storage_dtype not in (self.spec.dtype, torch.float32)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, blocks: torch.Tensor, offsets: torch.Tensor) -> None:
        """Store this step's keys and values ``[T, num_kv_heads, head_dim]`` at (block, offset) slots."""
        k, v = k.to(self.dtype), v.to(self.dtype)
        if self._native_write is not None:
            self._native_write(self.keys[layer], self.values[layer], k, v, blocks, offsets)
            return
        self.keys[layer][blocks, :, offsets] = k
        self.values[layer][blocks, :, offsets] = v

    def gather(self, layer: int, block_ids: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One sequence's first ``length`` keys and values, each ``[num_kv_heads, length, head_dim]``."""
        k, v = self._read(layer, block_ids)
        return k.transpose(0, 1).flatten(1, 2)[:, :length], v.transpose(0, 1).flatten(1, 2)[:, :length]

    def gather_batch(self, layer: int, block_tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the blocks of each row of ``block_tables`` ``[R, nb]``, as
        ``[R, num_kv_heads, nb * block_size, head_dim]`` (padding slots included)."""
        k, v = self._read(layer, block_tables.long())
        return k.transpose(1, 2).flatten(2, 3), v.transpose(1, 2).flatten(2, 3)

    def _read(self, layer: int, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The blocks ``index`` (any shape) of one layer in the compute dtype, ``[*index, Hkv, bs, D]``."""
        return self.keys[layer][index].to(self.spec.dtype), self.values[layer][index].to(self.spec.dtype)

    def copy_block(self, src: int, dst: int) -> None:
        for cache in (*self.keys, *self.values, *self.key_scales, *self.value_scales):
            cache[dst].copy_(cache[src])


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes of ``x`` ``[..., D]`` with one fp16 scale per row (max |x| / 127), the
    codes rounded half to even against the stored fp16 scale. The native ``kv_write`` computes the
    same codes and scales bit for bit."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1) / 127).to(INT8_SCALE_DTYPE)
    s = scale.float()[..., None]
    codes = torch.where(s > 0, xf / s, torch.zeros_like(xf)).round().clamp(-127, 127).to(torch.int8)
    return codes, scale


class Int8KVCache(KVCache):
    """int8 codes with an fp16 scale per (token, head) for keys and for values: 2 + head_dim bytes per
    token and head instead of 2 * head_dim in bf16. Decode attention reads the codes in place and
    dequantizes in registers; reads for prefill dequantize the gathered blocks."""

    def __init__(self, spec: KVCacheSpec, num_blocks: int, device: torch.device) -> None:
        super().__init__(spec, num_blocks, device)
        shape = (num_blocks, spec.num_kv_heads, spec.block_size)
        self.key_scales = [zeros(shape, INT8_SCALE_DTYPE, device) for _ in range(spec.num_layers)]
        self.value_scales = [zeros(shape, INT8_SCALE_DTYPE, device) for _ in range(spec.num_layers)]

    @property
    def lossy(self) -> bool:
        return True

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, blocks: torch.Tensor, offsets: torch.Tensor) -> None:
        if self._native_write is not None:
            self._native_write(self.keys[layer], self.values[layer], k, v, blocks, offsets,
                               self.key_scales[layer], self.value_scales[layer])
            return
        for codes, scales, x in ((self.keys, self.key_scales, k), (self.values, self.value_scales, v)):
            c, s = quantize_int8(x)
            codes[layer][blocks, :, offsets] = c
            scales[layer][blocks, :, offsets] = s

    def _read(self, layer: int, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        def dequantize(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
            return (codes[index].float() * scales[index].float()[..., None]).to(self.spec.dtype)

        return dequantize(self.keys[layer], self.key_scales[layer]), dequantize(self.values[layer], self.value_scales[layer])


def make_kv_cache(spec: KVCacheSpec, num_blocks: int, device: torch.device) -> KVCache:
    """The cache object for ``spec.cache_dtype``."""
    return (Int8KVCache if spec.quantized else KVCache)(spec, num_blocks, device)
