"""A weight matrix kept quantized, and its matrix product.

Layout (what ``kernels/quant_matmul.cpp`` reads), for a weight of ``N`` rows and ``K`` columns cut
into blocks of 32 elements:

* ``qs``: the low 4 bits of every code, ``[N, K/2]`` bytes; byte ``j`` of a block holds element ``j``
  in its low nibble and element ``j + 16`` in its high nibble (GGUF's order). 8-bit formats store
  the signed codes themselves, ``[N, K]`` int8.
* ``qh``: for 5- and 6-bit codes, one 32-bit little-endian plane per extra bit and block
  (bit ``i`` is element ``i``'s), ``[N, K/32 * 4 * (bits - 4)]`` bytes.
* ``scale`` and, for asymmetric formats, ``min``: fp16, ``[N, K / group]``.

``w = scale * code + min``, or ``scale * (code - offset)`` for symmetric formats."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from types import ModuleType

import numpy as np
import torch
import torch.nn.functional as F

from loom.model.kernels import native_ops
from loom.model.quant.formats import BLOCK, QuantFormat

NATIVE_MATMUL_MAX_ROWS = 128  # measured crossover against dequantize + dense GEMM (see matmul)


@functools.cache
def _native() -> ModuleType | None:
    """The native kernels, if they were built with the quantized matmul (x86 with AVX2)."""
    ops = native_ops()
    return ops if ops is not None and ops.has_quant_matmul() else None


@dataclass
class PackedWeight:
    fmt: QuantFormat
    qs: torch.Tensor
    qh: torch.Tensor | None
    scale: torch.Tensor
    min: torch.Tensor | None

    @property
    def shape(self) -> tuple[int, int]:
        n = self.qs.shape[0]
        return n, self.qs.shape[1] * (1 if self.fmt.bits == 8 else 2)

    @property
    def group(self) -> int:
        return self.shape[1] // self.scale.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qs, self.qh, self.scale, self.min) if t is not None)

    @property
    def device(self) -> torch.device:
        return self.qs.device

    # -- building ------------------------------------------------------------------------------
    @staticmethod
    def from_codes(fmt: QuantFormat, codes: np.ndarray | torch.Tensor, scale: np.ndarray | torch.Tensor,
                   mins: np.ndarray | torch.Tensor | None) -> PackedWeight:
        """Pack integer codes ``[N, K]`` (unsigned, or int8 for 8-bit formats) with their per-group
        scale and min ``[N, K / group]`` (any float dtype; stored as fp16)."""
        codes = torch.as_tensor(codes)
        n, k = codes.shape
        if k % BLOCK:
            raise ValueError(f"a packed weight needs a multiple of {BLOCK} columns, got {k}")
        half = lambda a: torch.as_tensor(a).to(torch.float16).contiguous()  # noqa: E731
        if fmt.bits == 8:
            return PackedWeight(fmt, codes.to(torch.int8).contiguous(), None, half(scale), None)
        c = codes.to(torch.uint8).reshape(n, k // BLOCK, 2, 16)
        qs = ((c[:, :, 0] & 0x0F) | ((c[:, :, 1] & 0x0F) << 4)).reshape(n, k // 2)
        qh = None
        if fmt.bits > 4:
            weights = 1 << torch.arange(8, dtype=torch.int32, device=codes.device)
            blocks = codes.to(torch.int32).reshape(n, k // BLOCK, BLOCK)
            planes = torch.stack([(blocks >> (4 + p)) & 1 for p in range(fmt.bits - 4)], dim=2)
            planes = planes.reshape(n, k // BLOCK, fmt.bits - 4, 4, 8)
            qh = (planes * weights).sum(-1).to(torch.uint8).reshape(n, -1)
        return PackedWeight(fmt, qs.contiguous(), qh, half(scale), None if mins is None else half(mins))

    @staticmethod
    def quantize(w: torch.Tensor, fmt: QuantFormat) -> PackedWeight:
        """Round-to-nearest quantization of a dense ``[N, K]`` weight into ``fmt``: symmetric formats
        scale by the element of largest magnitude (as GGUF's Q4_0/Q8_0 do), asymmetric ones by the
        group's range. Codes are computed against the fp16-rounded scales they will be stored with."""
        n, k = w.shape
        g = fmt.group_for(k)
        if not fmt.fits(k):
            raise ValueError(f"{fmt.name} needs columns in whole groups of {g} and blocks of {BLOCK}; got {k}")
        x = w.detach().float().reshape(n, k // g, g)
        top = (1 << fmt.bits) - 1
        if fmt.symmetric:
            if fmt.bits == 8:
                scale = (x.abs().amax(-1) / 127).half().float()
                lo, hi = -127, 127
            else:  # the signed extreme maps to -offset, as in GGUF's Q4_0
                idx = x.abs().argmax(-1, keepdim=True)
                scale = (x.gather(-1, idx).squeeze(-1) / -fmt.offset).half().float()
                lo, hi = -fmt.offset, top - fmt.offset
            inv = torch.where(scale == 0, 0.0, 1.0 / scale)
            q = torch.clamp(torch.round(x * inv[..., None]), lo, hi) + fmt.offset
            mins = None
        else:
            lo, hi = x.amin(-1), x.amax(-1)
            scale = ((hi - lo) / top).half().float()
            mins = lo.half().float()
            inv = torch.where(scale == 0, 0.0, 1.0 / scale)
            q = torch.clamp(torch.round((x - mins[..., None]) * inv[..., None]), 0, top)
        return PackedWeight.from_codes(fmt, q.reshape(n, k).to(torch.int16), scale, mins)

    @staticmethod
    def cat(parts: list[PackedWeight]) -> PackedWeight:
        """Rows of several weights of one format and width, stacked (fused q/k/v, gate/up)."""
        first = parts[0]
        if any(p.fmt != first.fmt or p.shape[1] != first.shape[1] for p in parts):
            raise ValueError("only weights of one format and width can be stacked")
        cat = lambda ts: None if ts[0] is None else torch.cat(ts)  # noqa: E731
        return PackedWeight(first.fmt, cat([p.qs for p in parts]), cat([p.qh for p in parts]),
                            cat([p.scale for p in parts]), cat([p.min for p in parts]))

    def select_rows(self, rows: torch.Tensor) -> PackedWeight:
        pick = lambda t: None if t is None else t.index_select(0, rows.to(t.device))  # noqa: E731
        return PackedWeight(self.fmt, pick(self.qs), pick(self.qh), pick(self.scale), pick(self.min))

    def rows(self, start: int, stop: int) -> PackedWeight:
        """Rows ``start:stop`` (a tensor-parallel rank's output features)."""
        cut = lambda t: None if t is None else t[start:stop].contiguous()  # noqa: E731
        return PackedWeight(self.fmt, cut(self.qs), cut(self.qh), cut(self.scale), cut(self.min))

    def columns(self, start: int, stop: int) -> PackedWeight:
        """Columns ``start:stop`` (a tensor-parallel rank's input features); ValueError unless both
        ends fall on a group and block boundary."""
        unit = max(self.group, BLOCK)
        if start % unit or stop % unit or not 0 <= start < stop <= self.shape[1]:
            raise ValueError(f"columns {start}:{stop} are not whole groups of {unit} of {self.shape[1]}")
        per_element = self.qs.shape[1] / self.shape[1]
        plane = None if self.qh is None else self.qh.shape[1] // (self.shape[1] // BLOCK)  # bytes per block
        cut = lambda t, a, b: None if t is None else t[:, a:b].contiguous()  # noqa: E731
        return PackedWeight(self.fmt, cut(self.qs, int(start * per_element), int(stop * per_element)),
                            None if plane is None else cut(self.qh, start // BLOCK * plane, stop // BLOCK * plane),
                            cut(self.scale, start // self.group, stop // self.group),
                            cut(self.min, start // self.group, stop // self.group))

    def to(self, device: torch.device) -> PackedWeight:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return PackedWeight(self.fmt, move(self.qs), move(self.qh), move(self.scale), move(self.min))

    # -- using -----------------------------------------------------------------------------------
    def codes(self) -> torch.Tensor:
        """The integer codes ``[N, K]`` (int16)."""
        n, k = self.shape
        if self.fmt.bits == 8:
            return self.qs.to(torch.int16)
        nib = self.qs.reshape(n, k // BLOCK, 16)
        c = torch.stack([nib & 0x0F, nib >> 4], dim=2).reshape(n, k // BLOCK, BLOCK).to(torch.int16)
        if self.qh is not None:
            planes = self.qh.reshape(n, k // BLOCK, self.fmt.bits - 4, 4, 1).to(torch.int16)
            bits = (planes >> torch.arange(8, dtype=torch.int16, device=self.device)) & 1
            c = c | (bits.reshape(n, k // BLOCK, self.fmt.bits - 4, BLOCK) << (4 + torch.arange(
                self.fmt.bits - 4, dtype=torch.int16, device=self.device).reshape(1, 1, -1, 1))).sum(2)
        return c.reshape(n, k)

    @functools.cached_property
    def _kernel_args(self) -> tuple:
        """The weight's arguments to the native kernels (built once: this runs for every matrix of every step)."""
        return self.qs, self.qh, self.scale, self.min, self.fmt.bits, self.group, float(self.fmt.offset)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense ``[N, K]`` weight."""
        if self.qs.is_cpu and dtype in (torch.float32, torch.bfloat16) and (ops := _native()):
            return ops.quant_dequantize(*self._kernel_args, self.shape[1], dtype)
        n, k = self.shape
        g = self.group
        c = (self.codes() - self.fmt.offset).float().reshape(n, k // g, g)
        w = c * self.scale.float()[..., None]
        if self.min is not None:
            w = w + self.min.float()[..., None]
        return w.reshape(n, k).to(dtype)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x W^T (+ b) for x ``[M, K]``. On CPUs that built the native kernels, up to
        :data:`NATIVE_MATMUL_MAX_ROWS` rows run over the packed weight (decode: the weight is read once,
        packed): as int8 dot products, or, for 5 rows and more of bf16 on a CPU with AMX, as AMX tile
        products over the weight unpacked to bf16 in cache. More rows dequantize the weight and use
        the dense GEMM (prefill: compute-bound, where the GEMM is as fast). Other devices always
        dequantize."""
        if x.is_cpu and x.dim() == 2 and x.dtype in (torch.float32, torch.bfloat16) and (ops := _native()):
            if x.shape[0] <= NATIVE_MATMUL_MAX_ROWS:
                return ops.quant_matmul(x, *self._kernel_args, bias)
        return F.linear(x, self.dequantize(x.dtype), bias)

    def embedding(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows ``ids`` of the weight, dequantized (a quantized embedding table)."""
        flat = ids.reshape(-1)
        return self.select_rows(flat).dequantize(dtype).reshape(*ids.shape, self.shape[1])
