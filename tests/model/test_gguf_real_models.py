"""Golden checks on real GGUF files (slow), against transformers' own GGUF support: the converted
directory holds exactly the tensors transformers' loader produces (its dequantization is independent
of gguf.quants), transformers computes the same logits from both, and the tokenizers agree.

The default model is always installed; the others come from `make setup-models` (see
shared/MODELS.md): they cover gemma3 and qwen2, K-quants (Q4_K, Q6_K) and Q5_0.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from loom.model.files import resolve_model
from loom.model.weights import iter_weights
from tests.model.tokenizer_texts import varied_texts

pytestmark = pytest.mark.slow



@pytest.mark.parametrize("name", ["smollm2", "gemma3", "qwen2"])
def test_real_gguf_matches_transformers(name: str, real_gguf, tmp_path: Path) -> None:
    import transformers
    gguf_path = real_gguf(name)
    out = resolve_model(gguf_path, cache_dir=tmp_path)

    ref = transformers.AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    ).eval()
    expected = ref.state_dict()
    got = dict(iter_weights(out))
    tied = ref.config.tie_word_embeddings
    assert got.keys() == expected.keys() - ({"lm_head.weight"} if tied else set())
    for key, tensor in got.items():
        assert torch.equal(tensor.float(), expected[key]), key
    del got, expected

    ours = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(10, 1000, (1, 600), generator=torch.Generator().manual_seed(0))  # > gemma's 512 window
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, atol=0, rtol=0)


@pytest.mark.parametrize("name", ["gemma3", "qwen2"])
def test_real_tokenizer_matches_transformers(name: str, real_gguf, tmp_path: Path) -> None:
    """(The default model's tokenizer is compared in test_gguf_tokenizer.py.)"""
    import transformers
    gguf_path = real_gguf(name)
    out = resolve_model(gguf_path, cache_dir=tmp_path)
    ours = Tokenizer.from_file(str(out / "tokenizer.json"))
    theirs = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).backend_tokenizer
    for text in varied_texts():
        for special in (False, True):
            assert (
                ours.encode(text, add_special_tokens=special).ids == theirs.encode(text, add_special_tokens=special).ids
            ), (text, special)
