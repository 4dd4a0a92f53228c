"""Rotary tables against transformers' rotary modules: plain, Llama 3.1 (``llama3``) and Gemma 3's
linear scaling, for the architectures' real configs (the tiny models' config.json)."""

from __future__ import annotations

import pytest
import torch

from loom.config import RopeScaling
from loom.model.arch import load_model_config
from loom.model.rope import RotaryEmbedding, rope_inv_freq


def _hf_rotary(path, layer_type: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inv_freq, cos, sin) of transformers' rotary module for the model at ``path``, over all positions;
    cos/sin as loom stores them ([positions, head_dim / 2])."""
    import transformers
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = transformers.AutoConfig.from_pretrained(path)
    rotary = {"llama": LlamaRotaryEmbedding, "gemma3_text": Gemma3RotaryEmbedding}[config.model_type](config)
    positions = torch.arange(config.max_position_embeddings)[None]
    x = torch.zeros(1, dtype=torch.float32)
    if layer_type is None:
        cos, sin = rotary(x, positions)
        inv_freq = rotary.inv_freq
    else:
        cos, sin = rotary(x, positions, layer_type)
        inv_freq = getattr(rotary, f"{layer_type}_inv_freq")
    half = cos.shape[-1] // 2
    return inv_freq, cos[0, :, :half], sin[0, :, :half]


@pytest.mark.parametrize("variant", ["llama", "llama-rope-llama3", "gemma3-rope-linear"])
def test_rotary_tables_match_transformers(tiny_model, variant: str) -> None:
    path = tiny_model(variant)
    cfg = load_model_config(path)
    ours = RotaryEmbedding(cfg.head_dim, cfg.max_position, cfg.rope_theta, cfg.rope_scaling)
    inv_freq, cos, sin = _hf_rotary(path, "full_attention" if cfg.architecture == "gemma3" else None)
    assert torch.equal(ours.inv_freq, inv_freq)
    torch.testing.assert_close(ours.cos, cos, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.sin, sin, atol=1e-6, rtol=0)
    if cfg.architecture == "gemma3":  # the sliding layers' local rope stays unscaled
        local = RotaryEmbedding(cfg.head_dim, cfg.max_position, cfg.rope_local_theta)
        inv_freq, cos, _ = _hf_rotary(path, "sliding_attention")
        assert torch.equal(local.inv_freq, inv_freq)
        torch.testing.assert_close(local.cos, cos, atol=1e-6, rtol=0)


def test_tiny_llama3_config_covers_every_band(tiny_model) -> None:
    """The llama3 test model's frequencies fall in all three bands, so the golden test sees each rule."""
    cfg = load_model_config(tiny_model("llama-rope-llama3"))
    s = cfg.rope_scaling
    assert (s.rope_type, s.factor, s.original_max_position) == ("llama3", 8.0, 64)
    plain = rope_inv_freq(cfg.head_dim, cfg.rope_theta)
    ratio = plain / rope_inv_freq(cfg.head_dim, cfg.rope_theta, s)
    kept, divided = ratio == 1.0, torch.isclose(ratio, torch.tensor(8.0))
    assert kept.any() and divided.any() and (~kept & ~divided).any(), ratio


def test_linear_scaling_divides_every_frequency() -> None:
    plain = rope_inv_freq(64, 10000.0)
    torch.testing.assert_close(rope_inv_freq(64, 10000.0, RopeScaling("linear", factor=8.0)), plain / 8)


def test_longrope_divides_by_each_factor_and_scales_cos_sin() -> None:
    factors = tuple(float(i + 1) for i in range(8))
    scaling = RopeScaling("longrope", freq_factors=factors, attention_factor=0.5)
    inv = rope_inv_freq(16, 10000.0, scaling)
    torch.testing.assert_close(inv, rope_inv_freq(16, 10000.0) / torch.tensor(factors))
    rot = RotaryEmbedding(16, 32, 10000.0, scaling)
    plain = RotaryEmbedding(16, 32, 10000.0, RopeScaling("longrope", freq_factors=factors))
    torch.testing.assert_close(rot.cos, plain.cos * 0.5)
    with pytest.raises(ValueError, match="8 frequency factors for head dim 32"):
        rope_inv_freq(32, 10000.0, scaling)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(rope_type="yarn"), "unsupported rope scaling type 'yarn'"),
        (dict(rope_type="linear", factor=0.0), "factor must be > 0"),
        (dict(rope_type="llama3", factor=8.0), "original_max_position"),
        (dict(rope_type="llama3", original_max_position=64, low_freq_factor=4.0, high_freq_factor=1.0), "high_freq_factor"),
        (dict(rope_type="longrope"), "freq_factors"),
    ],
)
def test_bad_rope_scaling_is_rejected(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        RopeScaling(**kwargs)
