"""Frozen configuration dataclasses. Nothing here imports the rest of loom."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters, read from a Hugging Face ``config.json``."""

    architecture: str  # registry key: "llama", "qwen2", "gemma3"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # Gemma3: sliding-window layers use a local rope base and a window; others are global.
    sliding_window: int | None = None
    layer_is_sliding: tuple[bool, ...] = ()
    rope_local_theta: float | None = None
    query_pre_attn_scalar: float | None = None
    rope_scaling_factor: float = 1.0  # linear rope scaling of the global layers (gemma3)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @staticmethod
    def from_hf_dir(path: str | os.PathLike) -> "ModelConfig":
        with open(Path(path) / "config.json") as f:
            return ModelConfig.from_hf_dict(json.load(f))

    @staticmethod
    def from_hf_dict(cfg: dict[str, Any]) -> "ModelConfig":
        if "text_config" in cfg and "hidden_size" not in cfg:  # multimodal wrapper (Gemma3ForConditionalGeneration)
            cfg = {**cfg["text_config"], "model_type": cfg["text_config"].get("model_type", cfg.get("model_type"))}
        model_type = cfg.get("model_type", "")
        arch = {"llama": "llama", "qwen2": "qwen2", "gemma3_text": "gemma3", "gemma3": "gemma3"}.get(model_type)
        if arch is None:
            raise ValueError(f"unknown model architecture {model_type!r} (supported: llama, qwen2, gemma3)")
        num_heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        num_layers = int(cfg["num_hidden_layers"])
        rope_global, rope_local = _rope_parameters(cfg)
        sliding: tuple[bool, ...] = ()
        window = None
        local_theta = None
        scaling = 1.0
        if arch == "gemma3":
            window = int(cfg.get("sliding_window") or 4096)
            if cfg.get("layer_types"):
                sliding = tuple(t == "sliding_attention" for t in cfg["layer_types"])
            else:
                pattern = int(cfg.get("sliding_window_pattern", 6))
                sliding = tuple((i + 1) % pattern != 0 for i in range(num_layers))
            local_theta = float(rope_local.get("rope_theta", 10000.0))
            if rope_global.get("rope_type", rope_global.get("type")) == "linear":
                scaling = float(rope_global["factor"])
        return ModelConfig(
            architecture=arch,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
            head_dim=int(cfg.get("head_dim") or hidden // num_heads),
            intermediate_size=int(cfg["intermediate_size"]),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_global.get("rope_theta", 10000.0)),
            max_position=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", arch == "gemma3")),
            attention_bias=bool(cfg.get("attention_bias", arch == "qwen2")),
            hidden_act=str(cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu"),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            sliding_window=window,
            layer_is_sliding=sliding,
            rope_local_theta=local_theta,
            query_pre_attn_scalar=cfg.get("query_pre_attn_scalar"),
            rope_scaling_factor=scaling,
        )


def _rope_parameters(cfg: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(global, local) rope settings from either spelling of config.json: transformers >= 5 nests
    them in ``rope_parameters`` (per layer type for Gemma 3); older files use flat keys."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:
        return params["full_attention"], params.get("sliding_attention", {})
    local = {"rope_theta": cfg.get("rope_local_base_freq", 10000.0)}
    if isinstance(params, dict):
        return params, local
    flat = dict(cfg.get("rope_scaling") or {})
    flat.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    return flat, local


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    # KV memory budget in bytes; None means "derive from num_blocks" or a default budget.
    kv_cache_bytes: int | None = None
    num_blocks: int | None = None
    enable_prefix_caching: bool = True


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 512
    max_num_seqs: int = 64
    policy: str = "fcfs"
    max_waiting: int | None = None  # bounded waiting queue (server overload protection)


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # GGUF file or HF directory; None = default model (SmolLM2-135M-Instruct)
    dtype: str = "auto"  # auto | bfloat16 | float32
    device: str = "auto"  # auto | cpu | cuda
    attention_backend: str = "auto"  # auto | cpu | torch | cuda
    num_threads: int | None = None
    max_model_len: int | None = None  # cap on prompt + output tokens; defaults to the model's context
    seed: int = 0
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def with_(self, **kw: Any) -> "EngineConfig":
        return replace(self, **kw)
