"""Llama (SmolLM2, TinyLlama, Llama 2/3) and the architectures that differ from it only in
details (Qwen2: QKV bias, untied head)."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from loom.config import ModelConfig
from loom.model.arch.base import CausalLM
from loom.model.arch.hf_config import HFConfig, common_fields, global_rope
from loom.model.attention import StepAttention
from loom.model.fused_decode import FusedDecoder, fused_decoder
from loom.model.layers import Embedding, GatedActivation, Linear, RMSNorm, apply_rotary
from loom.model.rope import RotaryEmbedding


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.layer = layer
        self.qkv_proj = Linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, bias=cfg.attention_bias)
        self.o_proj = Linear(cfg.q_size, cfg.hidden_size)
        self.scale = cfg.head_dim**-0.5

    def forward(self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor], attention: StepAttention) -> torch.Tensor:
        c = self.cfg
        qkv = self.qkv_proj(x)
        # q and k rotate together (one set of elementwise ops instead of two).
        qk = apply_rotary(qkv[:, : c.q_size + c.kv_size].view(-1, c.num_heads + c.num_kv_heads, c.head_dim), *cos_sin)
        q, k = qk[:, : c.num_heads], qk[:, c.num_heads :]
        v = qkv[:, c.q_size + c.kv_size :].view(-1, c.num_kv_heads, c.head_dim)
        out = attention(self.layer, q, k, v, self.scale)
        return self.o_proj(out.reshape(-1, c.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = GatedActivation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, cos_sin: tuple[torch.Tensor, torch.Tensor],
        attention: StepAttention,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Takes and returns (this sublayer's output, the residual stream before adding it), so
        each residual add fuses with the norm that follows it."""
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm.add_forward(x, residual)
        h = self.self_attn(h, cos_sin, attention)
        h, residual = self.post_attention_layernorm.add_forward(h, residual)
        return self.mlp(h), residual


class LlamaForCausalLM(CausalLM):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position, cfg.rope_theta, cfg.rope_scaling)
        self.fused: FusedDecoder | None = None  # the native decode stack, built on the first step it serves

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attention: StepAttention) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        cos_sin = self.rotary.cos_sin(positions, x.dtype)
        if (fused := fused_decoder(self, self.fused, x, attention)) is not None:
            self.fused = fused
            return fused(x, cos_sin, attention)
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, cos_sin, attention)
        return self.norm.add_forward(x, residual)[0]


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2/2.5: Llama with biases on q/k/v (``attention_bias`` in the config) and its own head."""


def parse_llama_config(cfg: HFConfig, architecture: str) -> ModelConfig:
    """``config.json`` of a Llama-family model (rope scaling: linear, llama3)."""
    common = common_fields(cfg)
    return ModelConfig(
        architecture=architecture,
        **common,
        **global_rope(cfg, common["max_position"]),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=bool(cfg.get("attention_bias", False)),
    )


def parse_qwen2_config(cfg: HFConfig, architecture: str) -> ModelConfig:
    """``config.json`` of Qwen2/2.5: Llama's, but q/k/v always carry a bias (transformers' Qwen2 has no switch)."""
    return replace(parse_llama_config(cfg, architecture), attention_bias=True)
