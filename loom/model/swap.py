"""The swap tier: host copies of the KV blocks of requests preempted by swapping (FastSwitch).

A swapped-out request's blocks are copied out before the step's forward pass (so the blocks can be
reused in the same step) and copied back a group of blocks per step when it is readmitted. On a
GPU the copies live in pinned host memory; on a CPU they are a second copy in RAM beside the KV
pool, either as the cache stores them (lossless: a quantized cache is already compressed) or, with
``--swap-dtype int8``, float keys and values as int8 codes with one fp16 scale per token and head
(about half the bytes of bf16, lossy)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from loom.model.device import synchronize
from loom.model.kv_cache import KVCache, quantize_int8

_FLOATS = (torch.bfloat16, torch.float16, torch.float32)


@dataclass
class _Saved:
    tensors: list[torch.Tensor]  # per block tensor: the copied blocks (codes when compressed)
    scales: list[torch.Tensor | None]  # per block tensor: int8 scales, or None when stored as is


class SwapSpace:
    def __init__(self, kv: KVCache, compress: bool) -> None:
        if kv.num_slots:
            raise ValueError("the swap tier needs a KV cache without a residual (int4/int2 preempt by recompute); "
                             "drop --swap-space or use --kv-cache-dtype auto, bf16, fp32 or int8")
        self.kv = kv
        self.tensors = kv.block_tensors()
        self.compress = [compress and t.dtype in _FLOATS for t in self.tensors]
        self.pin = kv.device.type == "cuda"
        self._saved: dict[str, _Saved] = {}

    @property
    def bytes_per_block(self) -> int:
        """Host bytes one swapped block takes."""
        total = 0
        for t, squeeze in zip(self.tensors, self.compress):
            per_block = t[0].numel()
            total += per_block + 2 * (per_block // t.shape[-1]) if squeeze else per_block * t.element_size()
        return total

    def save(self, key: str, block_ids: list[int]) -> None:
        index = torch.tensor(block_ids, device=self.kv.device)
        tensors: list[torch.Tensor] = []
        scales: list[torch.Tensor | None] = []
        for t, squeeze in zip(self.tensors, self.compress):
            blocks = t.index_select(0, index)
            if squeeze:
                codes, scale = quantize_int8(blocks)
                tensors.append(self._host(codes))
                scales.append(self._host(scale))
            else:
                tensors.append(self._host(blocks))
                scales.append(None)
        self._saved[key] = _Saved(tensors, scales)

    def _host(self, t: torch.Tensor) -> torch.Tensor:
        if t.device.type == "cpu":
            return t.clone() if t.is_contiguous() else t.contiguous()
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=self.pin)
        host.copy_(t, non_blocking=True)
        return host

    def load(self, key: str, block_ids: list[int], start: int) -> None:
        """Copy saved blocks ``start .. start + len(block_ids)`` into ``block_ids``."""
        saved = self._saved[key]
        index = torch.tensor(block_ids, device=self.kv.device)
        end = start + len(block_ids)
        for t, data, scale in zip(self.tensors, saved.tensors, saved.scales):
            part = data[start:end].to(self.kv.device, non_blocking=True)
            if scale is not None:
                part = (part.float() * scale[start:end].to(self.kv.device).float()[..., None]).to(t.dtype)
            t.index_copy_(0, index, part)

    def drop(self, key: str) -> None:
        self._saved.pop(key, None)

    def __len__(self) -> int:
        return len(self._saved)


def measure_swap_seconds_per_block(swap: SwapSpace, probe_blocks: int = 16) -> float:
    """Seconds to copy one block out and back in, timed on the cache's first blocks (at start-up,
    before any request holds them; an int8 round trip of zeros writes back zeros)."""
    n = min(probe_blocks, swap.kv.num_blocks)
    blocks = list(range(n))
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        swap.save("__probe__", blocks)
        swap.load("__probe__", blocks, 0)
        synchronize(swap.kv.device)
        best = min(best, time.perf_counter() - t0)
        swap.drop("__probe__")
    return best / n
