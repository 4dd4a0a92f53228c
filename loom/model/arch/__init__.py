"""Architecture registry: the one place that names each architecture, knows which Hugging Face
``model_type`` values it reads, how to parse their ``config.json`` and which class runs them.

Adding an architecture is one module here (model class + config parser) plus one entry in
``ARCHITECTURES``; the GGUF converter keys its per-format facts by these names."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loom.config import ModelConfig
from loom.model.arch.base import CausalLM
from loom.model.arch.gemma3 import Gemma3ForCausalLM, parse_gemma3_config
from loom.model.arch.llama import LlamaForCausalLM, Qwen2ForCausalLM, parse_llama_config, parse_qwen2_config


@dataclass(frozen=True)
class Architecture:
    name: str  # ModelConfig.architecture, the registry key (also llama.cpp's general.architecture)
    hf_model_types: tuple[str, ...]  # config.json "model_type" values read as this; the first is written
    hf_class: str  # transformers class, for config.json "architectures"
    parse_config: Callable[[dict[str, Any], str], ModelConfig]  # (config.json dict, name) -> ModelConfig
    model_class: type[CausalLM]


ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture("llama", ("llama",), "LlamaForCausalLM", parse_llama_config, LlamaForCausalLM),
        Architecture("qwen2", ("qwen2",), "Qwen2ForCausalLM", parse_qwen2_config, Qwen2ForCausalLM),
        # "gemma3" is the multimodal wrapper's type; its text_config is what loom reads.
        Architecture("gemma3", ("gemma3_text", "gemma3"), "Gemma3ForCausalLM", parse_gemma3_config, Gemma3ForCausalLM),
    )
}
_BY_MODEL_TYPE = {t: a for a in ARCHITECTURES.values() for t in a.hf_model_types}


def get_architecture(name: str) -> Architecture:
    """The registry entry called ``name``; ValueError naming the supported ones otherwise."""
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r} (supported: {', '.join(ARCHITECTURES)})") from None


def model_class(architecture: str) -> type[CausalLM]:
    return get_architecture(architecture).model_class


def architecture_for_model_type(model_type: str) -> Architecture:
    """The entry reading Hugging Face ``model_type``; ValueError naming the supported types otherwise."""
    try:
        return _BY_MODEL_TYPE[model_type]
    except KeyError:
        raise ValueError(
            f"unsupported model type {model_type!r} (supported: {', '.join(_BY_MODEL_TYPE)})"
        ) from None


def model_config_from_dict(cfg: dict[str, Any]) -> ModelConfig:
    """Parse a ``config.json`` dict with its architecture's parser."""
    if "text_config" in cfg and "hidden_size" not in cfg:  # multimodal wrapper (Gemma3ForConditionalGeneration)
        cfg = {**cfg["text_config"], "model_type": cfg["text_config"].get("model_type", cfg.get("model_type"))}
    arch = architecture_for_model_type(str(cfg.get("model_type", "")))
    return arch.parse_config(cfg, arch.name)


def load_model_config(model_dir: str | os.PathLike) -> ModelConfig:
    """The :class:`ModelConfig` of the Hugging Face model directory ``model_dir`` (its config.json)."""
    path = Path(model_dir) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{model_dir}: no config.json") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return model_config_from_dict(cfg)


__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "architecture_for_model_type",
    "get_architecture",
    "load_model_config",
    "model_class",
    "model_config_from_dict",
]
