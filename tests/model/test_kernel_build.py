"""The native kernels' build directory is keyed on everything that goes into the build command."""

from pathlib import Path

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
