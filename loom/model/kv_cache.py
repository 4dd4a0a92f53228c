"""The paged KV cache's storage: per-layer key and value blocks in one element format.

A block holds ``block_size`` tokens of every KV head, head-major (``[num_kv_heads, block_size,
head_dim]``), so one head's keys within a block are contiguous for the decode kernel. Block
tables (which blocks a sequence owns) live in ``loom/kvcache``; this object only stores.
Quantized formats are subclasses with their own ``bytes_per_block``, ``write`` and read path."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loom.model.device import zeros
from loom.model.kernels import native_ops


@dataclass(frozen=True)
class KVCacheSpec:
    """Layout and element format of the cache (what sizes a block)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype.itemsize

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
    def __init__(self, spec: KVCacheSpec, num_blocks: int, device: torch.device) -> None:
        self.spec = spec
        self.num_blocks = num_blocks
        self.device = device
        shape = (num_blocks, spec.num_kv_heads, spec.block_size, spec.head_dim)
        self.keys = [zeros(shape, spec.dtype, device) for _ in range(spec.num_layers)]
        self.values = [zeros(shape, spec.dtype, device) for _ in range(spec.num_layers)]
        ops = native_ops() if device.type == "cpu" else None
        self._native_write = ops.kv_write if ops is not None else None  # one call per layer for k and v

    @property
    def block_size(self) -> int:
        return self.spec.block_size

    @property
    def dtype(self) -> torch.dtype:
        return self.spec.dtype

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, blocks: torch.Tensor, offsets: torch.Tensor) -> None:
        """Store this step's keys and values ``[T, num_kv_heads, head_dim]`` at (block, offset) slots."""
        if self._native_write is not None:
            self._native_write(self.keys[layer], self.values[layer], k, v, blocks, offsets)
            return
        self.keys[layer][blocks, :, offsets] = k
        self.values[layer][blocks, :, offsets] = v

    def gather(self, layer: int, block_ids: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One sequence's first ``length`` keys and values, each ``[num_kv_heads, length, head_dim]``."""
        return tuple(c[block_ids].transpose(0, 1).flatten(1, 2)[:, :length] for c in (self.keys[layer], self.values[layer]))  # type: ignore[return-value]

    def gather_batch(self, layer: int, block_tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the blocks of each row of ``block_tables`` ``[R, nb]``, as
        ``[R, num_kv_heads, nb * block_size, head_dim]`` (padding slots included)."""
        bt = block_tables.long()
        return tuple(c[bt].transpose(1, 2).flatten(2, 3) for c in (self.keys[layer], self.values[layer]))  # type: ignore[return-value]

    def copy_block(self, src: int, dst: int) -> None:
        for cache in (*self.keys, *self.values):
            cache[dst].copy_(cache[src])
