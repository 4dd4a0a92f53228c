"""Gemma 3 (text): sliding-window layers with a local rope base between global layers,
q/k RMSNorm, four norms per layer, Gemma's ``1 + w`` norm scale, scaled embeddings."""

from __future__ import annotations

import torch
from torch import nn

from loom.config import ModelConfig
from loom.model.arch.base import CausalLM
from loom.model.arch.hf_config import HFConfig, common_fields, rope_parameters, rope_scaling
from loom.model.arch.llama import LlamaMLP
from loom.model.attention import StepAttention
from loom.model.layers import Embedding, Linear, RMSNorm, apply_rotary
from loom.model.rope import RotaryEmbedding

CosSin = tuple[torch.Tensor, torch.Tensor]


class Gemma3Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, sliding: bool) -> None:
        super().__init__()
        self.layer = layer
        self.cfg = cfg
        self.qkv_proj = Linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, bias=cfg.attention_bias)
        self.o_proj = Linear(cfg.q_size, cfg.hidden_size)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, offset=1.0)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, offset=1.0)
        self.scale = float(cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5
        self.window = int(cfg.sliding_window or 0) if sliding else 0

    def forward(self, x: torch.Tensor, cos_sin: CosSin, attention: StepAttention) -> torch.Tensor:
        c = self.cfg
        q, k, v = self.qkv_proj(x).split([c.q_size, c.kv_size, c.kv_size], dim=-1)
        q = apply_rotary(self.q_norm(q.reshape(-1, c.head_dim)).view(-1, c.num_heads, c.head_dim), *cos_sin)
        k = apply_rotary(self.k_norm(k.reshape(-1, c.head_dim)).view(-1, c.num_kv_heads, c.head_dim), *cos_sin)
        v = v.view(-1, c.num_kv_heads, c.head_dim)
        out = attention(self.layer, q, k, v, self.scale, self.window)
        return self.o_proj(out.reshape(-1, c.q_size))


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, sliding: bool) -> None:
        super().__init__()
        self.sliding = sliding
        norm = lambda: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, offset=1.0)  # noqa: E731
        self.input_layernorm = norm()
        self.self_attn = Gemma3Attention(cfg, layer, sliding)
        self.post_attention_layernorm = norm()
        self.pre_feedforward_layernorm = norm()
        self.mlp = LlamaMLP(cfg)
        self.post_feedforward_layernorm = norm()

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, cos_sin: CosSin, attention: StepAttention
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(sublayer output, residual before adding it), as in the Llama layer; Gemma normalises
        each sublayer's output before the add."""
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm.add_forward(x, residual)
        h = self.post_attention_layernorm(self.self_attn(h, cos_sin, attention))
        h, residual = self.pre_feedforward_layernorm.add_forward(h, residual)
        return self.post_feedforward_layernorm(self.mlp(h)), residual


class Gemma3ForCausalLM(CausalLM):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        sliding = cfg.layer_is_sliding or (False,) * cfg.num_layers
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Gemma3DecoderLayer(cfg, i, s) for i, s in enumerate(sliding))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, offset=1.0)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size)
        self.rotary_global = RotaryEmbedding(cfg.head_dim, cfg.max_position, cfg.rope_theta, cfg.rope_scaling)
        self.rotary_local = RotaryEmbedding(cfg.head_dim, cfg.max_position, cfg.rope_local_theta or 10000.0)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attention: StepAttention) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        x = x * torch.tensor(self.config.hidden_size**0.5, dtype=x.dtype)
        rope_global = self.rotary_global.cos_sin(positions, x.dtype)
        rope_local = self.rotary_local.cos_sin(positions, x.dtype)
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, rope_local if layer.sliding else rope_global, attention)
        return self.norm.add_forward(x, residual)[0]


def parse_gemma3_config(cfg: HFConfig, architecture: str) -> ModelConfig:
    """``config.json`` of Gemma 3 (text): the sliding-window layer pattern, the local rope base of the
    sliding layers (unscaled), the global layers' rope (linear scaling on the larger models)."""
    common = common_fields(cfg)
    num_layers = common["num_layers"]
    if cfg.get("layer_types"):
        sliding = tuple(t == "sliding_attention" for t in cfg["layer_types"])
    else:
        pattern = int(cfg.get("sliding_window_pattern", 6))
        sliding = tuple((i + 1) % pattern != 0 for i in range(num_layers))
    if len(sliding) != num_layers:
        raise ValueError(f"gemma3 config lists {len(sliding)} layer types for {num_layers} layers")
    global_params, local_params = rope_parameters(cfg)
    local_params = local_params or {}
    if rope_scaling(local_params, common["max_position"]).rope_type != "default":
        raise ValueError("gemma3: rope scaling of the sliding-window layers is not supported")
    return ModelConfig(
        architecture=architecture,
        **common,
        rope_theta=float(global_params.get("rope_theta", 10000.0)),
        rope_scaling=rope_scaling(global_params, common["max_position"]),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        attention_bias=bool(cfg.get("attention_bias", False)),
        sliding_window=int(cfg.get("sliding_window") or 4096),
        layer_is_sliding=sliding,
        rope_local_theta=float(local_params.get("rope_theta", 10000.0)),
        query_pre_attn_scalar=cfg.get("query_pre_attn_scalar"),
    )
