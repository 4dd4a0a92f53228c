"""The one place that knows about devices, dtypes and threads."""

from __future__ import annotations

import ctypes
import os
import sys

import torch

_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32,
           "float16": torch.float16, "fp16": torch.float16}


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16: bf16 matmuls run much faster than fp32."""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r} (choose auto, bfloat16 or float32)") from None


def set_threads(num_threads: int | None) -> None:
    """Use one compute thread per core by default; more than the cores only adds contention."""
    n = num_threads or len(os.sched_getaffinity(0))
    if n < 1:
        raise ValueError(f"num_threads must be >= 1, got {n}")
    torch.set_num_threads(n)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling on 64-bit


def keep_freed_memory() -> None:
    """Stop glibc from returning every large freed buffer to the kernel.

    A step allocates and frees several multi-MB tensors (logits, probabilities); by default each
    is a fresh mmap whose pages fault in and are zeroed again, which cost 6 ms of a 47 ms decode
    step at batch 64. Serving them from the heap and never trimming it removes that."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
        libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    except (OSError, AttributeError):
        pass  # not glibc: an optimisation only


_MADV_HUGEPAGE = 14


def zeros_on_huge_pages(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zeroed CPU tensor whose pages are backed by transparent huge pages where the kernel
    allows it (THP in ``madvise`` mode). The paged KV cache is read in scattered 2 KiB pieces, and
    with 4 KiB pages nearly every piece costs a TLB miss (~15% of decode attention time)."""
    t = torch.empty(shape, dtype=dtype)
    if sys.platform.startswith("linux") and t.numel():
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            huge = 1 << 21
            ptr, n = t.data_ptr(), t.numel() * t.element_size()
            start, end = (ptr + huge - 1) & ~(huge - 1), (ptr + n) & ~(huge - 1)
            if end > start:
                libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_HUGEPAGE)
        except (OSError, AttributeError):
            pass  # an optimisation only
    return t.zero_()
