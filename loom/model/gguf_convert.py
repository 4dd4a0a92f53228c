"""Convert a GGUF file into a Hugging Face-style model directory.

The output holds ``config.json``, ``generation_config.json``, safetensors weights under HF tensor names
(sharded with ``model.safetensors.index.json`` past :data:`SHARD_BYTES`), ``tokenizer.json`` and
``tokenizer_config.json``. Quantized tensors are dequantized to float32 with ``gguf.quants``;
F32/F16/BF16 tensors are stored as they are.

Two llama.cpp storage conventions are undone on the way:

* ``llama``: the rows of ``attn_q``/``attn_k`` are permuted for llama.cpp's interleaved rotary layout.
* ``gemma3``: RMSNorm weights are stored as ``w + 1``; HF Gemma stores ``w`` and scales by ``1 + w``.

A ``rope_freqs.weight`` tensor (llama.cpp's per-dimension divisors of the rotary frequencies, which it
writes for Llama 3.1-style rope scaling) is not a weight: it becomes ``rope_scaling`` in config.json, as
transformers' ``longrope`` with one static set of factors (inverse frequency ``i`` divided by factor
``i``, exactly as llama.cpp applies them), which transformers and loom both read.

Architectures are named as in loom's registry (``loom.model.arch``), which are llama.cpp's names too;
``ARCHS`` holds only what is particular to GGUF files.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.gguf_reader import ReaderTensor
from gguf.quants import dequantize
from safetensors.torch import save_file

from loom.model.arch import ARCHITECTURES
from loom.model.gguf_meta import GGUFError, field_value, open_gguf
from loom.model.gguf_tokenizer import eos_token_ids, write_tokenizer

SHARD_BYTES = 2 << 30
_STORED_AS_IS = {
    GGMLQuantizationType.F32: torch.float32,
    GGMLQuantizationType.F16: torch.float16,
    GGMLQuantizationType.BF16: torch.bfloat16,
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LLAMA_LAYER = _LAYER_NAMES | {"ffn_norm": "post_attention_layernorm"}
_GEMMA3_LAYER = _LAYER_NAMES | {
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_TENSOR_NAME = re.compile(r"^(?:blk\.(?P<layer>\d+)\.)?(?P<part>[a-z_0-9]+)\.(?P<kind>weight|bias)$")


ROPE_FREQS = "rope_freqs.weight"


@dataclass(frozen=True)
class ArchSpec:
    """How the GGUF files of one registry architecture store it (its HF names come from the registry)."""

    layer_names: dict[str, str]
    permute_qk: bool = False  # llama.cpp's rotary row permutation of attn_q / attn_k (llama only)
    norm_offset: float = 0.0  # subtracted from every "*_norm" weight (Gemma stores w + 1)
    rope_freqs: bool = False  # may carry a rope_freqs tensor (frequency divisors of every layer)


# Keyed by loom.model.arch registry names (which are llama.cpp's general.architecture names); an
# architecture missing here has no GGUF support.
ARCHS: dict[str, ArchSpec] = {
    "llama": ArchSpec(_LLAMA_LAYER, permute_qk=True, rope_freqs=True),
    "qwen2": ArchSpec(_LLAMA_LAYER, rope_freqs=True),
    "gemma3": ArchSpec(_GEMMA3_LAYER, norm_offset=1.0),
}


def hf_shape(t: ReaderTensor) -> tuple[int, ...]:
    """A GGUF tensor's shape in PyTorch order (GGUF lists the fastest-varying dimension first)."""
    return tuple(int(d) for d in reversed(t.shape.tolist()))


_REQUIRED = object()


def _scalar(reader: GGUFReader, key: str, path: Path, default: Any = _REQUIRED) -> Any:
    """Metadata ``key`` as a single value, ``default`` when absent; GGUFError if a required key is absent."""
    value = field_value(reader, key)
    if isinstance(value, list):
        raise GGUFError(f"{path}: per-layer metadata {key!r} is not supported")
    if value is None and default is _REQUIRED:
        raise GGUFError(f"{path}: missing GGUF metadata {key!r}")
    return default if value is None else value


def hf_config(reader: GGUFReader, arch: str, path: Path, tok_meta: dict[str, Any]) -> dict[str, Any]:
    """``config.json`` for the model in ``reader``: HF keys read by transformers and loom.config alike."""
    registry = ARCHITECTURES[arch]
    key = lambda k, default=_REQUIRED: _scalar(reader, f"{arch}.{k}", path, default)  # noqa: E731
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise GGUFError(f"{path}: no token_embd.weight tensor")
    hidden = int(key("embedding_length"))
    heads = int(key("attention.head_count"))
    kv_heads = int(key("attention.head_count_kv", heads))
    layers = int(key("block_count"))
    rotary = key("rope.dimension_count", None)
    head_dim = int(key("attention.key_length", rotary or hidden // heads))
    if rotary and rotary != head_dim:
        raise GGUFError(f"{path}: partial rotary (rope.dimension_count != head dim) is not supported")
    eos = eos_token_ids(tok_meta)
    cfg: dict[str, Any] = {
        "architectures": [registry.hf_class],
        "model_type": registry.hf_model_types[0],
        "vocab_size": hf_shape(tensors["token_embd.weight"])[0],
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(key("context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": tok_meta.get("bos_id"),
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "pad_token_id": tok_meta.get("pad_id"),
    }
    scaling = key("rope.scaling.type", "none")
    if scaling != "none":
        if scaling != "linear":
            raise GGUFError(f"{path}: rope scaling {scaling!r} is not supported (only linear)")
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(key("rope.scaling.factor"))}
    if ROPE_FREQS in tensors:
        if not ARCHS[arch].rope_freqs:
            raise GGUFError(f"{path}: a {ROPE_FREQS} tensor is not supported for architecture {arch!r}")
        if "rope_scaling" in cfg:
            raise GGUFError(f"{path}: a {ROPE_FREQS} tensor together with rope scaling {scaling!r} is not supported")
        cfg["rope_scaling"] = _rope_freqs_scaling(tensors[ROPE_FREQS], head_dim, cfg["max_position_embeddings"], path)
    if arch == "llama":
        cfg |= {"hidden_act": "silu", "attention_bias": "blk.0.attn_q.bias" in tensors, "mlp_bias": False}
    elif arch == "qwen2":
        cfg |= {"hidden_act": "silu", "use_sliding_window": False}
    elif arch == "gemma3":
        cfg |= _gemma3_config(reader, path, layers, hidden, heads, head_dim)
    return cfg


def _rope_freqs_scaling(t: ReaderTensor, head_dim: int, context: int, path: Path) -> dict[str, Any]:
    """config.json ``rope_scaling`` for llama.cpp's ``rope_freqs``: transformers' longrope with the same
    factors for short and long sequences and no attention scaling, i.e. ``inv_freq[i] / factors[i]``."""
    factors = gguf_tensor_to_torch(t).float().flatten()
    if factors.numel() != head_dim // 2 or not bool((factors > 0).all()):
        raise GGUFError(f"{path}: {ROPE_FREQS} must hold {head_dim // 2} positive factors, got {factors.tolist()}")
    values = factors.tolist()
    return {
        "rope_type": "longrope",
        "short_factor": values,
        "long_factor": values,
        "factor": 1.0,
        "attention_factor": 1.0,
        "original_max_position_embeddings": context,
    }


def _gemma3_config(
    reader: GGUFReader, path: Path, layers: int, hidden: int, heads: int, head_dim: int
) -> dict[str, Any]:
    """Gemma3 settings, with the defaults llama.cpp hard-codes when a file does not store them
    (sliding pattern 6, local rope base 1e4)."""
    key = lambda k, default=_REQUIRED: _scalar(reader, f"gemma3.{k}", path, default)  # noqa: E731
    pattern = field_value(reader, "gemma3.attention.sliding_window_pattern")
    if isinstance(pattern, list):  # newer files: one flag per layer, true = sliding
        if len(pattern) != layers:
            raise GGUFError(f"{path}: sliding_window_pattern has {len(pattern)} flags for {layers} layers")
        layer_types = ["sliding_attention" if p else "full_attention" for p in pattern]
    else:
        every = int(pattern or 6)  # llama.cpp's default
        layer_types = ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(layers)]
    return {
        "hidden_activation": "gelu_pytorch_tanh",
        "sliding_window": int(key("attention.sliding_window")),
        "layer_types": layer_types,
        "rope_local_base_freq": float(key("rope.freq_base_swa", 10000.0)),
        # llama.cpp scales queries by 1/sqrt(head_dim), except Gemma3-27B (62 layers): hidden/heads.
        "query_pre_attn_scalar": hidden // heads if layers == 62 else head_dim,
        "final_logit_softcapping": key("final_logit_softcapping", None),
        "attn_logit_softcapping": key("attn_logit_softcapping", None),
    }


def hf_tensor_name(name: str, arch: str, path: Path) -> str:
    spec = ARCHS[arch]
    m = _TENSOR_NAME.match(name)
    part = m and m["part"]
    if m is None or (m["layer"] is None and part not in _GLOBAL_NAMES) or (m["layer"] and part not in spec.layer_names):
        raise GGUFError(f"{path}: unsupported tensor {name!r} for architecture {arch!r}")
    if m["layer"] is None:
        return f"{_GLOBAL_NAMES[part]}.{m['kind']}"
    return f"model.layers.{int(m['layer'])}.{spec.layer_names[part]}.{m['kind']}"


def weight_tensors(reader: GGUFReader) -> list[ReaderTensor]:
    """The tensors that become weights (all but ``rope_freqs``, which goes to config.json)."""
    return [t for t in reader.tensors if t.name != ROPE_FREQS]


def _check_complete(reader: GGUFReader, arch: str, layers: int, path: Path) -> None:
    names = {t.name for t in reader.tensors}
    required = ["token_embd.weight", "output_norm.weight"] + [
        f"blk.{i}.{part}.weight" for i in range(layers) for part in ARCHS[arch].layer_names
    ]
    missing = [n for n in required if n not in names]
    if missing:
        raise GGUFError(f"{path}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")


def _check_types(reader: GGUFReader, path: Path) -> None:
    """Fail before converting anything if a tensor type cannot be dequantized by ``gguf.quants``."""
    seen: set[GGMLQuantizationType] = set()
    for t in reader.tensors:
        if t.tensor_type in seen or t.tensor_type in _STORED_AS_IS:
            continue
        seen.add(t.tensor_type)
        try:
            dequantize(np.asarray(t.data).reshape(-1, t.data.shape[-1])[:1], t.tensor_type)
        except NotImplementedError as e:
            raise GGUFError(f"{path}: tensor {t.name!r} has unsupported type {t.tensor_type.name}") from e


def gguf_tensor_to_torch(t: ReaderTensor) -> torch.Tensor:
    """One GGUF tensor in PyTorch layout: F32/F16/BF16 as stored, anything else dequantized to float32."""
    shape = hf_shape(t)
    dtype = _STORED_AS_IS.get(t.tensor_type)
    if dtype is torch.bfloat16:
        raw = np.array(t.data, copy=True).view(np.int16).reshape(shape)
        return torch.from_numpy(raw).view(torch.bfloat16)
    if dtype is not None:
        return torch.from_numpy(np.array(t.data, copy=True).reshape(shape))
    return torch.from_numpy(dequantize(t.data, t.tensor_type).reshape(shape))


def unpermute_rotary(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's row permutation of q/k projections (HF rotate-half layout)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def converted_tensors(
    reader: GGUFReader, arch: str, cfg: dict[str, Any], path: Path
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(hf_name, tensor)`` for every tensor of the file, with llama.cpp's storage conventions undone."""
    spec = ARCHS[arch]
    for t in weight_tensors(reader):
        name = hf_tensor_name(t.name, arch, path)
        w = gguf_tensor_to_torch(t)
        if spec.permute_qk and t.name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = cfg["num_attention_heads"] if "attn_q" in t.name else cfg["num_key_value_heads"]
            w = unpermute_rotary(w, heads)
        if spec.norm_offset and t.name.endswith("norm.weight"):
            w = w - spec.norm_offset
        yield name, w.contiguous()


def _plan_shards(reader: GGUFReader) -> list[list[ReaderTensor]]:
    """Group tensors into shards of at most SHARD_BYTES (converted size), in file order."""
    shards: list[list[ReaderTensor]] = [[]]
    size = 0
    for t in weight_tensors(reader):
        dtype = _STORED_AS_IS.get(t.tensor_type, torch.float32)
        n = int(t.n_elements) * dtype.itemsize
        if shards[-1] and size + n > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += n
    return shards


def _write_weights(reader: GGUFReader, arch: str, cfg: dict[str, Any], path: Path, out_dir: Path) -> None:
    shards = _plan_shards(reader)
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map: dict[str, str] = {}
    total = 0
    tensors = converted_tensors(reader, arch, cfg, path)
    for shard, fname in zip(shards, names):
        part = dict(next(tensors) for _ in shard)
        save_file(part, str(out_dir / fname), metadata={"format": "pt"})
        weight_map |= {k: fname for k in part}
        total += sum(v.numel() * v.element_size() for v in part.values())
        del part
    if len(names) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def convert_gguf(path: Path, out_dir: Path) -> None:
    """Write the HF directory for GGUF file ``path`` into the existing, empty ``out_dir``.

    Raises :class:`GGUFError` (a ValueError) naming the file for anything unreadable or unsupported.
    """
    reader = open_gguf(path)
    arch = field_value(reader, "general.architecture")
    if arch not in ARCHS:
        raise GGUFError(f"{path}: unsupported GGUF architecture {arch!r} (supported: {', '.join(ARCHS)})")
    tok_meta = write_tokenizer(reader, arch, path, out_dir)
    cfg = hf_config(reader, arch, path, tok_meta)
    for t in weight_tensors(reader):
        hf_tensor_name(t.name, arch, path)  # reject unknown tensors before the slow part
    _check_complete(reader, arch, cfg["num_hidden_layers"], path)
    _check_types(reader, path)
    _write_weights(reader, arch, cfg, path, out_dir)
    gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if cfg[k] is not None}
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2))
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
