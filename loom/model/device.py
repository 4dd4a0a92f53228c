"""The one place that knows about devices, dtypes, threads and memory: nothing else in loom
calls ``torch.cuda`` or measures free memory (the kernel builder reads the CPU's flags only to
key its build cache)."""

from __future__ import annotations

import ctypes
import mmap
import os
import sys

import torch

from loom.config import DEVICES

# Free memory the KV cache leaves alone when its size is measured (activations, logits, the
# sampler, other processes).
MEMORY_HEADROOM_FRACTION = 0.25
MIN_MEMORY_HEADROOM = 1 << 30


def resolve_device(name: str, rank: int = 0) -> torch.device:
    """``auto``: CUDA when a GPU is visible, else the CPU. ``rank``: a tensor-parallel rank, which
    takes GPU ``rank`` (ranks on the CPU share it)."""
    if name not in DEVICES:
        raise ValueError(f"unknown device {name!r} (choose {', '.join(DEVICES)})")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch sees no GPU "
                         f"(torch {torch.__version__} was built {'with' if torch.version.cuda else 'without'} CUDA)")
    if name == "cuda" and rank:
        if rank >= torch.cuda.device_count():
            raise ValueError(f"tensor-parallel rank {rank} needs GPU {rank}; torch sees {torch.cuda.device_count()}")
        return torch.device(name, rank)
    return torch.device(name)


def free_memory_bytes(device: torch.device) -> int:
    """Memory that can be allocated now: MemAvailable on the CPU, free GPU memory on CUDA."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def kv_cache_budget(device: torch.device) -> int:
    """Bytes for the KV cache when none is configured: free memory less the headroom
    (``MEMORY_HEADROOM_FRACTION`` of it, at least ``MIN_MEMORY_HEADROOM``)."""
    free = free_memory_bytes(device)
    return max(0, free - max(int(free * MEMORY_HEADROOM_FRACTION), MIN_MEMORY_HEADROOM))

_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32,
           "float16": torch.float16, "fp16": torch.float16}


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16: bf16 matmuls run much faster than fp32."""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on GPUs that support it and on CPUs with AVX512-BF16/AMX, else fp32."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r} (choose auto, bfloat16 or float32)") from None


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (timing the forward pass on an asynchronous device)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def set_threads(num_threads: int | None, processes: int = 1) -> None:
    """Use one compute thread per core by default (shared by ``processes`` tensor-parallel ranks);
    more than the cores only adds contention."""
    n = num_threads or max(1, len(os.sched_getaffinity(0)) // processes)
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
_HUGE_PAGE = 1 << 21


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zeroed tensor for a large long-lived buffer (the KV cache).

    On Linux CPUs it is an anonymous mapping: the kernel hands out zero pages as they are first
    touched, so a large cache costs no start-up time and no resident memory until it is used,
    and the mapping is backed by transparent huge pages where the kernel allows it. The paged
    cache is read in scattered 2 KiB pieces, and with 4 KiB pages nearly every piece costs a
    TLB miss (~15% of decode attention time)."""
    if device.type != "cpu" or not sys.platform.startswith("linux"):
        return torch.zeros(shape, dtype=dtype, device=device)
    count = 1
    for n in shape:
        count *= n
    nbytes = count * torch.empty((), dtype=dtype).element_size()
    if nbytes == 0:
        return torch.zeros(shape, dtype=dtype)
    buf = mmap.mmap(-1, nbytes + _HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    offset = -addr % _HUGE_PAGE
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(addr + offset), ctypes.c_size_t(nbytes - nbytes % _HUGE_PAGE), _MADV_HUGEPAGE)
    except (OSError, AttributeError):
        pass  # an optimisation only
    # The tensor keeps ``buf`` alive (torch.frombuffer holds a reference to it).
    return torch.frombuffer(buf, dtype=dtype, count=count, offset=offset).view(shape)
