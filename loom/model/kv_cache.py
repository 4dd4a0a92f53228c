"""The paged KV cache's storage: per-layer key and value blocks in one element format.

A block holds ``block_size`` tokens of every KV head, head-major (``[num_kv_heads, block_size,
head_dim]``), so one head's keys within a block are contiguous for the decode kernel. Block
tables (which blocks a sequence owns) live in ``loom/kvcache``; this object only stores.

Formats (``--kv-cache-dtype``): ``auto`` stores the compute dtype, ``bf16`` / ``fp32`` store that
dtype whatever the compute dtype, and ``int8`` stores int8 codes with fp16 scales (``Int8KVCache``).
Reads (``gather``) always return the compute dtype."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loom.config import KV_CACHE_DTYPES
from loom.model.device import zeros
from loom.model.kernels import native_ops

PLAIN_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
INT8 = "int8"
INT8_SCALE_DTYPE = torch.float16
INT8_KEY_GROUP = 16  # dims per key scale of the int8 cache (one scale per token and head for values)


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
        per_head = 2 * self.head_dim * self.storage_dtype.itemsize  # a key and a value
        if self.quantized:  # their scales
            per_head += (self.head_dim // INT8_KEY_GROUP + 1) * INT8_SCALE_DTYPE.itemsize
        return self.num_layers * self.num_kv_heads * per_head

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
        # A quantized format's scales (Int8KVCache's shapes), read by the kernels beside the codes.
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


def quantize_int8(x: torch.Tensor, group: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes of ``x`` ``[..., D]`` with one fp16 scale (max |x| / 127) per ``group``
    values (None: per row), the codes rounded half to even against the stored fp16 scale. Returns
    the codes ``[..., D]`` and the scales ``[..., D / group]`` (``[...]`` per row). The native
    ``kv_write`` computes the same codes and scales bit for bit."""
    xf = x.float().unflatten(-1, (-1, group or x.shape[-1]))
    scale = (xf.abs().amax(dim=-1) / 127).to(INT8_SCALE_DTYPE)
    s = scale.float()[..., None]
    codes = torch.where(s > 0, xf / s, torch.zeros_like(xf)).round().clamp(-127, 127).to(torch.int8)
    return codes.flatten(-2), scale if group else scale.squeeze(-1)


class Int8KVCache(KVCache):
    """int8 codes with fp16 scales: a value has one scale per token and head, a key one per token,
    head and group of ``INT8_KEY_GROUP`` dims. Keys carry outlier channels (Qwen2.5's most of all):
    with one scale per key, Qwen2.5-Coder-0.5B's perplexity rose 2.3%, with one per 16 dims 0.4%,
    while values lose nothing with one per token. At head_dim 64 a token and head take 138
    bytes against 256 in bf16. Decode attention reads the codes in place and dequantizes in
    registers; reads for prefill dequantize the gathered blocks.

    Values are stored token-major like a plain cache's. Keys are pair-major within each block and
    head: dims 2i and 2i+1 of the block's tokens form one run of ``2 * block_size`` codes, so that the
    decode kernel's integer dot products come out with one key per vector lane (``_pair_major``);
    their scales are ``[blocks, heads, head_dim / INT8_KEY_GROUP, block_size]``."""

    def __init__(self, spec: KVCacheSpec, num_blocks: int, device: torch.device) -> None:
        if spec.head_dim % INT8_KEY_GROUP:
            raise ValueError(f"the int8 KV cache needs head_dim to be a multiple of {INT8_KEY_GROUP}, "
                             f"not {spec.head_dim}")
        super().__init__(spec, num_blocks, device)
        n, h, bs = num_blocks, spec.num_kv_heads, spec.block_size
        key_shape = (n, h, spec.head_dim // INT8_KEY_GROUP, bs)
        self.key_scales = [zeros(key_shape, INT8_SCALE_DTYPE, device) for _ in range(spec.num_layers)]
        self.value_scales = [zeros((n, h, bs), INT8_SCALE_DTYPE, device) for _ in range(spec.num_layers)]
        ops = native_ops() if device.type == "cpu" and spec.dtype in (torch.float32, torch.bfloat16) else None
        self._native_gather = ops.kv_gather_int8 if ops is not None else None

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, blocks: torch.Tensor, offsets: torch.Tensor) -> None:
        if self._native_write is not None:
            self._native_write(self.keys[layer], self.values[layer], k, v, blocks, offsets,
                               self.key_scales[layer], self.value_scales[layer])
            return
        kc, ks = quantize_int8(k, INT8_KEY_GROUP)
        self._pair_major(self.keys[layer])[blocks, :, :, offsets] = kc.unflatten(-1, (-1, 2))
        self.key_scales[layer][blocks, :, :, offsets] = ks
        vc, vs = quantize_int8(v)
        self.values[layer][blocks, :, offsets] = vc
        self.value_scales[layer][blocks, :, offsets] = vs

    def gather(self, layer: int, block_ids: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._native_gather is None:
            return super().gather(layer, block_ids, length)
        return self._native_gather(self.keys[layer], self.values[layer], self.key_scales[layer],
                                   self.value_scales[layer], block_ids, length, self.spec.dtype)

    @staticmethod
    def _pair_major(codes: torch.Tensor) -> torch.Tensor:
        """A key layer ``[..., heads, block_size, head_dim]`` as stored: ``[..., heads, head_dim / 2, block_size, 2]``."""
        *lead, bs, d = codes.shape
        return codes.view(*lead, d // 2, bs, 2)

    def _read(self, layer: int, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key_codes = self._pair_major(self.keys[layer][index]).transpose(-3, -2).flatten(-2)  # [..., bs, D]
        key_scales = self.key_scales[layer][index].transpose(-2, -1).repeat_interleave(INT8_KEY_GROUP, -1)
        values = self.values[layer][index].float() * self.value_scales[layer][index].float()[..., None]
        return (key_codes.float() * key_scales.float()).to(self.spec.dtype), values.to(self.spec.dtype)


def make_kv_cache(spec: KVCacheSpec, num_blocks: int, device: torch.device) -> KVCache:
    """The cache object for ``spec.cache_dtype``."""
    return (Int8KVCache if spec.quantized else KVCache)(spec, num_blocks, device)
