"""The paged KV cache's storage: per-layer key and value blocks in one element format.

A block holds ``block_size`` tokens of every KV head, head-major (``[num_kv_heads, block_size,
head_dim]``), so one head's keys within a block are contiguous for the decode kernel. Block
tables (which blocks a sequence owns) live in ``loom/kvcache``; this object only stores.

Formats (``--kv-cache-dtype``): ``auto`` stores the compute dtype, ``bf16`` / ``fp32`` store that
dtype whatever the compute dtype, ``int8`` stores int8 codes with fp16 scales (``Int8KVCache``), and
``int4`` / ``int2`` store KIVI's asymmetric codes with a full-precision residual (``KiviKVCache``).
Reads (``gather``) always return the compute dtype."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace

import numpy as np
import torch

from loom.config import KV_CACHE_DTYPES
from loom.model.device import zeros
from loom.model.kernels import native_ops

PLAIN_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
INT8 = "int8"
INT8_SCALE_DTYPE = torch.float16
INT8_KEY_GROUP = 16  # dims per key scale of the int8 cache (one scale per token and head for values)
KIVI_BITS = {"int4": 4, "int2": 2}
KIVI_SCALE_DTYPE = torch.float16  # KIVI's scales and zero points


@dataclass(frozen=True)
class KVCacheSpec:
    """Layout and element format of the cache (what sizes a block)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype  # the compute dtype: what attention reads back
    cache_dtype: str = "auto"  # one of KV_CACHE_DTYPES
    residual_tokens: int = 0  # KIVI formats: tokens gathered in full precision before they are quantized
    value_group: int = 32  # KIVI formats: channels per value scale and zero point (at most head_dim)
    # A format per layer (KVTuner's layer-wise mixed precision; ``cache_dtype`` is then unused).
    layer_dtypes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in (self.cache_dtype, *self.layer_dtypes):
            if name not in KV_CACHE_DTYPES:
                raise ValueError(f"unknown KV cache dtype {name!r} (choose {', '.join(KV_CACHE_DTYPES)})")
        if self.layer_dtypes and len(self.layer_dtypes) != self.num_layers:
            raise ValueError(f"a per-layer KV cache plan needs {self.num_layers} formats, one per layer, "
                             f"not {len(self.layer_dtypes)}")
        if self.kivi:
            if self.residual_tokens < self.block_size or self.residual_tokens % self.block_size:
                raise ValueError(f"the {self.cache_dtype} KV cache needs --kv-residual-tokens to be a multiple of "
                                 f"--block-size {self.block_size}, not {self.residual_tokens}")
            g = self.value_group_size
            if g % 16 or self.head_dim % g:
                raise ValueError(f"the {self.cache_dtype} KV cache needs --kv-quant-group to be a multiple of 16 that "
                                 f"divides head_dim {self.head_dim} (or at least head_dim), not {self.value_group}")
            if self.block_size % 16:
                raise ValueError(f"the {self.cache_dtype} KV cache needs --block-size to be a multiple of 16, "
                                 f"not {self.block_size}")

    @property
    def mixed(self) -> bool:
        return bool(self.layer_dtypes)

    def layer_spec(self, layer: int) -> KVCacheSpec:
        """One layer of a mixed cache as a one-layer cache of its own format."""
        return replace(self, num_layers=1, cache_dtype=self.layer_dtypes[layer], layer_dtypes=())

    @property
    def kivi(self) -> bool:
        """Whether a KIVI format (and so the residual) is present, in any layer."""
        return any(d in KIVI_BITS for d in self.layer_dtypes or (self.cache_dtype,))

    @property
    def bits(self) -> int:
        """Bits per code of a KIVI format."""
        return KIVI_BITS[self.cache_dtype]

    @property
    def value_group_size(self) -> int:
        return min(self.value_group, self.head_dim)

    @property
    def storage_dtype(self) -> torch.dtype:
        """The element type of the key and value tensors."""
        if self.cache_dtype == INT8:
            return torch.int8
        if self.cache_dtype in KIVI_BITS:
            return torch.uint8  # packed codes
        return PLAIN_DTYPES.get(self.cache_dtype, self.dtype)

    @property
    def quantized(self) -> bool:
        return any(d == INT8 or d in KIVI_BITS for d in self.layer_dtypes or (self.cache_dtype,))

    @property
    def bytes_per_block(self) -> int:
        if self.mixed:
            return sum(self.layer_spec(i).bytes_per_block for i in range(self.num_layers))
        bs, d = self.block_size, self.head_dim
        if self.kivi:
            codes = 2 * bs * d * self.bits // 8  # a key and a value
            per_head = codes + 2 * KIVI_SCALE_DTYPE.itemsize * (d + bs * d // self.value_group_size)
        else:
            per_head = 2 * bs * d * self.storage_dtype.itemsize
            if self.quantized:  # int8 scales
                per_head += bs * (d // INT8_KEY_GROUP + 1) * INT8_SCALE_DTYPE.itemsize
        return self.num_layers * self.num_kv_heads * per_head

    @property
    def bytes_per_token(self) -> float:
        """Bytes of the blocks per token (the residual of a KIVI format not included)."""
        return self.bytes_per_block / self.block_size

    @property
    def bytes_per_residual_slot(self) -> int:
        """A KIVI format's full-precision residual of one sequence (0 for other formats)."""
        if self.mixed:
            return sum(self.layer_spec(i).bytes_per_residual_slot for i in range(self.num_layers))
        if self.cache_dtype not in KIVI_BITS:
            return 0
        return 2 * self.num_layers * self.num_kv_heads * self.residual_tokens * self.head_dim * self.dtype.itemsize

    def num_blocks_for(self, budget_bytes: int, num_slots: int = 0) -> int:
        """Blocks that fit ``budget_bytes`` after ``num_slots`` residual slots."""
        residual = num_slots * self.bytes_per_residual_slot
        n = (budget_bytes - residual) // self.bytes_per_block
        if n < 1:
            if residual:
                raise ValueError(
                    f"a KV cache budget of {budget_bytes / 2**20:.1f} MiB holds no block after the KIVI "
                    f"residual of {num_slots} sequences x {self.residual_tokens} tokens ({residual / 2**20:.1f} MiB); "
                    "lower --max-num-seqs or --kv-residual-tokens, or raise --kv-cache-memory")
            raise ValueError(f"a KV cache budget of {budget_bytes} bytes holds no block "
                             f"({self.bytes_per_block} bytes each)")
        return int(n)


@dataclass(frozen=True)
class SequenceWrite:
    """One sequence's share of a step's writes: flat batch rows ``first_row ..`` hold its positions
    ``start .. end - 1``; ``block_ids`` is its block table and ``slot`` its residual slot."""

    first_row: int
    start: int
    end: int
    block_ids: list[int]
    slot: int


@dataclass(frozen=True)
class ResidualWrites:
    """Where a step's keys and values go in a cache with a full-precision residual (built once per
    step, used by every layer). A group of ``residual_tokens`` positions completed in this step is
    assembled in a buffer from the residual (the positions of earlier steps) and from this step's
    rows, quantized, and written to ``seal_blocks``; the other rows go to the residual."""

    seal_blocks: torch.Tensor  # int64 [n]: the blocks of the sealed groups, in order
    seal_from_residual: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # buffer row, residual block, offset
    seal_from_step: tuple[torch.Tensor, torch.Tensor]  # buffer row, step row
    open_rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # step row, residual block, offset


class KVCache:
    """A cache that stores keys and values as they are (in ``spec.storage_dtype``)."""

    def __init__(self, spec: KVCacheSpec, num_blocks: int, device: torch.device) -> None:
        self.spec = spec
        self.num_blocks = num_blocks
        self.device = device
        key_shape, value_shape = self._shapes(num_blocks)
        self.keys = [zeros(key_shape, spec.storage_dtype, device) for _ in range(spec.num_layers)]
        self.values = [zeros(value_shape, spec.storage_dtype, device) for _ in range(spec.num_layers)]
        # A quantized format's scales (and KIVI's zero points), read by the kernels beside the codes.
        self.key_scales: list[torch.Tensor] = []
        self.value_scales: list[torch.Tensor] = []
        self.key_zeros: list[torch.Tensor] = []
        self.value_zeros: list[torch.Tensor] = []
        ops = native_ops() if device.type == "cpu" else None
        self._native_write = ops.kv_write if ops is not None else None  # one call per layer for k and v

    def _shapes(self, num_blocks: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The shapes of one layer's keys and values."""
        shape = (num_blocks, self.spec.num_kv_heads, self.spec.block_size, self.spec.head_dim)
        return shape, shape

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

    @property
    def num_slots(self) -> int:
        """Residual slots (one per sequence that holds blocks); 0 without a residual."""
        return 0

    def layer_cache(self, layer: int) -> tuple[KVCache, int]:
        """The cache object that stores ``layer``, and the layer's index in it: attention backends
        serve each layer by its own object's format (a mixed cache has one per layer)."""
        return self, layer

    def plan_residual_writes(self, seqs: list[SequenceWrite]) -> ResidualWrites | None:
        """The step's residual writes (None: the cache has no residual)."""
        return None

    def open_group(self, layer: int, slot: int, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A residual's keys and values ``[heads, n, head_dim]`` from the start of the group of
        ``position`` up to it (a copy)."""
        raise ValueError("this KV cache has no residual")

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, blocks: torch.Tensor, offsets: torch.Tensor,
              residual: ResidualWrites | None = None) -> None:
        """Store this step's keys and values ``[T, num_kv_heads, head_dim]`` at (block, offset) slots
        (a cache with a residual places them by ``residual`` instead)."""
        k, v = k.to(self.dtype), v.to(self.dtype)
        if self._native_write is not None:
            self._native_write(self.keys[layer], self.values[layer], k, v, blocks, offsets)
            return
        self.keys[layer][blocks, :, offsets] = k
        self.values[layer][blocks, :, offsets] = v

    def gather(self, layer: int, block_ids: torch.Tensor, length: int, slot: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
        """One sequence's first ``length`` keys and values, each ``[num_kv_heads, length, head_dim]``
        (``slot``: its residual slot, where the cache has a residual)."""
        k, v = self._read(layer, block_ids)
        return k.transpose(0, 1).flatten(1, 2)[:, :length], v.transpose(0, 1).flatten(1, 2)[:, :length]

    def gather_batch(self, layer: int, block_tables: torch.Tensor, context_lens: torch.Tensor | None = None,
                     slots: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the blocks of each row of ``block_tables`` ``[R, nb]``, as
        ``[R, num_kv_heads, nb * block_size, head_dim]`` (padding slots included). A cache with a
        residual needs each row's ``context_lens`` and residual ``slots``."""
        k, v = self._read(layer, block_tables.long())
        return k.transpose(1, 2).flatten(2, 3), v.transpose(1, 2).flatten(2, 3)

    def _read(self, layer: int, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The blocks ``index`` (any shape) of one layer in the compute dtype, ``[*index, Hkv, bs, D]``."""
        return self.keys[layer][index].to(self.spec.dtype), self.values[layer][index].to(self.spec.dtype)

    def block_tensors(self) -> list[torch.Tensor]:
        """Every tensor indexed by block id first (keys, values, scales, zero points), in a fixed order."""
        return [*self.keys, *self.values, *self.key_scales, *self.value_scales, *self.key_zeros, *self.value_zeros]

    def copy_block(self, src: int, dst: int) -> None:
        for cache in self.block_tensors():
            cache[dst].copy_(cache[src])

    def copy_slot(self, src: int, dst: int) -> None:
        """Copy one residual slot to another (a forked sample's open group)."""
        raise ValueError("this KV cache has no residual slots")

    def move_tokens(self, src_blocks: torch.Tensor, src_offsets: torch.Tensor, dst_blocks: torch.Tensor,
                    dst_offsets: torch.Tensor) -> None:
        """Copy the keys and values of tokens at (block, offset) slots to others, every layer (a
        verified tree's accepted drafts into their sequence positions). Sources are read first."""
        for t in (*self.keys, *self.values):
            t[dst_blocks, :, dst_offsets] = t[src_blocks, :, src_offsets]


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

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, blocks: torch.Tensor, offsets: torch.Tensor,
              residual: ResidualWrites | None = None) -> None:
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

    def gather(self, layer: int, block_ids: torch.Tensor, length: int, slot: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
        if self._native_gather is None:
            return super().gather(layer, block_ids, length)
        return self._native_gather(self.keys[layer], self.values[layer], self.key_scales[layer],
                                   self.value_scales[layer], block_ids, length, self.spec.dtype)

    def move_tokens(self, src_blocks: torch.Tensor, src_offsets: torch.Tensor, dst_blocks: torch.Tensor,
                    dst_offsets: torch.Tensor) -> None:
        for layer in range(self.spec.num_layers):
            keys = self._pair_major(self.keys[layer])
            keys[dst_blocks, :, :, dst_offsets] = keys[src_blocks, :, :, src_offsets]
            scales = self.key_scales[layer]
            scales[dst_blocks, :, :, dst_offsets] = scales[src_blocks, :, :, src_offsets]
            for t in (self.values[layer], self.value_scales[layer]):
                t[dst_blocks, :, dst_offsets] = t[src_blocks, :, src_offsets]

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


def quantize_asym(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KIVI's asymmetric codes of ``x`` over its last dim: ``codes = round((x - zero) / scale)`` in
    ``[0, 2^bits - 1]`` with ``zero = min`` and ``scale = (max - min) / (2^bits - 1)``, both stored in
    fp16 and the codes rounded against the stored values. Returns the uint8 codes (unpacked, the
    shape of ``x``) and the scales and zero points (``x``'s shape without its last dim)."""
    xf = x.float()
    levels = (1 << bits) - 1
    lo, hi = xf.amin(dim=-1), xf.amax(dim=-1)
    scale, zero = ((hi - lo) / levels).to(KIVI_SCALE_DTYPE), lo.to(KIVI_SCALE_DTYPE)
    s, z = scale.float()[..., None], zero.float()[..., None]
    codes = torch.where(s > 0, (xf - z) / s, torch.zeros_like(xf)).round().clamp(0, levels).to(torch.uint8)
    return codes, scale, zero


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``8 / bits`` codes per byte along the last dim, the first in the lowest bits."""
    per = 8 // bits
    c = codes.unflatten(-1, (-1, per)).to(torch.int32)
    shifts = torch.arange(0, 8, bits, dtype=torch.int32, device=codes.device)
    return (c << shifts).sum(dim=-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of ``pack_codes``."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    return ((packed[..., None] >> shifts) & ((1 << bits) - 1)).flatten(-2)


class KiviKVCache(KVCache):
    """KIVI ("KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", ICML 2024) on paged
    blocks: ``int4`` or ``int2`` codes with fp16 scales and zero points. A key has a scale and zero
    per channel over the block's tokens (keys carry outlier channels); a value has one per token and
    group of ``value_group`` channels. Codes are packed along the quantized dim: a key block and head
    is ``[head_dim, block_size * bits / 8]`` bytes, a value block and head ``[block_size, head_dim *
    bits / 8]``.

    The residual: each sequence holding blocks owns a slot of ``residual_tokens`` positions in the
    compute dtype. The newest tokens gather there, and when the group of ``residual_tokens``
    positions they belong to is complete, the group is quantized into its blocks at once, as KIVI
    quantizes keys (its values slide one token at a time; here they go with the keys). So a sequence
    of ``L`` tokens reads its first ``L // R * R`` from the blocks and the rest, ``0 .. R - 1`` of
    them, from its slot. A block is quantized once and never changes after, so full blocks are shared
    by prefix caching and forks like any others; the manager caches only blocks of complete groups.
    The slots are ``[num_slots * R / block_size, heads, block_size, head_dim]``, the plain layout, so
    the decode kernel reads the residual as plain blocks."""

    def __init__(self, spec: KVCacheSpec, num_blocks: int, device: torch.device, num_slots: int) -> None:
        super().__init__(spec, num_blocks, device)
        n, h, bs, d = num_blocks, spec.num_kv_heads, spec.block_size, spec.head_dim
        layers = range(spec.num_layers)
        self.key_scales = [zeros((n, h, d), KIVI_SCALE_DTYPE, device) for _ in layers]
        self.key_zeros = [zeros((n, h, d), KIVI_SCALE_DTYPE, device) for _ in layers]
        groups = (n, h, bs, d // spec.value_group_size)
        self.value_scales = [zeros(groups, KIVI_SCALE_DTYPE, device) for _ in layers]
        self.value_zeros = [zeros(groups, KIVI_SCALE_DTYPE, device) for _ in layers]
        self._slots = num_slots
        self.blocks_per_slot = spec.residual_tokens // bs
        res_shape = (num_slots * self.blocks_per_slot, h, bs, d)
        self.residual_keys = [zeros(res_shape, spec.dtype, device) for _ in layers]
        self.residual_values = [zeros(res_shape, spec.dtype, device) for _ in layers]
        ops = native_ops() if device.type == "cpu" else None
        self._native_write = ops.kivi_write if ops is not None else None

    def _shapes(self, num_blocks: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        s = self.spec
        packed = s.bits * s.block_size // 8
        return (num_blocks, s.num_kv_heads, s.head_dim, packed), (num_blocks, s.num_kv_heads, s.block_size,
                                                                  s.head_dim * s.bits // 8)

    @property
    def num_slots(self) -> int:
        return self._slots

    def plan_residual_writes(self, seqs: list[SequenceWrite]) -> ResidualWrites:
        r, bs = self.spec.residual_tokens, self.spec.block_size
        seal_blocks: list[int] = []
        from_res: tuple[list[int], list[int]] = ([], [])  # buffer row, residual position (slot * R + pos)
        from_step: tuple[list[int], list[int]] = ([], [])  # buffer row, step row
        open_rows: tuple[list[int], list[int]] = ([], [])  # step row, residual position
        for s in seqs:
            base = s.slot * r
            done = s.end // r  # groups complete after this step
            for g in range(s.start // r, done):
                row0, lo = len(seal_blocks) * bs, g * r
                seal_blocks.extend(s.block_ids[lo // bs : (lo + r) // bs])
                earlier = range(lo, s.start)
                from_res[0].extend(row0 + p - lo for p in earlier)
                from_res[1].extend(base + p - lo for p in earlier)
                now = range(max(lo, s.start), lo + r)
                from_step[0].extend(row0 + p - lo for p in now)
                from_step[1].extend(s.first_row + p - s.start for p in now)
            now = range(max(s.start, done * r), s.end)
            open_rows[0].extend(s.first_row + p - s.start for p in now)
            open_rows[1].extend(base + p % r for p in now)

        def longs(xs: list[int]) -> torch.Tensor:
            return torch.tensor(xs, dtype=torch.int64, device=self.device)

        res_pos, open_pos = longs(from_res[1]), longs(open_rows[1])
        return ResidualWrites(
            seal_blocks=longs(seal_blocks),
            seal_from_residual=(longs(from_res[0]), res_pos // bs, res_pos % bs),
            seal_from_step=(longs(from_step[0]), longs(from_step[1])),
            open_rows=(longs(open_rows[0]), open_pos // bs, open_pos % bs),
        )

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, blocks: torch.Tensor, offsets: torch.Tensor,
              residual: ResidualWrites | None = None) -> None:
        if residual is None:
            raise ValueError(f"the {self.spec.cache_dtype} KV cache writes by a residual plan")
        k, v = k.to(self.spec.dtype), v.to(self.spec.dtype)
        if self._native_write is not None:
            self._native_write(*self.layer_tensors(layer), k, v, residual.seal_blocks, *residual.seal_from_residual,
                               *residual.seal_from_step, *residual.open_rows, self.spec.bits)
            return
        if residual.seal_blocks.numel():  # before the open rows, which may reuse the sealed group's positions
            self._seal(layer, k, v, residual)
        rows, rb, ro = residual.open_rows
        if rows.numel():
            self.residual_keys[layer][rb, :, ro] = k[rows]
            self.residual_values[layer][rb, :, ro] = v[rows]

    def _seal(self, layer: int, k: torch.Tensor, v: torch.Tensor, w: ResidualWrites) -> None:
        s = self.spec
        n, bs, h, d, g = w.seal_blocks.numel(), s.block_size, s.num_kv_heads, s.head_dim, s.value_group_size
        buf_rows, rb, ro = w.seal_from_residual
        dst, src = w.seal_from_step
        kb, vb = k.new_empty((n * bs, h, d)), v.new_empty((n * bs, h, d))
        kb[buf_rows], vb[buf_rows] = self.residual_keys[layer][rb, :, ro], self.residual_values[layer][rb, :, ro]
        kb[dst], vb[dst] = k[src], v[src]
        blocks = w.seal_blocks
        codes, scale, zero = quantize_asym(kb.view(n, bs, h, d).permute(0, 2, 3, 1), s.bits)  # per channel
        self.keys[layer][blocks] = pack_codes(codes, s.bits)
        self.key_scales[layer][blocks], self.key_zeros[layer][blocks] = scale, zero
        codes, scale, zero = quantize_asym(vb.view(n, bs, h, d // g, g).transpose(1, 2), s.bits)  # per token
        self.values[layer][blocks] = pack_codes(codes.flatten(-2), s.bits)
        self.value_scales[layer][blocks], self.value_zeros[layer][blocks] = scale, zero

    def layer_tensors(self, layer: int) -> tuple[torch.Tensor, ...]:
        """One layer's storage in the native kernels' order: key codes, scales and zero points, value
        codes, scales and zero points, the residual's keys and values."""
        return (self.keys[layer], self.key_scales[layer], self.key_zeros[layer], self.values[layer],
                self.value_scales[layer], self.value_zeros[layer], self.residual_keys[layer],
                self.residual_values[layer])

    def _read(self, layer: int, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.spec
        g = s.value_group_size
        keys = unpack_codes(self.keys[layer][index], s.bits).float()  # [..., D, bs]
        keys = keys * self.key_scales[layer][index].float()[..., None] + self.key_zeros[layer][index].float()[..., None]
        values = unpack_codes(self.values[layer][index], s.bits).float().unflatten(-1, (-1, g))  # [..., bs, D / g, g]
        values = values * self.value_scales[layer][index].float()[..., None] + self.value_zeros[layer][index].float()[..., None]
        return keys.transpose(-2, -1).to(s.dtype), values.flatten(-2).to(s.dtype)

    def open_group(self, layer: int, slot: int, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = position % self.spec.residual_tokens
        res = self._slot_blocks(torch.tensor(slot, device=self.device))
        keys = self.residual_keys[layer][res].transpose(0, 1).flatten(1, 2)[:, :n]
        return keys, self.residual_values[layer][res].transpose(0, 1).flatten(1, 2)[:, :n]

    def _slot_blocks(self, slots: torch.Tensor) -> torch.Tensor:
        """The residual blocks of each slot ``[..., R / block_size]``."""
        return slots.long()[..., None] * self.blocks_per_slot + torch.arange(self.blocks_per_slot, device=slots.device)

    def gather(self, layer: int, block_ids: torch.Tensor, length: int, slot: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
        sealed = length // self.spec.residual_tokens * self.spec.residual_tokens
        k, v = super().gather(layer, block_ids[: sealed // self.block_size], sealed)
        rk, rv = self.open_group(layer, slot, length)  # the rest: length - sealed positions
        return torch.cat([k, rk], dim=1), torch.cat([v, rv], dim=1)

    def gather_batch(self, layer: int, block_tables: torch.Tensor, context_lens: torch.Tensor | None = None,
                     slots: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if context_lens is None or slots is None:
            raise ValueError(f"the {self.spec.cache_dtype} KV cache reads a batch by its context lengths and slots")
        k, v = super().gather_batch(layer, block_tables)  # [rows, H, W, D]
        r = self.spec.residual_tokens
        res = self._slot_blocks(slots)  # [rows, R / bs]
        rk = self.residual_keys[layer][res].transpose(1, 2).flatten(2, 3)  # [rows, H, R, D]
        rv = self.residual_values[layer][res].transpose(1, 2).flatten(2, 3)
        sealed = (context_lens.long() // r * r)[:, None]
        pos = torch.arange(k.shape[2], device=k.device)[None, :]
        in_residual = (pos >= sealed)[:, None, :, None]
        idx = (pos - sealed).clamp(0, r - 1)[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
        return torch.where(in_residual, rk.gather(2, idx), k), torch.where(in_residual, rv.gather(2, idx), v)

    def move_tokens(self, src_blocks: torch.Tensor, src_offsets: torch.Tensor, dst_blocks: torch.Tensor,
                    dst_offsets: torch.Tensor) -> None:
        raise ValueError("a KIVI cache cannot move single tokens (its open group is per sequence)")

    def copy_slot(self, src: int, dst: int) -> None:
        n = self.blocks_per_slot
        for cache in (*self.residual_keys, *self.residual_values):
            cache[dst * n : (dst + 1) * n].copy_(cache[src * n : (src + 1) * n])


class MixedKVCache(KVCache):
    """A format per layer (KVTuner's layer-wise mixed precision, ``--kv-cache-layers``): one
    single-layer cache object per layer, over the same block ids and residual slots. Attention
    backends reach each layer's object through ``layer_cache``; the rest delegates."""

    def __init__(self, spec: KVCacheSpec, num_blocks: int, device: torch.device, num_slots: int) -> None:
        self.spec = spec
        self.num_blocks = num_blocks
        self.device = device
        self.layers = [make_kv_cache(spec.layer_spec(i), num_blocks, device, num_slots)
                       for i in range(spec.num_layers)]
        self._kivi = [c for c in self.layers if c.num_slots]
        self.keys, self.values = [], []  # each layer's object holds its own
        self.key_scales, self.value_scales, self.key_zeros, self.value_zeros = [], [], [], []

    def layer_cache(self, layer: int) -> tuple[KVCache, int]:
        return self.layers[layer], 0

    @property
    def num_slots(self) -> int:
        return self._kivi[0].num_slots if self._kivi else 0

    @property
    def lossy(self) -> bool:
        return any(c.lossy for c in self.layers)

    def plan_residual_writes(self, seqs: list[SequenceWrite]) -> ResidualWrites | None:
        return self._kivi[0].plan_residual_writes(seqs) if self._kivi else None  # the same for every layer

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, blocks: torch.Tensor, offsets: torch.Tensor,
              residual: ResidualWrites | None = None) -> None:
        self.layers[layer].write(0, k, v, blocks, offsets, residual)

    def gather(self, layer: int, block_ids: torch.Tensor, length: int, slot: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
        return self.layers[layer].gather(0, block_ids, length, slot)

    def gather_batch(self, layer: int, block_tables: torch.Tensor, context_lens: torch.Tensor | None = None,
                     slots: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.layers[layer].gather_batch(0, block_tables, context_lens, slots)

    def open_group(self, layer: int, slot: int, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.layers[layer].open_group(0, slot, position)

    def block_tensors(self) -> list[torch.Tensor]:
        return [t for c in self.layers for t in c.block_tensors()]

    def copy_block(self, src: int, dst: int) -> None:
        for c in self.layers:
            c.copy_block(src, dst)

    def copy_slot(self, src: int, dst: int) -> None:
        for c in self._kivi:
            c.copy_slot(src, dst)

    def move_tokens(self, src_blocks: torch.Tensor, src_offsets: torch.Tensor, dst_blocks: torch.Tensor,
                    dst_offsets: torch.Tensor) -> None:
        for c in self.layers:
            c.move_tokens(src_blocks, src_offsets, dst_blocks, dst_offsets)


def make_kv_cache(spec: KVCacheSpec, num_blocks: int, device: torch.device, num_slots: int = 0) -> KVCache:
    """The cache object for ``spec.cache_dtype``, or for each layer's format (``num_slots``: a KIVI
    format's residual slots)."""
    if spec.mixed:
        return MixedKVCache(spec, num_blocks, device, num_slots)
    if spec.kivi:
        return KiviKVCache(spec, num_blocks, device, num_slots)
    return (Int8KVCache if spec.cache_dtype == INT8 else KVCache)(spec, num_blocks, device)


# -- whole blocks in and out (requests moving between engines: loom.engine.handoff) --------------
def kv_layout(tensors: list[torch.Tensor]) -> tuple[tuple[tuple[int, ...], str], ...]:
    """One block's shape and dtype per block tensor: two caches can trade blocks when equal."""
    return tuple((tuple(t.shape[1:]), str(t.dtype).removeprefix("torch.")) for t in tensors)


def read_blocks(tensors: list[torch.Tensor], block_ids: list[int]) -> tuple[np.ndarray, ...]:
    """Copies of the blocks ``block_ids`` of each block tensor, as raw bytes in NumPy arrays (shape
    ``(blocks, bytes per block)``): NumPy arrays cross processes through Ray's object store without
    pickling their contents (a 47 MB handoff took the source's GIL for ~0.3 s as tensors)."""
    if not block_ids:
        return tuple(np.empty((0, t[0].numel() * t.element_size()), np.uint8) for t in tensors)
    index = torch.tensor(block_ids, device=tensors[0].device)
    return tuple(t.index_select(0, index).to("cpu").reshape(len(block_ids), -1).view(torch.uint8).numpy()
                 for t in tensors)


def write_blocks(tensors: list[torch.Tensor], block_ids: list[int], data: tuple[np.ndarray, ...],
                 rows: list[int]) -> None:
    """Write rows ``rows`` of ``data`` (``read_blocks``'s arrays) into blocks ``block_ids``."""
    if not block_ids:
        return
    index = torch.tensor(block_ids, device=tensors[0].device)
    pick = torch.tensor(rows)
    for t, d in zip(tensors, data, strict=True):
        with warnings.catch_warnings():  # an array fetched from Ray's object store is read-only; it is only read
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.from_numpy(d)
        blocks = raw.index_select(0, pick).view(t.dtype).reshape(len(rows), *t.shape[1:])
        t.index_copy_(0, index, blocks.to(t.device))
