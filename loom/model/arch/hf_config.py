"""Reading a Hugging Face ``config.json`` into :class:`ModelConfig`: the fields every architecture
shares and the rope settings, in both spellings transformers has used (``rope_theta`` +
``rope_scaling`` before v5, ``rope_parameters`` since, nested per layer type for Gemma 3).
Architecture-specific parsing lives with each architecture; the registry in ``__init__`` picks it."""

from __future__ import annotations

import math
from typing import Any

from loom.config import RopeScaling

HFConfig = dict[str, Any]


def common_fields(cfg: HFConfig) -> dict[str, Any]:
    """``ModelConfig`` keyword arguments every decoder-only architecture reads the same way."""
    num_heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    eos = cfg.get("eos_token_id")
    eos_ids = tuple(int(e) for e in eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
    return dict(
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
        head_dim=int(cfg.get("head_dim") or hidden // num_heads),
        intermediate_size=int(cfg["intermediate_size"]),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        max_position=int(cfg.get("max_position_embeddings", 2048)),
        hidden_act=str(cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu"),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos_ids,
    )


def rope_parameters(cfg: HFConfig) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(global, sliding-window) rope parameter dicts, each with ``rope_theta`` and transformers' scaling
    keys; the second is None unless the config has per-layer-type parameters or ``rope_local_base_freq``."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:
        return dict(params["full_attention"]), dict(params.get("sliding_attention") or {})
    local = {"rope_theta": cfg["rope_local_base_freq"]} if "rope_local_base_freq" in cfg else None
    if isinstance(params, dict):
        return dict(params), local
    flat = dict(cfg.get("rope_scaling") or {})
    flat.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    return flat, local


def rope_scaling(params: dict[str, Any], max_position: int, original: int | None = None) -> RopeScaling:
    """One rope parameter dict as :class:`RopeScaling`. ValueError for types loom does not implement.
    ``original``: a top-level ``original_max_position_embeddings``, which transformers prefers (Phi-3)."""
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind == "default":
        return RopeScaling()
    if kind == "linear":
        return RopeScaling("linear", factor=float(params["factor"]))
    original = int(original or params.get("original_max_position_embeddings") or max_position)
    if kind == "llama3":
        return RopeScaling(
            "llama3",
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position=original,
        )
    if kind == "longrope":
        short, long = params["short_factor"], params["long_factor"]
        if list(short) != list(long):
            raise ValueError("longrope with different short and long factors (switched by sequence length) is not supported")
        attention = params.get("attention_factor")
        if attention is None:  # transformers' default
            factor = params.get("factor") or max_position / original
            attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        return RopeScaling(
            "longrope", original_max_position=original, freq_factors=tuple(float(f) for f in short),
            attention_factor=float(attention),
        )  # fmt: skip
    raise ValueError(f"unsupported rope scaling type {kind!r} (supported: {', '.join(RopeScaling.TYPES)})")


def global_rope(cfg: HFConfig, max_position: int) -> dict[str, Any]:
    """``rope_theta`` and ``rope_scaling`` keyword arguments for a model with one rope everywhere."""
    params, _ = rope_parameters(cfg)
    scaling = rope_scaling(params, max_position, cfg.get("original_max_position_embeddings"))
    return dict(rope_theta=float(params.get("rope_theta", 10000.0)), rope_scaling=scaling)
