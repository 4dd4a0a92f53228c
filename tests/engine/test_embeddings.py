"""Embedding requests: prefill only, the final-norm hidden states mean-pooled over the prompt and
L2-normalised, the same whatever the chunking, the prefix cache or the other requests in the batch."""

from __future__ import annotations

import pytest
import torch

from loom.engine import LLM
from loom.sampling import SamplingParams

TEXTS = ["The quick brown fox jumps over the lazy dog. " * 3, "Hello"]


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return tiny_model("llama")


@pytest.fixture(scope="module")
def reference(model_dir):
    """Embeddings computed directly with the transformers model."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def embed(ids: list[int]) -> list[float]:
        with torch.no_grad():
            hidden = model.model(torch.tensor([ids])).last_hidden_state[0]  # after the final norm
        return torch.nn.functional.normalize(hidden.mean(dim=0), dim=0).tolist()

    return embed


def test_embedding_is_the_normalised_mean_of_the_final_hidden_states(model_dir, reference):
    # Chunks of 8 tokens: the first prompt (~30 tokens) is pooled over several steps.
    llm = LLM(str(model_dir), dtype="float32", max_num_batched_tokens=8, block_size=4)
    ids = [llm.tokenizer.encode(t) for t in TEXTS]
    assert len(ids[0]) > 16
    embeddings = llm.embed(TEXTS, use_tqdm=False)
    assert len(embeddings) == 2 and all(len(e) == llm.model_info().hidden_size for e in embeddings)
    for e, prompt in zip(embeddings, ids):
        assert e == pytest.approx(reference(prompt), abs=1e-4)
        assert sum(x * x for x in e) == pytest.approx(1.0)
    assert llm.embed(ids[1], use_tqdm=False)[0] == pytest.approx(embeddings[1], abs=1e-6)  # token ids, one prompt


def test_prefix_cache_and_generation_alongside_do_not_change_it(model_dir, reference):
    llm = LLM(str(model_dir), dtype="float32", block_size=4)
    prompt = llm.tokenizer.encode(TEXTS[0])
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    alone = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
    # The prompt's blocks are in the prefix cache now; an embedding still computes every position.
    eng = llm.engine
    eng.add_request("gen", prompt, params)
    eng.add_embedding_request("emb", prompt)
    finals = {}
    while eng.has_unfinished_requests():
        finals.update({o.request_id: o for o in eng.step() if o.finished})
    assert finals["emb"].embedding == pytest.approx(reference(prompt), abs=1e-4)
    assert finals["emb"].outputs == [] and finals["emb"].num_generated_tokens == 0
    assert finals["gen"].outputs[0].token_ids == alone
    assert eng.kv.num_free_blocks == eng.kv.num_blocks  # nothing held once finished


def test_a_prompt_longer_than_the_context_is_rejected(model_dir):
    llm = LLM(str(model_dir), dtype="float32", max_model_len=16)
    with pytest.raises(ValueError, match="max_model_len"):
        llm.embed(["short", "word " * 40], use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()  # the valid one was withdrawn too
