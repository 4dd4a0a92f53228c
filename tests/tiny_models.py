"""Tiny random-weight models for tests: Hugging Face directories and GGUF files made from them.

``make_tiny_hf_model`` saves a transformers model (fp32 safetensors) with the default model's
tokenizer, so text prompts and the ChatML template work. ``write_gguf_from_hf`` writes such a
directory as a GGUF file the way llama.cpp's converter would (q/k row permutation for llama, norm
weights + 1 for Gemma), so the GGUF loader can be tested on a round trip.
"""

from __future__ import annotations

import functools
import json
import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import quantize

from loom.model.files import default_model_path
from loom.model.arch import architecture_for_model_type
from loom.model.gguf_convert import ARCHS, ROPE_FREQS
from loom.model.gguf_meta import open_gguf
from loom.model.gguf_tokenizer import write_tokenizer
from loom.model.weights import iter_weights

# Shapes shared by every tiny model; hidden/heads/head_dim keep the matrices multiples of 32 so the
# 32-wide GGUF block types (Q8_0, Q4_0, Q4_1, ...) apply to every weight matrix.
_COMMON: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    initializer_range=0.1,
    bos_token_id=1,  # the default model's tokenizer: <|im_start|>, <|im_end|>
    eos_token_id=2,
    pad_token_id=2,
)
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(_COMMON, num_hidden_layers=2, rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True),
    "qwen2": dict(_COMMON, num_hidden_layers=2, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False),
    # Sliding layers alternate with global ones, and a 16-token window matters in short prompts.
    "gemma3_text": dict(
        _COMMON,
        num_hidden_layers=4,
        sliding_window=16,
        sliding_window_pattern=2,
        rope_theta=1000000.0,
        rope_local_base_freq=10000.0,
        query_pre_attn_scalar=16,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    ),
}
# Variants for features the base tiny models lack: name -> (base architecture, config overrides).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    # Llama 3.1 rope scaling over a short "original" context of 64 tokens: head_dim 16 at base 1e4 has 8
    # frequencies with wavelengths 6.3, 20, 63, 199, ... tokens, so all three bands occur (kept below
    # 64/4 = 16, interpolated 16..64, divided by 8 above 64) and rotations differ from plain rope
    # from the first few positions on.
    "llama-rope-llama3": (
        "llama",
        dict(
            max_position_embeddings=2048,
            rope_parameters={
                "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
            },
        ),  # fmt: skip
    ),
    # Gemma 3's linear scaling of the global layers (as on the 4B+ models).
    "gemma3-rope-linear": ("gemma3_text", dict(rope_scaling={"rope_type": "linear", "factor": 4.0})),
}


@functools.lru_cache(maxsize=1)
def default_tokenizer_files() -> dict[str, bytes]:
    """tokenizer.json and tokenizer_config.json converted from the default model's GGUF."""
    path = default_model_path()
    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer(open_gguf(path), "llama", path, Path(tmp))
        return {name: (Path(tmp) / name).read_bytes() for name in ("tokenizer.json", "tokenizer_config.json")}


def _hf_classes(arch: str) -> tuple[type, type]:
    import transformers  # test-only dependency

    return {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "gemma3_text": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM),
    }[arch]


def make_tiny_hf_model(arch: str, path: Path, seed: int = 0, **overrides: Any) -> Path:
    """Save a tiny random fp32 model of ``arch`` (llama, qwen2, gemma3_text, or a name in ``VARIANTS``)
    with the default model's tokenizer into ``path``; ``overrides`` go to the transformers config.
    Returns ``path``.

    1-D parameters (norms, biases) get random values too, so a loader that drops an offset or swaps
    two norms produces different outputs.
    """
    if arch in VARIANTS:
        arch, variant = VARIANTS[arch]
        overrides = {**variant, **overrides}
    arch = "gemma3_text" if arch == "gemma3" else arch
    if arch not in _DEFAULTS:
        raise ValueError(f"unknown tiny model architecture {arch!r} (llama, qwen2, gemma3_text)")
    config_cls, model_cls = _hf_classes(arch)
    vocab = len(json.loads(default_tokenizer_files()["tokenizer.json"])["model"]["vocab"])
    config = config_cls(**{"vocab_size": vocab, **_DEFAULTS[arch], **overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config).float().eval()
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim == 1:
                    p.add_(0.1 * torch.randn_like(p))
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    for name, data in default_tokenizer_files().items():
        (path / name).write_bytes(data)
    return path


FIM_TOKENS = ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>")  # Qwen2.5-Coder's names


def make_tiny_fim_model(path: Path) -> Path:
    """A tiny llama whose tokenizer also has fill-in-the-middle tokens (``FIM_TOKENS``, added as
    special tokens after the default vocabulary, which the model's embedding grows to cover)."""
    from tokenizers import Tokenizer as BackendTokenizer

    vocab = len(json.loads(default_tokenizer_files()["tokenizer.json"])["model"]["vocab"])
    make_tiny_hf_model("llama", path, vocab_size=vocab + len(FIM_TOKENS))
    tokenizer = BackendTokenizer.from_file(str(path / "tokenizer.json"))
    tokenizer.add_special_tokens(list(FIM_TOKENS))
    tokenizer.save(str(path / "tokenizer.json"))
    return path


@functools.lru_cache(maxsize=4)
def _tokenizer_fields(path: Path) -> list[tuple[str, Any, GGUFValueType, GGUFValueType | None]]:
    """The ``tokenizer.*`` metadata of a GGUF file as ``(key, value, type, array element type)``."""
    fields = []
    for key, field in open_gguf(path).fields.items():
        if key.startswith("tokenizer."):
            sub = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
            fields.append((key, field.contents(), field.types[0], sub))
    return fields


def _rope_thetas(cfg: dict[str, Any]) -> tuple[float, float | None]:
    """(global, local) rope bases from a config.json in either transformers' old or new spelling."""
    rp = cfg.get("rope_parameters") or {}
    if "full_attention" in rp:
        return float(rp["full_attention"]["rope_theta"]), float(rp["sliding_attention"]["rope_theta"])
    theta = rp.get("rope_theta", cfg.get("rope_theta", 10000.0))
    return float(theta), cfg.get("rope_local_base_freq")


def _gguf_name(hf_name: str, arch: str) -> str:
    spec = ARCHS[arch]
    globals_ = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    stem, kind = hf_name.rsplit(".", 1)
    if stem in globals_:
        return f"{globals_[stem]}.{kind}"
    _, _, layer, rest = stem.split(".", 3)
    part = {hf: gg for gg, hf in spec.layer_names.items()}[rest]
    return f"blk.{layer}.{part}.{kind}"


def _llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf row permutation of q/k for its rotary layout."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensor(data: np.ndarray, qtype: GGMLQuantizationType) -> tuple[np.ndarray, GGMLQuantizationType]:
    """``data`` (float32) encoded as ``qtype``; 1-D tensors and rows not a multiple of the block stay F32,
    as llama.cpp keeps them."""
    block = GGML_QUANT_SIZES[qtype][0]
    if qtype == GGMLQuantizationType.F32 or data.ndim == 1 or data.shape[-1] % block:
        return data.astype(np.float32), GGMLQuantizationType.F32
    return quantize(data, qtype), qtype


def llamacpp_rope_freqs(cfg: dict[str, Any]) -> np.ndarray | None:
    """The ``rope_freqs`` tensor llama.cpp's convert_hf_to_gguf writes for a Llama 3.1-style
    (``rope_type: llama3``) config: per-frequency divisors, computed as it does; None for other configs."""
    rp = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if rp.get("rope_type", rp.get("type")) != "llama3":
        return None
    base = rp.get("rope_theta", cfg.get("rope_theta", 10000.0))
    dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = rp.get("factor", 8.0), rp.get("low_freq_factor", 1.0), rp.get("high_freq_factor", 4.0)
    old_context_len = rp.get("original_max_position_embeddings", 8192)
    low_freq_wavelen, high_freq_wavelen = old_context_len / low, old_context_len / high
    factors = []
    for freq in freqs:  # 0-d float32 tensors, so the arithmetic is float32 as in llama.cpp's script
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            factors.append(1.0)
        elif wavelen > low_freq_wavelen:
            factors.append(float(factor))
        else:
            smooth = (old_context_len / wavelen - low) / (high - low)
            factors.append(float(1 / ((1 - smooth) / factor + smooth)))
    return np.array(factors, dtype=np.float32)


def write_gguf_from_hf(
    hf_dir: Path,
    out_path: Path,
    qtype: GGMLQuantizationType | str = GGMLQuantizationType.F32,
    tokenizer_gguf: Path | None = None,
) -> Path:
    """Write the HF model in ``hf_dir`` as a GGUF file with weights of type ``qtype`` (any type
    ``gguf.quants.quantize`` supports: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1). The tokenizer
    metadata is copied from ``tokenizer_gguf`` (default: the default model's GGUF, whose tokenizer the
    tiny models use)."""
    qtype = GGMLQuantizationType[qtype] if isinstance(qtype, str) else qtype
    cfg = json.loads((Path(hf_dir) / "config.json").read_text())
    arch = architecture_for_model_type(cfg["model_type"]).name  # llama.cpp names architectures as loom does
    theta, local_theta = _rope_thetas(cfg)
    writer = GGUFWriter(out_path, arch)
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_rope_freq_base(theta)
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    if arch == "llama":
        writer.add_rope_dimension_count(head_dim)
    if arch == "gemma3":
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_sliding_window(cfg["sliding_window"])
        writer.add_sliding_window_pattern([t == "sliding_attention" for t in cfg["layer_types"]])
        writer.add_rope_freq_base_swa(local_theta)
    for key, value, vtype, sub in _tokenizer_fields(Path(tokenizer_gguf or default_model_path())):
        writer.add_key_value(key, value, vtype, sub)
    rope_freqs = llamacpp_rope_freqs(cfg)
    if rope_freqs is not None:
        writer.add_tensor(ROPE_FREQS, rope_freqs)
    for name, tensor in iter_weights(Path(hf_dir)):
        if name == "lm_head.weight" and cfg.get("tie_word_embeddings"):
            continue
        gname = _gguf_name(name, arch)
        data = tensor.float().numpy()
        if arch == "llama" and gname.endswith(("attn_q.weight", "attn_k.weight")):
            heads = cfg["num_attention_heads"] if "attn_q" in gname else cfg["num_key_value_heads"]
            data = _llamacpp_permute(data, heads)
        if arch == "gemma3" and gname.endswith("norm.weight"):
            data = data + 1.0
        encoded, used = gguf_tensor(data, qtype)
        # Byte-encoded types need their type spelled out; F32/F16 are inferred from the numpy dtype.
        writer.add_tensor(gname, encoded, raw_dtype=used if encoded.dtype == np.uint8 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(out_path)
