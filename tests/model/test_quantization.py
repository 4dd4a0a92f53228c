"""``quantization``: GGUF matrices kept packed (``auto``), checkpoints quantized at load (a format
name), everything dense (``none``); the packed model computes what the dense model computes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loom.engine import LLM
from loom.model.arch import load_model_config
from loom.model.files import resolve_model
from loom.model.layers import Embedding, Linear
from loom.model.quant.formats import FORMATS
from loom.model.quant.packed import PackedWeight
from loom.model.worker import load_model
from loom.model.weights import iter_weights
from loom.sampling import SamplingParams
from tests.tiny_models import write_gguf_from_hf

PROMPTS = [[5, 900, 77, 1203, 42, 8, 311], [17, 2000, 3, 3, 640], list(range(100, 160))]


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model, tmp_path_factory) -> callable:
    made: dict[str, Path] = {}

    def get(qtype: str) -> Path:
        if qtype not in made:
            made[qtype] = write_gguf_from_hf(tiny_model("llama"), tmp_path_factory.mktemp("q") / f"{qtype}.gguf", qtype)
        return made[qtype]

    return get


def prompt_logprobs(llm: LLM) -> torch.Tensor:
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0), use_tqdm=False)
    return torch.tensor([lp.logprob for o in outs for lp in o.prompt_logprobs[1:]])


def packed_layers(llm: LLM) -> list[torch.nn.Module]:
    model = llm.engine.worker.model
    return [m for m in model.modules() if isinstance(m, (Linear, Embedding)) and m.weight is None]


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
def test_auto_keeps_gguf_matrices_packed_and_computes_the_dense_model(tiny_gguf, qtype, monkeypatch):
    path = str(tiny_gguf(qtype))
    dense = LLM(path, dtype="float32", quantization="none")
    packed = LLM(path, dtype="float32")  # auto
    n_matrices = 2 * 4 + 1  # qkv, o, gate_up, down per layer (2 layers) + the tied embedding
    assert len(packed_layers(packed)) == n_matrices and not packed_layers(dense)
    assert packed.engine.worker.weight_bytes < 0.5 * dense.engine.worker.weight_bytes
    ref = prompt_logprobs(dense)
    # The same weights, dequantized per call: what the dense model computes.
    monkeypatch.setattr("loom.model.quant.packed._native", lambda: None)
    torch.testing.assert_close(prompt_logprobs(packed), ref, atol=1e-4, rtol=0)
    monkeypatch.undo()
    # The native kernel quantizes activations to int8: close, not identical.
    assert float((prompt_logprobs(packed) - ref).abs().mean()) < 0.05


@pytest.mark.parametrize("name", ["q8_0", "int8", "q6_k", "q5_k", "int4", "int4_sym", "q4_0"])
def test_quantization_at_load_tracks_the_dense_model(tiny_model, name):
    path = str(tiny_model("qwen2"))  # safetensors with q/k/v biases
    dense = prompt_logprobs(LLM(path, dtype="float32"))
    llm = LLM(path, dtype="float32", quantization=name)
    assert packed_layers(llm)
    err = float((prompt_logprobs(llm) - dense).abs().mean())
    assert err < {8: 0.03, 6: 0.08, 5: 0.15, 4: 0.3}[FORMATS[name].bits], err  # a broken kernel errs by > 1


def test_a_gguf_tensor_in_another_format_is_requantized(tiny_gguf):
    llm = LLM(str(tiny_gguf("Q8_0")), dtype="float32", quantization="q4_1")
    formats = {p.fmt.name for m in packed_layers(llm) for p in (m.packed if isinstance(m.packed, list) else [m.packed])}
    assert formats == {"q4_1"}


def test_fused_projection_may_mix_formats(tiny_model):
    """Q4_K_M files store attn_v in Q6_K next to Q4_K q/k: the fused qkv keeps both, as row segments."""
    path = tiny_model("llama")
    cfg = load_model_config(path)
    mixed = {"self_attn.q_proj": "q4_k", "self_attn.k_proj": "q4_k", "self_attn.v_proj": "q6_k"}

    def weights():
        for name, t in iter_weights(path):
            kind = next((k for k in mixed if f".{k}." in name), None)
            yield name, PackedWeight.quantize(t, FORMATS[mixed[kind]]) if kind else t

    model = load_model(cfg, path, torch.float32, torch.device("cpu"))
    model.load_weights(weights())
    qkv = model.layers[0].self_attn.qkv_proj
    assert [p.fmt.name for p in qkv.packed] == ["q4_k", "q6_k"]
    x = torch.randn(3, cfg.hidden_size)
    ref = x @ torch.cat([p.dequantize() for p in qkv.packed]).T
    assert float((qkv(x) - ref).abs().max() / ref.abs().max()) < 0.02


def test_unknown_quantization_is_rejected_before_loading():
    with pytest.raises(ValueError, match="quantization"):
        LLM("/nonexistent", quantization="q3_k")


def test_set_packed_checks_the_shape_and_packs_once():
    lin = Linear(64, 8)
    part = PackedWeight.quantize(torch.randn(4, 64), FORMATS["q8_0"])
    with pytest.raises(ValueError, match="does not replace"):
        lin.set_packed([part])
    lin.set_packed([part, part])
    assert lin.weight is None and len(lin.packed) == 1 and lin.packed[0].shape == (8, 64)
    with pytest.raises(ValueError, match="packed already"):
        lin.set_packed([part, part])
