"""Shared fixtures: tiny random models built once per test session."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.tiny_models import make_tiny_hf_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``tiny_model(arch)``: the directory of a tiny HF model of ``arch`` (llama, qwen2, gemma3_text),
    built on first use and shared by the whole session. Treat it as read-only."""
    built: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in built:
            built[arch] = make_tiny_hf_model(arch, tmp_path_factory.mktemp(f"tiny-{arch}"))
        return built[arch]

    return get
