"""The native kernels' build directory is keyed on everything that goes into the build command."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from loom.model import kernels


def test_build_key_depends_on_the_checkout_path(monkeypatch):
    here = kernels._build_key()
    assert kernels._build_key() == here  # stable
    other = [Path("/elsewhere") / p.name for p in kernels._SOURCES]
    monkeypatch.setattr(kernels, "_SOURCES", other)
    assert kernels._build_key() != here


def test_build_key_depends_on_the_flags(monkeypatch):
    here = kernels._build_key()
    monkeypatch.setattr(kernels, "_CFLAGS", (*kernels._CFLAGS, "-DEXTRA"))
    assert kernels._build_key() != here


def test_build_key_does_not_depend_on_the_interpreter_path(monkeypatch):
    """``.venv/bin/python`` and the ``loom`` script's ``python3.11`` are the same interpreter."""
    here = kernels._build_key()
    monkeypatch.setattr(sys, "executable", "/somewhere/else/python3")
    assert kernels._build_key() == here


@pytest.mark.skipif(kernels.native_ops() is None, reason="native kernels not built")
def test_a_lock_left_by_a_killed_build_does_not_hang_the_next_load(tmp_path):
    """torch's `lock` file outlives a killed build; loading must not wait on it forever."""
    key = kernels._build_key()
    cache = Path(os.environ.get("LOOM_CACHE_DIR", Path.home() / ".cache" / "loom"))
    built = tmp_path / "kernels" / key
    shutil.copytree(cache / "kernels" / key, built)  # mtimes kept: nothing to rebuild
    (built / "lock").touch()
    code = "from loom.model.kernels import native_ops; assert native_ops() is not None"
    env = {**os.environ, "LOOM_CACHE_DIR": str(tmp_path)}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
    assert not (built / "lock").exists()
