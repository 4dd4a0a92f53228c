"""Golden tests: the engine against Hugging Face transformers on the same weights (fp32).

Greedy tokens must be identical and logprobs within 2e-4, also when chunked prefill, preemption
and prefix-cache hits all happen (small token budget, few KV blocks, shared prefixes)."""

from __future__ import annotations

import random

import pytest
import torch

from loom.bench.loader import SONNET_FILE
from loom.engine import LLM
from loom.sampling import SamplingParams

LOGPROB_ATOL = 2e-4
ARCHS = ["llama", "qwen2", "gemma3"]
BACKENDS = ["cpu", "torch"]  # the attention backends this machine runs (cuda: see test_golden_cuda.py)


def hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


def hf_prompt_logprobs(model, prompt: list[int]) -> torch.Tensor:
    """logprob of token i+1 given tokens 0..i, for every i."""
    with torch.inference_mode():
        logits = model(torch.tensor([prompt])).logits[0].float()
    lp = torch.log_softmax(logits, dim=-1)
    return lp[:-1].gather(1, torch.tensor(prompt[1:])[:, None]).squeeze(1)


def assert_matches_hf(llm: LLM, ref, prompts: list[list[int]], n_out: int, atol: float) -> None:
    """Greedy tokens identical to transformers, prompt logprobs within ``atol``."""
    outs = llm.generate(prompts, SamplingParams(max_tokens=n_out, temperature=0, ignore_eos=True, prompt_logprobs=0),
                        use_tqdm=False)
    for p, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(ref, p, n_out)
        got = torch.tensor([lp.logprob for lp in out.prompt_logprobs[1:]])
        assert torch.allclose(got, hf_prompt_logprobs(ref, p), atol=atol)


def mixed_prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(100, vocab) for _ in range(40)]
    lengths = [3, 17, 60, 130, 9, 45]
    prompts = [[rng.randrange(100, vocab) for _ in range(n)] for n in lengths]
    prompts += [shared + [rng.randrange(100, vocab) for _ in range(k)] for k in (5, 23, 1)]  # prefix hits
    return prompts


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_transformers_under_chunking_preemption_and_prefix_hits(tiny_model, arch, backend):
    path = tiny_model(arch)
    ref = hf_model(path)
    prompts = mixed_prompts(ref.config.vocab_size)
    n_out = 12
    expected = [hf_greedy(ref, p, n_out) for p in prompts]
    llm = LLM(str(path), dtype="float32", block_size=4, num_blocks=56, max_num_batched_tokens=24, max_num_seqs=8,
              attention_backend=backend)
    params = SamplingParams(temperature=0, max_tokens=n_out, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    got = [o.outputs[0].token_ids for o in outs]
    stats = llm.stats()
    assert got == expected
    assert stats.num_preemptions > 0, "the test must exercise preemption"
    assert stats.prefix_cache_hit_tokens > 0, "the test must exercise prefix caching"
    assert stats.num_free_blocks == stats.num_blocks


SPECULATION = [dict(speculative="ngram", speculative_k="4"), dict(speculative="lookahead", speculative_k="6"),
               dict(speculative="draft", speculative_k="3")]


@pytest.mark.parametrize("spec", SPECULATION, ids=lambda o: o["speculative"])
@pytest.mark.parametrize("arch", ARCHS)
def test_speculative_greedy_matches_transformers(tiny_model, arch, spec):
    """Every speculative method keeps the greedy tokens, also under chunking, preemption and
    prefix hits (the draft model is the tiny qwen2, or llama for qwen2: same tokenizer)."""
    path = tiny_model(arch)
    ref = hf_model(path)
    prompts = [(p[:10] * 4)[: len(p) + 20] for p in mixed_prompts(ref.config.vocab_size)]  # repeats: matches to find
    n_out = 16
    expected = [hf_greedy(ref, p, n_out) for p in prompts]
    opts = dict(spec)
    if spec["speculative"] == "draft":
        opts["speculative_model"] = str(tiny_model("llama" if arch == "qwen2" else "qwen2"))
    llm = LLM(str(path), dtype="float32", block_size=4, num_blocks=64, max_num_batched_tokens=32, max_num_seqs=8,
              **opts)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, SamplingParams(temperature=0, max_tokens=n_out,
                                                                                 ignore_eos=True), use_tqdm=False)]
    stats = llm.stats()
    assert got == expected
    assert stats.spec.draft_tokens > 0 and stats.num_free_blocks == stats.num_blocks


@pytest.mark.parametrize("arch", ARCHS)
def test_prompt_logprobs_match_transformers_with_small_chunks(tiny_model, arch):
    path = tiny_model(arch)
    ref = hf_model(path)
    prompts = mixed_prompts(ref.config.vocab_size, seed=1)[:4]
    llm = LLM(str(path), dtype="float32", block_size=4, max_num_batched_tokens=7)
    outs = llm.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0), use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        expected = hf_prompt_logprobs(ref, prompt)
        assert out.prompt_logprobs[0] is None
        got = torch.tensor([lp.logprob for lp in out.prompt_logprobs[1:]])
        assert torch.allclose(got, expected, atol=LOGPROB_ATOL), (got - expected).abs().max()


@pytest.mark.parametrize("arch", ARCHS)
def test_sampled_logprobs_match_transformers(tiny_model, arch):
    path = tiny_model(arch)
    ref = hf_model(path)
    prompt = mixed_prompts(ref.config.vocab_size, seed=2)[2]
    llm = LLM(str(path), dtype="float32")
    (out,) = llm.generate([prompt], SamplingParams(max_tokens=6, temperature=0, logprobs=3, ignore_eos=True), use_tqdm=False)
    tokens = out.outputs[0].token_ids
    full = prompt + tokens
    with torch.inference_mode():
        lp = torch.log_softmax(ref(torch.tensor([full])).logits[0].float(), -1)
    for i, tlp in enumerate(out.outputs[0].logprobs):
        row = lp[len(prompt) - 1 + i]
        assert tlp.token_id == tokens[i]
        assert abs(tlp.logprob - row[tokens[i]].item()) < LOGPROB_ATOL
        assert tlp.rank == 1
        top_ids = [t for t, _ in tlp.top]
        assert top_ids == row.topk(3).indices.tolist()


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_model_matches_transformers(backend):
    from loom.model.files import resolve_model

    path = resolve_model(None)
    ref = hf_model(path)
    llm = LLM(None, dtype="float32", quantization="none", max_num_batched_tokens=32, attention_backend=backend)
    tok = llm.tokenizer
    texts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land far away, there lived"]
    assert_matches_hf(llm, ref, [tok.encode(t) for t in texts], n_out=16, atol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gemma3", "qwen2"])
def test_real_models_match_transformers(real_gguf, name):
    """Real Gemma-3-270m (sliding windows: a prompt longer than its 512-token window) and
    Qwen2.5-Coder-0.5B, both Q4_K_M, against transformers on the same converted weights."""
    from loom.model.files import resolve_model

    path = resolve_model(real_gguf(name))
    ref = hf_model(path)
    llm = LLM(str(path), dtype="float32", max_num_batched_tokens=256)
    ids = llm.tokenizer.encode(SONNET_FILE.read_text())
    assert_matches_hf(llm, ref, [ids[:700], ids[100:140]], n_out=8, atol=2e-3)


def test_llama3_rope_scaling_matches_transformers(tiny_model):
    """Llama 3.1 rope scaling (``rope_type: llama3``, original context 64 of 2048): greedy tokens and
    logprobs match transformers over prompts reaching position ~700, and they would not without
    the scaling (the same weights with plain rope give other logprobs)."""
    from transformers import LlamaForCausalLM

    path = tiny_model("llama-rope-llama3")
    ref = hf_model(path)
    rng = random.Random(3)
    vocab = ref.config.vocab_size
    prompts = [[rng.randrange(100, vocab) for _ in range(n)] for n in (700, 260, 90)]
    llm = LLM(str(path), dtype="float32", block_size=16, max_num_batched_tokens=128)
    assert_matches_hf(llm, ref, prompts, n_out=8, atol=LOGPROB_ATOL)

    plain_config = ref.config.to_dict() | {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
    plain = LlamaForCausalLM(type(ref.config).from_dict(plain_config)).eval()
    plain.load_state_dict(ref.state_dict())
    diff = (hf_prompt_logprobs(plain, prompts[1]) - hf_prompt_logprobs(ref, prompts[1])).abs().max()
    assert diff > 100 * LOGPROB_ATOL, "the scaling must matter in this test"
