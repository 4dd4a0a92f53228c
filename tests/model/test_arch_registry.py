"""The architecture registry: one entry per architecture owns its names, its config.json parsing
and its model class; the GGUF converter's table is keyed by the same names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loom.config import RopeScaling
from loom.model import gguf_convert
from loom.model.arch import (
    ARCHITECTURES,
    architecture_for_model_type,
    get_architecture,
    load_model_config,
    model_class,
    model_config_from_dict,
)
from loom.model.arch.gemma3 import Gemma3ForCausalLM
from loom.model.arch.llama import LlamaForCausalLM, Qwen2ForCausalLM

BASE = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)


def test_registry_entries() -> None:
    assert list(ARCHITECTURES) == ["llama", "qwen2", "gemma3"]
    assert model_class("qwen2") is Qwen2ForCausalLM and model_class("gemma3") is Gemma3ForCausalLM
    assert architecture_for_model_type("gemma3_text").name == "gemma3"
    assert architecture_for_model_type("llama").model_class is LlamaForCausalLM
    assert set(gguf_convert.ARCHS) <= set(ARCHITECTURES)


@pytest.mark.parametrize(("arch", "model_type"), [("llama", "llama"), ("qwen2", "qwen2"), ("gemma3", "gemma3_text")])
def test_tiny_models_parse_as_their_architecture(tiny_model, arch: str, model_type: str) -> None:
    import transformers

    path = tiny_model(arch)
    cfg = load_model_config(path)
    ref = transformers.AutoConfig.from_pretrained(path)
    assert ref.model_type == model_type and get_architecture(cfg.architecture).hf_model_types[0] == model_type
    assert (cfg.architecture, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size) == (
        arch, ref.num_hidden_layers, ref.num_attention_heads, ref.num_key_value_heads, ref.head_dim, ref.vocab_size,
    )  # fmt: skip
    assert cfg.tie_word_embeddings == ref.tie_word_embeddings
    assert cfg.attention_bias == (arch == "qwen2")
    assert cfg.rope_scaling == RopeScaling()


def test_unknown_model_type_names_the_supported_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unsupported model type 'mamba' \(supported: llama, qwen2, gemma3_text, gemma3\)"):
        model_config_from_dict({**BASE, "model_type": "mamba"})
    with pytest.raises(ValueError, match=r"unknown architecture 'mamba' \(supported: llama, qwen2, gemma3\)"):
        model_class("mamba")
    with pytest.raises(ValueError, match="no config.json"):
        load_model_config(tmp_path)
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_model_config(tmp_path)


def test_gemma3_multimodal_wrapper_reads_its_text_config() -> None:
    text = {**BASE, "model_type": "gemma3_text", "layer_types": ["sliding_attention", "full_attention"],
            "sliding_window": 32, "rope_theta": 1e6, "rope_local_base_freq": 1e4,
            "rope_scaling": {"rope_type": "linear", "factor": 8.0}}  # fmt: skip
    cfg = model_config_from_dict({"model_type": "gemma3", "text_config": text, "vision_config": {}})
    assert (cfg.architecture, cfg.layer_is_sliding, cfg.sliding_window) == ("gemma3", (True, False), 32)
    assert (cfg.rope_theta, cfg.rope_local_theta, cfg.rope_scaling) == (1e6, 1e4, RopeScaling("linear", factor=8.0))
    assert cfg.tie_word_embeddings and cfg.hidden_act == "silu"


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}  # fmt: skip


@pytest.mark.parametrize(
    "spelling",
    [
        {"rope_theta": 5e5, "rope_scaling": LLAMA3},  # transformers < 5
        {"rope_parameters": {**LLAMA3, "rope_theta": 5e5}},  # transformers >= 5
        {"rope_theta": 5e5, "rope_scaling": {k: v for k, v in LLAMA3.items() if k != "rope_type"} | {"type": "llama3"}},
    ],
)
def test_llama3_rope_scaling_is_read_in_every_spelling(spelling) -> None:
    cfg = model_config_from_dict({**BASE, "model_type": "llama", "max_position_embeddings": 131072, **spelling})
    assert cfg.rope_theta == 5e5
    assert cfg.rope_scaling == RopeScaling("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                           original_max_position=8192)  # fmt: skip


@pytest.mark.parametrize(
    ("rope", "match"),
    [
        ({"rope_type": "yarn", "factor": 4.0}, "unsupported rope scaling type 'yarn'"),
        ({"rope_type": "dynamic", "factor": 2.0}, "unsupported rope scaling type 'dynamic'"),
        ({"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}, "different short and long"),
    ],
)
def test_unsupported_rope_scaling_is_an_error_not_ignored(rope, match) -> None:
    with pytest.raises(ValueError, match=match):
        model_config_from_dict({**BASE, "model_type": "qwen2", "rope_scaling": rope})


def test_converter_writes_registry_names(tiny_model, tmp_path: Path) -> None:
    """The GGUF converter's config.json takes model_type and class from the registry entry."""
    from loom.model.files import resolve_model
    from tests.tiny_models import write_gguf_from_hf

    out = resolve_model(write_gguf_from_hf(tiny_model("gemma3"), tmp_path / "g.gguf"), cache_dir=tmp_path / "c")
    cfg = json.loads((out / "config.json").read_text())
    entry = ARCHITECTURES["gemma3"]
    assert (cfg["model_type"], cfg["architectures"]) == (entry.hf_model_types[0], [entry.hf_class])
