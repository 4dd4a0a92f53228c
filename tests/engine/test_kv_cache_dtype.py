"""The engine over a quantized KV cache (``kv_cache_dtype`` int8, and KIVI's int4 and int2 with their
residual): greedy output invariant to batching, chunking, prefix caching and preemption, the same
through the native kernel as through the torch reference path over the same format, ``n > 1`` forks
copying scales (and residual slots) with the codes, and the default model's logprobs close to those
of the plain cache."""

from __future__ import annotations

import json

import pytest

from loom.engine import LLM, Engine, engine_config
from loom.sampling import SamplingParams
from tests.engine.test_engine import GREEDY, ReplayProposer, prompts


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return str(tiny_model("llama"))


def greedy(model_dir, ps, params=GREEDY, kv_cache_dtype="int8", **opts):
    llm = LLM(model_dir, dtype="float32", kv_cache_dtype=kv_cache_dtype, **opts)
    outs = llm.generate(ps, params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], llm.stats()


def test_int8_greedy_output_is_invariant_to_batching_chunking_prefix_caching_and_preemption(model_dir):
    ps = prompts(24)
    batched, stats = greedy(model_dir, ps, max_num_seqs=24, max_num_batched_tokens=512)
    assert stats.prefix_cache_hit_tokens > 0
    no_cache, _ = greedy(model_dir, ps, max_num_seqs=24, max_num_batched_tokens=512, enable_prefix_caching=False)
    squeezed, stats = greedy(model_dir, ps, max_num_seqs=8, max_num_batched_tokens=16, block_size=4, num_blocks=60)
    assert stats.num_preemptions > 0, "the test must exercise preemption"
    reference, _ = greedy(model_dir, ps, max_num_seqs=24, attention_backend="torch")
    assert batched == no_cache == squeezed == reference


@pytest.mark.parametrize("fmt", ["int4", "int2"])
def test_kivi_greedy_output_is_invariant_to_batching_chunking_prefix_caching_and_preemption(model_dir, fmt):
    """A KIVI cache quantizes a sequence's groups of ``kv_residual_tokens`` positions when they are
    complete, whichever step completes them: output must not depend on the step boundaries
    (16-token chunks), on prefix-cache hits (whole groups only) or on preemption, and the native
    kernel must agree with the torch reference path."""
    long_shared = prompts(1, seed=5)[0] * 3  # whole groups of 32 shared by every other prompt
    ps = [long_shared + p if i % 2 else p for i, p in enumerate(prompts(24))]
    opts = dict(kv_cache_dtype=fmt, block_size=16, kv_residual_tokens=32)
    batched, stats = greedy(model_dir, ps, max_num_seqs=24, max_num_batched_tokens=512, **opts)
    assert stats.prefix_cache_hit_tokens > 0
    no_cache, _ = greedy(model_dir, ps, max_num_seqs=24, enable_prefix_caching=False, **opts)
    squeezed, stats = greedy(model_dir, ps, max_num_seqs=8, max_num_batched_tokens=16, num_blocks=16, **opts)
    assert stats.num_preemptions > 0, "the test must exercise preemption"
    reference, _ = greedy(model_dir, ps, max_num_seqs=24, attention_backend="torch", **opts)
    assert batched == no_cache == squeezed == reference


def test_kivi_n_samples_fork_with_their_residual(model_dir):
    """Forks share the prompt's complete groups and copy the open group's residual slot."""
    prompt = prompts(1, seed=3)[0] + [5, 6, 7]
    assert len(prompt) % 32
    opts = dict(block_size=16, kv_residual_tokens=32)
    (single,), _ = greedy(model_dir, [prompt], kv_cache_dtype="int4", **opts)
    llm = LLM(model_dir, dtype="float32", kv_cache_dtype="int4", **opts)
    out = llm.generate([prompt], SamplingParams(n=3, temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)[0]
    assert [c.token_ids for c in out.outputs] == [single] * 3


def test_int8_n_samples_fork_with_their_scales(model_dir):
    """Greedy forks share the prompt's full blocks and copy its last partial one (copy-on-write):
    every sample must equal the single greedy output, which it cannot if a copy loses its scales."""
    prompt = prompts(1, seed=3)[0] + [5, 6, 7]
    assert len(prompt) % 4
    (single,), _ = greedy(model_dir, [prompt], block_size=4)
    llm = LLM(model_dir, dtype="float32", kv_cache_dtype="int8", block_size=4)
    out = llm.generate([prompt], SamplingParams(n=3, temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)[0]
    assert [c.token_ids for c in out.outputs] == [single] * 3


def test_int8_cache_holds_about_twice_the_tokens_of_bf16_in_the_same_memory(model_dir):
    budget = 1 << 20
    plain = LLM(model_dir, dtype="bfloat16", kv_cache_bytes=budget).stats().kv_cache_tokens
    int8 = LLM(model_dir, dtype="bfloat16", kv_cache_bytes=budget, kv_cache_dtype="int8").stats().kv_cache_tokens
    # head_dim 16: a key and a value take 16 codes and one scale each, 36 bytes against 64 in bf16.
    assert int8 / plain == pytest.approx(64 / 36, rel=0.02)


def test_unknown_kv_cache_dtype_is_rejected(model_dir):
    with pytest.raises(ValueError, match=r"kv_cache_dtype \(--kv-cache-dtype\) must be one of auto, bf16, fp32, int8"):
        LLM(model_dir, kv_cache_dtype="int3")


@pytest.mark.parametrize("opts,bound", [(dict(kv_cache_dtype="int8"), 0.05),
                                        (dict(kv_cache_dtype="int4", kv_residual_tokens=16), 0.15)])
def test_default_model_logprobs_with_a_quantized_cache_track_the_plain_cache(opts, bound):
    """On the default model (head_dim 64: the AVX-512 int8 kernel inside the fused decode stack, or
    the KIVI kernel, where the CPU has them), the logprobs of the tokens generated over a quantized
    cache stay close to what the plain cache gives the same tokens."""
    texts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land far away, there lived"]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=0)
    quantized = LLM(None, **opts)
    tok = quantized.tokenizer
    prompts_ = [tok.encode(t) for t in texts]
    outs = quantized.generate(prompts_, params, use_tqdm=False)
    plain = LLM(None)
    scored = plain.generate([p + o.outputs[0].token_ids for p, o in zip(prompts_, outs)],
                            SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    diffs = []
    for p, o, s in zip(prompts_, outs, scored):
        got = [lp.logprob for lp in o.outputs[0].logprobs]
        ref = [lp.logprob for lp in s.prompt_logprobs[len(p):]]
        diffs += [abs(a - b) for a, b in zip(got, ref)]
    assert len(diffs) == 3 * 24
    assert sum(diffs) / len(diffs) < bound, sum(diffs) / len(diffs)


def test_per_layer_plan_output_is_invariant_to_chunking_preemption_and_backend(model_dir, tmp_path):
    """A mixed cache (a format per layer, ``--kv-cache-layers``) over the same block ids and residual
    slots: every layer's format behaves as it does alone."""
    n = LLM(model_dir).engine.model_config.num_layers
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"kv_cache_layers": (["int2", "auto", "int8", "int4"] * n)[:n]}))
    ps = prompts(12)
    opts = dict(kv_cache_dtype="auto", kv_cache_layers=str(plan), block_size=16, kv_residual_tokens=32)
    batched, _ = greedy(model_dir, ps, max_num_seqs=12, **opts)
    squeezed, stats = greedy(model_dir, ps, max_num_seqs=6, max_num_batched_tokens=16, num_blocks=10, **opts)
    assert stats.num_preemptions > 0
    reference, _ = greedy(model_dir, ps, attention_backend="torch", **opts)
    assert batched == squeezed == reference
    mixed = LLM(model_dir, dtype="bfloat16", kv_cache_bytes=1 << 20, kv_cache_layers=str(plan), kv_residual_tokens=16,
                max_num_seqs=4).stats()
    assert mixed.kv_cache_tokens > LLM(model_dir, dtype="bfloat16", kv_cache_bytes=1 << 20).stats().kv_cache_tokens


def test_kivi_drafts_never_complete_a_group_and_keep_greedy_output(model_dir):
    """Draft tokens are written before they are verified; a group they completed would be quantized
    and could not be rolled back, so the scheduler cuts drafts at the group boundary. Output with
    drafts equals output without."""
    ps = prompts(6, seed=3)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    opts = dict(dtype="float32", kv_cache_dtype="int4", block_size=16, kv_residual_tokens=16)
    plain = LLM(model_dir, **opts).generate(ps, params, use_tqdm=False)
    expected = {tuple(p): o.outputs[0].token_ids for p, o in zip(ps, plain)}
    proposer = ReplayProposer(expected)
    engine = Engine(engine_config(model_dir, **opts, speculative_k="7"), proposer=proposer)
    for i, p in enumerate(ps):
        engine.add_request(str(i), p, params)
    finals = {}
    while engine.has_unfinished_requests():
        finals.update({o.request_id: o for o in engine.step() if o.finished})
    assert [finals[str(i)].outputs[0].token_ids for i in range(len(ps))] == [o.outputs[0].token_ids for o in plain]
    assert proposer.proposed > 0 and engine.stats().steps < 40
    assert engine.kv.num_free_blocks == engine.kv.num_blocks and len(engine.kv.free_slots) == engine.worker.kv.num_slots
