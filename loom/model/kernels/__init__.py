"""Native CPU kernels (paged decode attention, fused norms, rotary, activations, quantized matmul), compiled on
first use with torch's C++ extension builder.

Each kernel has a pure-PyTorch equivalent in the caller, used when no compiler is available or
the tensors live on another device; ``LOOM_DISABLE_KERNELS=1`` forces that path."""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import os
import platform
import sys
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)
_DIR = Path(__file__).parent
_SOURCES = [_DIR / n for n in ("paged_attention.cpp", "fused_ops.cpp", "gemv.cpp", "quant_matmul.cpp", "amx_matmul.cpp", "decoder_stack.cpp", "all_reduce.cpp")]
_CFLAGS = ("-O3", "-march=native", "-fopenmp")
_LDFLAGS = ("-fopenmp",)


def _cpu_fingerprint() -> str:
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    return flags


def _build_key() -> str:
    """Everything that goes into the build command: the sources (their bytes and their paths, which
    ninja's build file records, so two checkouts never share a build directory and rebuild each
    other's kernels), the flags, the torch whose headers it compiles against and the Python version
    (not the interpreter's path: ``.venv/bin/python`` and ``.venv/bin/loom``'s ``python3.11`` must
    share one build), and the CPU (-march=native code must never be loaded on another CPU)."""
    parts = [p.read_bytes() for p in sorted(_DIR.glob("*.[ch]*"))]
    parts += [str(p).encode() for p in _SOURCES]
    parts += [" ".join((*_CFLAGS, *_LDFLAGS)).encode(), torch.__version__.encode(), torch.__file__.encode(),
              sys.version.encode()]
    parts += [platform.machine().encode(), _cpu_fingerprint().encode()]
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]


@functools.cache
def native_ops() -> ModuleType | None:
    """The compiled module (``decode_attention``, ``rms_norm``, ``add_rms_norm``, ``rotary_``,
    ``act_and_mul``, ``kv_write``, ``quant_matmul``, ``DecoderStack``, ...), or None when it cannot be built."""
    if os.environ.get("LOOM_DISABLE_KERNELS") == "1":
        return None
    from torch.utils.cpp_extension import load

    cache = Path(os.environ.get("LOOM_CACHE_DIR", Path.home() / ".cache" / "loom"))
    build_dir = cache / "kernels" / _build_key()
    build_dir.mkdir(parents=True, exist_ok=True)
    try:
        with open(build_dir / "loom.lock", "w") as lock:
            # torch guards a build with a `lock` file that a killed build leaves behind, and every later
            # load waits on it forever. An flock is released by the OS when its holder dies, so whoever
            # holds it knows that any `lock` file is stale.
            fcntl.flock(lock, fcntl.LOCK_EX)
            (build_dir / "lock").unlink(missing_ok=True)
            return load(
                name="loom_cpu_ops",
                sources=[str(p) for p in _SOURCES],
                extra_cflags=list(_CFLAGS),
                extra_ldflags=list(_LDFLAGS),
                build_directory=str(build_dir),
                verbose=False,
            )
    except Exception as e:  # no compiler, no ninja, ...: fall back to the PyTorch path
        log.warning("native CPU kernels unavailable (%s); using the PyTorch fallback", e)
        return None
