"""Engine behaviour on a tiny random model: invariance of greedy outputs to batching, chunking and
prefix caching; n > 1 sharing prompt blocks; seeds; stop conditions; bad input."""

from __future__ import annotations

import random

import pytest

from loom.engine import LLM, Engine, engine_config
from loom.sampling import SamplingParams
from loom.spec import Draft, Proposer

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(100, 40000) for _ in range(24)]
    out = []
    for i in range(n):
        body = [rng.randrange(100, 40000) for _ in range(rng.choice([2, 7, 19, 33, 70]))]
        out.append(shared + body if i % 3 == 0 else body)
    return out


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return str(tiny_model("llama"))


def run(model_dir, ps, params=GREEDY, **opts):
    llm = LLM(model_dir, dtype="float32", **opts)
    outs = llm.generate(ps, params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], llm


def test_greedy_output_is_invariant_to_batching_chunking_and_prefix_caching(model_dir):
    ps = prompts(32)
    batched, llm = run(model_dir, ps, max_num_seqs=32, max_num_batched_tokens=512)
    assert llm.engine.stats().prefix_cache_hit_tokens > 0
    no_cache, llm = run(model_dir, ps, max_num_seqs=32, max_num_batched_tokens=512, enable_prefix_caching=False)
    assert llm.engine.stats().prefix_cache_hit_tokens == 0
    small_chunks, llm = run(model_dir, ps, max_num_seqs=32, max_num_batched_tokens=8, block_size=4)
    one_at_a_time, _ = run(model_dir, ps, max_num_seqs=1)
    assert batched == no_cache == small_chunks == one_at_a_time


def test_n_samples_share_prompt_blocks_and_differ(model_dir):
    llm = LLM(model_dir, dtype="float32", block_size=4)
    eng = llm.engine
    prompt = prompts(1, seed=3)[0] + [5, 6, 7]
    eng.add_request("r", prompt, SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=6, ignore_eos=True))
    eng.step()  # prefill of sample 0, then fork
    samples = [s.request for s in eng.groups["r"].samples]
    assert len(samples) == 4
    full = len(prompt) // 4
    for s in samples[1:]:
        assert s.block_ids[:full] == samples[0].block_ids[:full]  # shared, not recomputed
    assert eng.kv.pool.ref_counts[samples[0].block_ids[0]] == 4
    outs = []
    while eng.has_unfinished_requests():
        outs += eng.step()
    final = outs[-1]
    assert final.finished and len(final.outputs) == 4
    texts = {tuple(c.token_ids) for c in final.outputs}
    assert len(texts) > 1
    assert eng.kv.num_free_blocks == eng.kv.num_blocks
    # Same seed, same n samples whatever else runs alongside.
    again = LLM(model_dir, dtype="float32").generate(
        [prompts(5, seed=9)[2], prompt], SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=6, ignore_eos=True),
        use_tqdm=False)[1]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in final.outputs]


def test_seeded_sampling_is_independent_of_batch(model_dir):
    p = prompts(1, seed=4)[0]
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=123, max_tokens=8, ignore_eos=True)
    alone, _ = run(model_dir, [p], params)
    crowd, _ = run(model_dir, prompts(6, seed=5) + [p], [SamplingParams(temperature=1.0, max_tokens=8)] * 6 + [params])
    assert alone[0] == crowd[-1]


def test_max_tokens_min_tokens_and_stop_token_ids(model_dir):
    p = prompts(1, seed=6)[0]
    (free,), _ = run(model_dir, [p], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    stop_tok = free[4]
    first = free.index(stop_tok)
    llm = LLM(model_dir, dtype="float32")
    out = llm.generate([p], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_tok]), use_tqdm=False)[0]
    c = out.outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason == stop_tok and c.token_ids == free[: first + 1]
    out = llm.generate([p], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False)[0]
    assert out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == 3


def test_stop_string_truncates_text(model_dir):
    llm = LLM(model_dir, dtype="float32")
    p = prompts(1, seed=7)[0]
    full = llm.generate([p], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 3]
    assert stop.strip(), "the fixed seed gives printable text here"
    out = llm.generate([p], SamplingParams(temperature=0, max_tokens=12, stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full.text[: full.text.index(stop)]


def test_timings_are_recorded(model_dir):
    out = LLM(model_dir, dtype="float32").generate([prompts(1)[0]], GREEDY, use_tqdm=False)[0]
    m = out.metrics
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.finished_time
    assert 0 <= m.ttft <= m.e2e


@pytest.mark.parametrize(
    "prompt,params,message",
    [
        ("", SamplingParams(), "prompt is empty"),
        ([], SamplingParams(), "empty"),
        ([10**9], SamplingParams(), "outside the vocabulary"),
        ([5] * 600, SamplingParams(), "context holds"),
    ],
)
def test_bad_requests_are_rejected_and_others_keep_running(model_dir, prompt, params, message):
    eng = Engine(engine_config(model_dir, dtype="float32"))
    eng.add_request("good", prompts(1)[0], GREEDY)
    eng.step()
    with pytest.raises(ValueError, match=message):
        eng.add_request("bad", prompt, params)
    outs = []
    while eng.has_unfinished_requests():
        outs += eng.step()
    assert outs[-1].request_id == "good" and outs[-1].finished
    assert len(outs[-1].outputs[0].token_ids) == GREEDY.max_tokens


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(temperature=-1), "temperature"),
        (dict(top_p=0), "top_p"),
        (dict(max_tokens=-1), "max_tokens"),
        (dict(n=0), "n"),
        (dict(min_tokens=5, max_tokens=2), "min_tokens"),
    ],
)
def test_impossible_sampling_parameters_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_duplicate_request_id_and_unknown_model(model_dir, tmp_path):
    eng = Engine(engine_config(model_dir, dtype="float32"))
    eng.add_request("x", [5, 6, 7])
    with pytest.raises(ValueError, match="already in use"):
        eng.add_request("x", [5, 6, 7])
    with pytest.raises(ValueError, match="no such model"):
        Engine(engine_config(str(tmp_path / "missing.gguf")))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ValueError, match="bad.gguf"):
        Engine(engine_config(str(bad)))


def test_unknown_architecture_is_rejected(tmp_path, model_dir):
    import json
    import shutil

    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="mamba"):
        Engine(engine_config(str(d)))


def test_abort_frees_blocks(model_dir):
    eng = Engine(engine_config(model_dir, dtype="float32"))
    free = eng.kv.num_free_blocks
    eng.add_request("a", prompts(1)[0], SamplingParams(max_tokens=50, ignore_eos=True))
    eng.step()
    assert eng.kv.num_free_blocks < free
    out = eng.abort_request("a")
    assert out.finished and out.outputs[0].finish_reason == "abort"
    assert eng.kv.num_free_blocks == free and not eng.has_unfinished_requests()


class ReplayProposer(Proposer):
    """Proposes the next tokens of a known greedy continuation, with every third guess wrong,
    so verification both accepts and rejects drafts."""

    name = "replay"

    def __init__(self, expected: dict[tuple[int, ...], list[int]]) -> None:
        self.expected = expected
        self.proposed = 0

    def propose(self, requests, ks) -> list[Draft]:
        drafts = []
        for r, k in zip(requests, ks):
            future = self.expected[tuple(r.prompt_token_ids)][len(r.output_token_ids):]
            tokens = [t if (len(r.output_token_ids) + i) % 3 else (t + 1) % 1000 for i, t in enumerate(future[:k])]
            self.proposed += len(tokens)
            drafts.append(Draft(tuple(tokens)))
        return drafts


def test_verifying_drafts_keeps_greedy_output_and_rolls_back_rejected_kv(model_dir):
    ps = prompts(6, seed=3)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=1)
    plain = LLM(model_dir, dtype="float32", block_size=4).generate(ps, params, use_tqdm=False)
    expected = {tuple(p): o.outputs[0].token_ids for p, o in zip(ps, plain)}
    proposer = ReplayProposer(expected)
    engine = Engine(engine_config(model_dir, dtype="float32", block_size=4, speculative_k="5"), proposer=proposer)
    for i, p in enumerate(ps):
        engine.add_request(str(i), p, params)
    finals = {}
    while engine.has_unfinished_requests():
        finals.update({o.request_id: o for o in engine.step() if o.finished})
    for i, o in enumerate(plain):
        got = finals[str(i)].outputs[0]
        assert got.token_ids == o.outputs[0].token_ids
        assert [lp.token_id for lp in got.logprobs] == got.token_ids
        assert all(abs(a.logprob - b.logprob) < 1e-4 for a, b in zip(got.logprobs, o.outputs[0].logprobs))
    assert proposer.proposed > 0
    assert engine.stats().steps < 24  # accepted drafts: fewer steps than tokens
    assert engine.kv.num_free_blocks == engine.kv.num_blocks


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_attention_backends_give_identical_greedy_tokens(model_dir, backend):
    ps = prompts(8, seed=4)
    reference, _ = run(model_dir, ps, attention_backend="cpu", block_size=4, max_num_batched_tokens=16)
    got, llm = run(model_dir, ps, attention_backend=backend, block_size=4, max_num_batched_tokens=16)
    assert llm.model_info().attention_backend == backend
    assert got == reference


def test_kv_cache_size_is_measured_and_bounded_by_what_can_be_used(model_dir):
    from loom.model.device import kv_cache_budget, resolve_device

    llm = LLM(model_dir, dtype="float32", block_size=4, max_num_seqs=3, max_model_len=50)
    assert llm.stats().num_blocks == 3 * 13  # 3 sequences of 50 tokens in blocks of 4
    assert llm.stats().kv_cache_tokens == 3 * 13 * 4
    assert kv_cache_budget(resolve_device("cpu")) > llm.stats().num_blocks  # far from the memory bound here


def test_engine_reports_model_info(model_dir):
    info = LLM(model_dir, dtype="float32").model_info()
    assert (info.architecture, info.dtype, info.device, info.attention_backend) == ("llama", "float32", "cpu", "cpu")
    assert info.num_parameters > 0 and info.weight_bytes == 4 * info.num_parameters
    assert info.max_model_len > 0 and info.vocab_size > 0
