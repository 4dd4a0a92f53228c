"""GGUF -> HF directory conversion: tiny models round-trip through every quantizable GGUF type."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFWriter
from gguf.quants import dequantize

from loom.model.arch import load_model_config
from loom.model.files import resolve_model
from loom.model.gguf_convert import gguf_tensor_to_torch
from loom.model.weights import iter_weights
from tests.tiny_models import gguf_tensor, write_gguf_from_hf

ARCHS = ["llama", "qwen2", "gemma3_text"]
# Worst element error allowed, relative to the tensor's largest magnitude, per stored type.
REL_ERROR = {Q.F32: 1e-6, Q.F16: 1e-3, Q.BF16: 1e-2, Q.Q8_0: 1e-2, Q.Q4_1: 0.1, Q.Q4_0: 0.15}


@pytest.fixture(scope="module")
def converted(tiny_model, tmp_path_factory: pytest.TempPathFactory):
    """``converted(arch, qtype)``: the tiny ``arch`` model written as a ``qtype`` GGUF, then resolved."""
    cache = tmp_path_factory.mktemp("cache")
    done: dict[tuple[str, Q], Path] = {}

    def get(arch: str, qtype: Q = Q.F32) -> Path:
        if (arch, qtype) not in done:
            gguf_path = tmp_path_factory.mktemp("gguf") / f"{arch}-{qtype.name}.gguf"
            done[arch, qtype] = resolve_model(write_gguf_from_hf(tiny_model(arch), gguf_path, qtype), cache_dir=cache)
        return done[arch, qtype]

    return get


def transformers_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def expected_after_round_trip(name: str, w: torch.Tensor, arch: str, qtype: Q) -> torch.Tensor:
    """What the converter must return for original weight ``w``: the value llama.cpp's encoding stores,
    decoded by gguf.quants (q/k permutation is per row, so it commutes with row-wise quantization)."""
    data = w.float().numpy()
    shift = arch == "gemma3_text" and name.endswith("norm.weight")
    encoded, used = gguf_tensor(data + 1.0 if shift else data, qtype)
    if used == Q.F16:
        return torch.from_numpy(encoded)
    if used == Q.BF16:
        return torch.from_numpy(dequantize(encoded, used)).to(torch.bfloat16)
    decoded = torch.from_numpy(dequantize(encoded, used).reshape(data.shape))
    return decoded - 1.0 if shift else decoded


# Every encodable type on llama (whose q/k rows are permuted); the others take one of each storage kind.
ROUND_TRIPS = [("llama", q) for q in (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1)] + [
    (arch, q) for arch in ("qwen2", "gemma3_text") for q in (Q.F32, Q.F16, Q.Q8_0)
]


@pytest.mark.parametrize(("arch", "qtype"), ROUND_TRIPS, ids=[f"{a}-{q.name}" for a, q in ROUND_TRIPS])
def test_round_trip_weights(arch: str, qtype: Q, tiny_model, converted) -> None:
    original = dict(iter_weights(tiny_model(arch)))
    result = dict(iter_weights(converted(arch, qtype)))
    assert result.keys() == original.keys()
    for name, w in original.items():
        got = result[name]
        assert got.shape == w.shape, name
        expected = expected_after_round_trip(name, w, arch, qtype)
        assert got.dtype == expected.dtype, name
        assert torch.equal(got, expected), name
        err = (got.float() - w).abs().max() / w.abs().max()
        assert err <= REL_ERROR[qtype], (name, float(err))


@pytest.mark.parametrize("arch", ARCHS)
def test_converted_config_matches_original(arch: str, tiny_model, converted) -> None:
    """Both loom.config and transformers read the converted config.json as the original model's."""
    import transformers
    hf_dir, out = tiny_model(arch), converted(arch)
    ref = transformers.AutoConfig.from_pretrained(hf_dir)
    ours = transformers.AutoConfig.from_pretrained(out)
    for key in (
        "model_type",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "vocab_size",
        "max_position_embeddings",
        "tie_word_embeddings",
        "rope_parameters",
        "bos_token_id",
        "pad_token_id",
    ):
        assert getattr(ours, key) == getattr(ref, key), key
    assert ours.rms_norm_eps == pytest.approx(ref.rms_norm_eps)
    if arch == "gemma3_text":
        for key in ("layer_types", "sliding_window", "query_pre_attn_scalar", "hidden_activation"):
            assert getattr(ours, key) == getattr(ref, key), key

    cfg = load_model_config(out)
    rope = ref.rope_parameters.get("full_attention", ref.rope_parameters)
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (
        ref.hidden_size,
        ref.num_hidden_layers,
        ref.num_attention_heads,
        ref.num_key_value_heads,
        ref.head_dim,
    )
    assert (cfg.vocab_size, cfg.intermediate_size, cfg.tie_word_embeddings) == (
        ref.vocab_size,
        ref.intermediate_size,
        ref.tie_word_embeddings,
    )
    assert cfg.rope_theta == rope["rope_theta"]
    assert cfg.eos_token_ids[0] == ref.eos_token_id
    if arch == "gemma3_text":
        assert cfg.layer_is_sliding == tuple(t == "sliding_attention" for t in ref.layer_types)
        assert cfg.rope_local_theta == ref.rope_parameters["sliding_attention"]["rope_theta"]
        assert (cfg.sliding_window, cfg.query_pre_attn_scalar) == (ref.sliding_window, ref.query_pre_attn_scalar)


@pytest.mark.parametrize("arch", ARCHS)
def test_transformers_runs_converted_model(arch: str, tiny_model, converted) -> None:
    """transformers loads the converted F32 directory and computes the original model's logits,
    over a prompt longer than gemma3's sliding window."""
    hf_dir, out = tiny_model(arch), converted(arch)
    ids = torch.randint(0, 1000, (1, 40), generator=torch.Generator().manual_seed(0))
    logits = [transformers_logits(path, ids) for path in (hf_dir, out)]
    # gemma3 norms come back as (w + 1) - 1 in float32, a rounding away from w.
    torch.testing.assert_close(logits[1], logits[0], atol=1e-4, rtol=1e-4)


def test_tokenizer_files_are_written(converted) -> None:
    out = converted("llama")
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert (tok_cfg["bos_token"], tok_cfg["eos_token"], tok_cfg["add_bos_token"]) == (
        "<|im_start|>",
        "<|im_end|>",
        False,
    )
    assert "<|im_start|>" in tok_cfg["chat_template"]
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [2, 0]  # <|im_end|>, plus <|endoftext|> as llama.cpp also stops there


def _k_quant_block(qtype: Q, d: float, level: int) -> bytes:
    """One 256-value super-block of ``qtype`` whose every value is known: all sub-block scales 1, all
    mins 0, all quants ``level``. Layouts from ggml-common.h (block_q4_K / block_q5_K / block_q6_K)."""
    half = np.float16(d).tobytes()
    scales_k = bytes([1] * 4 + [0] * 4 + [1] * 4)  # 6-bit scale/min pairs: scale 1, min 0 for all 8
    if qtype == Q.Q4_K:  # d, dmin, scales[12], qs[128] (4-bit)
        return half + np.float16(0).tobytes() + scales_k + bytes([level | level << 4] * 128)
    if qtype == Q.Q5_K:  # d, dmin, scales[12], qh[32] (5th bits), qs[128]
        high = 0xFF if level & 16 else 0
        low = level & 15
        return half + np.float16(0).tobytes() + scales_k + bytes([high] * 32) + bytes([low | low << 4] * 128)
    # Q6_K: ql[128] (low 4 bits), qh[64] (high 2 bits), scales[16] (int8), d; value = d * scale * (q - 32)
    low, high = level & 15, level >> 4
    return bytes([low | low << 4] * 128) + bytes([high * 0b01010101] * 64) + bytes([1] * 16) + half


@pytest.mark.parametrize(("qtype", "offset"), [(Q.Q4_K, 0), (Q.Q5_K, 0), (Q.Q6_K, -32)])
def test_k_quant_tensors_decode_to_known_values(qtype: Q, offset: int, tmp_path: Path) -> None:
    """K-quants (which gguf cannot encode) decode to hand-computed values, in the right row/column order:
    row r, super-block b holds level r + 3b with scale d = b + 1."""
    rows, blocks = 3, 2
    raw = np.frombuffer(
        b"".join(_k_quant_block(qtype, b + 1.0, r + 3 * b) for r in range(rows) for b in range(blocks)), np.uint8
    ).reshape(rows, -1)
    path = tmp_path / "k.gguf"
    writer = GGUFWriter(path, "llama")
    writer.add_tensor("t", raw, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    got = gguf_tensor_to_torch(GGUFReader(path).tensors[0])
    expected = torch.tensor(
        [[(b + 1.0) * (r + 3 * b + offset) for b in range(blocks) for _ in range(256)] for r in range(rows)]
    )
    assert got.dtype == torch.float32
    assert torch.equal(got, expected)


def test_rope_freqs_become_the_same_llama3_rotary(tiny_model, converted) -> None:
    """A GGUF with llama.cpp's ``rope_freqs`` (Llama 3.1 scaling) converts to a directory whose rotary
    frequencies equal the original llama3 model's, in loom and in transformers alike, and loom
    generates the same tokens from it as from the original directory."""
    from loom.engine import LLM
    from loom.model.rope import RotaryEmbedding
    from loom.sampling import SamplingParams
    from tests.tiny_models import llamacpp_rope_freqs

    hf_dir, out = tiny_model("llama-rope-llama3"), converted("llama-rope-llama3")
    assert "rope_freqs.weight" not in dict(iter_weights(out))
    ref_cfg, cfg = load_model_config(hf_dir), load_model_config(out)
    factors = llamacpp_rope_freqs(json.loads((hf_dir / "config.json").read_text()))
    assert cfg.rope_scaling.rope_type == "longrope" and cfg.rope_scaling.freq_factors == tuple(factors.tolist())
    ref_rot = RotaryEmbedding(ref_cfg.head_dim, ref_cfg.max_position, ref_cfg.rope_theta, ref_cfg.rope_scaling)
    rot = RotaryEmbedding(cfg.head_dim, cfg.max_position, cfg.rope_theta, cfg.rope_scaling)
    assert not torch.allclose(rot.inv_freq, RotaryEmbedding(cfg.head_dim, 1, cfg.rope_theta).inv_freq)
    torch.testing.assert_close(rot.inv_freq, ref_rot.inv_freq, rtol=1e-6, atol=0)
    # A float32 rounding apart in frequency: at position ~2000 that is ~1e-5 radians.
    torch.testing.assert_close(rot.cos, ref_rot.cos, rtol=0, atol=1e-4)
    torch.testing.assert_close(rot.sin, ref_rot.sin, rtol=0, atol=1e-4)

    ids = torch.randint(100, 1000, (1, 300), generator=torch.Generator().manual_seed(0))
    logits = [transformers_logits(path, ids) for path in (hf_dir, out)]
    torch.testing.assert_close(logits[1], logits[0], atol=1e-4, rtol=1e-4)

    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, prompt_logprobs=0)
    results = []
    for path in (hf_dir, out):
        (o,) = LLM(str(path), dtype="float32").generate([ids[0].tolist()], params, use_tqdm=False)
        results.append((o.outputs[0].token_ids, torch.tensor([lp.logprob for lp in o.prompt_logprobs[1:]])))
    assert results[1][0] == results[0][0]
    torch.testing.assert_close(results[1][1], results[0][1], atol=1e-4, rtol=0)


def test_bad_rope_freqs_are_rejected(tiny_model, tmp_path: Path) -> None:
    from loom.model.gguf_meta import GGUFError

    gguf_path = write_gguf_from_hf(tiny_model("llama-rope-llama3"), tmp_path / "m.gguf")
    reader = GGUFReader(gguf_path, "r+")
    freqs = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
    freqs.data[:] = -1.0  # the reader maps the file: this patches the factors in place
    reader.data.flush()
    del reader, freqs
    with pytest.raises(GGUFError, match="rope_freqs.weight must hold 8 positive factors"):
        resolve_model(gguf_path, cache_dir=tmp_path / "cache")
