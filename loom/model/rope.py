"""Rotary position embeddings: inverse frequencies (with transformers' scaling types) and the
precomputed cos/sin table the architectures index by position."""

from __future__ import annotations

import math

import torch
from torch import nn

from loom.config import RopeScaling


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> torch.Tensor:
    """The [head_dim / 2] fp32 inverse frequencies, computed in the same operations as transformers'
    ``ROPE_INIT_FUNCTIONS`` (so the tables agree bit for bit, not just closely)."""
    scaling = scaling or RopeScaling()
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    if scaling.rope_type == "longrope":  # static per-dimension divisors (llama.cpp's rope_freqs)
        if len(scaling.freq_factors) != head_dim // 2:
            raise ValueError(f"rope has {len(scaling.freq_factors)} frequency factors for head dim {head_dim}")
        return 1.0 / (torch.tensor(scaling.freq_factors, dtype=torch.float32) * theta**exponents)
    inv_freq = 1.0 / (theta**exponents)
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    if scaling.rope_type == "llama3":
        return _llama3(inv_freq, scaling)
    return inv_freq


def _llama3(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    """Llama 3.1: wavelengths past the original context / low_freq_factor are stretched by ``factor``,
    those under original / high_freq_factor are kept, and the band between is interpolated."""
    assert s.original_max_position is not None
    old_context_len = s.original_max_position
    low_freq_wavelen = old_context_len / s.low_freq_factor
    high_freq_wavelen = old_context_len / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth_factor = (old_context_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth_factor) * inv_freq_llama / s.factor + smooth_factor * inv_freq_llama
    is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium_freq, smoothed, inv_freq_llama)


class RotaryEmbedding(nn.Module):
    """Rotate-half (GPT-NeoX / HF) rotary embedding with a precomputed cos/sin table."""

    def __init__(self, head_dim: int, max_position: int, theta: float, scaling: RopeScaling | None = None) -> None:
        super().__init__()
        scaling = scaling or RopeScaling()
        inv_freq = rope_inv_freq(head_dim, theta, scaling)
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
        cos, sin = freqs.cos(), freqs.sin()
        if scaling.attention_factor != 1.0:
            cos, sin = cos * scaling.attention_factor, sin * scaling.attention_factor
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token tables [T, 1, D/2], computed once per step and shared by all layers."""
        return self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(dtype)
