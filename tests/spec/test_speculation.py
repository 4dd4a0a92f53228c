"""Speculative decoding through the engine on tiny random models (fp32): greedy output identical to
no speculation for every method, exact sampling, stops inside an accepted run, KV rollback, trees,
and bad options."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import pytest
import torch

from loom.engine import LLM, Engine, engine_config
from loom.request import Request
from loom.sampling import SamplingParams
from loom.spec import Draft, Proposer
from loom.spec.controller import StepCostModel
from loom.step import ScheduledRequest, StepPlan
from tests.engine.test_engine import prompts

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return str(tiny_model("llama"))


def repetitive(n: int) -> list[list[int]]:
    """Prompts that repeat themselves, so that prompt lookup finds matches."""
    return [p[:12] * 3 for p in prompts(n, seed=5)]


def generate(model_dir, ps, params=GREEDY, **opts):
    llm = LLM(model_dir, dtype="float32", block_size=4, **opts)
    outs = llm.generate(ps, params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], llm


@pytest.mark.parametrize("opts", [
    dict(speculative="ngram", speculative_k="4"),
    dict(speculative="ngram"),  # auto
    dict(speculative="lookahead", speculative_k="6"),
    dict(speculative="lookahead", speculative_config='{"key_len": 1, "branches": 3}'),
])
def test_greedy_output_is_identical_to_no_speculation(model_dir, opts):
    ps = repetitive(6) + prompts(4)
    plain, _ = generate(model_dir, ps)
    spec, llm = generate(model_dir, ps, **opts)
    assert spec == plain
    stats = llm.engine.stats()
    assert stats.spec is not None and stats.spec.method == opts["speculative"]
    if "speculative_k" in opts:  # auto may find drafts not worth their cost on this model
        assert stats.spec.draft_tokens > 0 and 0 < stats.spec.accepted_tokens <= stats.spec.draft_tokens
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks  # every block came back


def test_draft_model_keeps_greedy_output(model_dir, tiny_model):
    ps = prompts(5, seed=2)
    plain, _ = generate(model_dir, ps)
    for draft in (model_dir, str(tiny_model("qwen2"))):  # itself (all accepted), another model (few)
        spec, llm = generate(model_dir, ps, speculative="draft", speculative_model=draft, speculative_k="3")
        assert spec == plain
        s = llm.engine.stats().spec
        assert s.draft_tokens > 0
        if draft == model_dir:
            assert s.accepted_tokens == s.draft_tokens
        proposer = llm.engine.speculator.proposer
        assert not proposer.shadows and not proposer.probes
        assert proposer.kv.num_free_blocks == proposer.kv.num_blocks


def test_draft_model_in_its_own_weight_format(model_dir):
    """The draft's ``quantization`` option packs its weights (the target stays dense); greedy output
    is still the target's own."""
    ps = prompts(3, seed=4)
    plain, _ = generate(model_dir, ps)
    spec, llm = generate(model_dir, ps, speculative="draft", speculative_model=model_dir, speculative_k="3",
                         speculative_config='{"quantization": "q8_0"}')
    assert spec == plain
    assert llm.engine.speculator.proposer.worker.weight_formats == ("q8_0",)
    assert llm.engine.worker.weight_formats == ()
    s = llm.engine.stats().spec
    assert 0 < s.accepted_tokens <= s.draft_tokens


def test_a_draft_models_catching_up_is_priced(model_dir):
    """Before its first draft for a request the draft model must run the request's prompt (less
    what its prefix cache holds): that is its set-up cost, dearer for a longer prompt; once the
    request's shadow is in step there is none."""
    llm = LLM(model_dir, dtype="float32", block_size=4, speculative="draft", speculative_model=model_dir)
    proposer = llm.engine.speculator.proposer
    proposer.catch_up_cost = StepCostModel([(1, 0.001), (512, 0.512)])  # 1 ms a token, for exact figures
    short, long = (Request(f"r{n}", prompts(1, seed=n)[0][:8] * (n // 8), SamplingParams()) for n in (8, 200))
    assert proposer.setup_seconds([short, long]) == pytest.approx([0.007, 0.199])  # all but the one drafting
    (draft,) = proposer.propose([long], [2])
    long.output_token_ids += [draft.token_ids[0], draft.token_ids[1] + 1]  # the second draft rejected
    assert proposer.setup_seconds([long]) == [0.0]
    proposer.forget(["r200"])  # its full blocks stay in the draft's prefix cache
    again = Request("again", list(long.prompt_token_ids), SamplingParams())
    assert proposer.setup_seconds([again]) == pytest.approx([0.003])  # 196 of its 200 tokens cached (4 a block)
    proposer.forget(["r8", "again"])
    assert not proposer.shadows and not proposer.probes


def test_a_draft_models_cache_shares_the_kv_budget(model_dir, tiny_model):
    """The draft's cache holds as many tokens as the target's, out of the same budget: both fit in
    it together (here the draft is the target itself, so each takes half); a draft cache of its own
    size (``kv_cache_tokens``) leaves the target the whole budget."""
    budget = 1 << 20
    alone = LLM(model_dir, dtype="float32", block_size=4, kv_cache_bytes=budget).engine
    bytes_per_block = alone.worker.kv.spec.bytes_per_block
    assert alone.kv.num_blocks == budget // bytes_per_block
    for draft, share in ((model_dir, 0.5), (str(tiny_model("qwen2")), None)):
        engine = LLM(model_dir, dtype="float32", block_size=4, kv_cache_bytes=budget, speculative="draft",
                     speculative_model=draft).engine
        proposer = engine.speculator.proposer
        assert proposer.kv.num_blocks == engine.kv.num_blocks
        both = bytes_per_block + proposer.worker.kv.spec.bytes_per_block
        assert engine.kv.num_blocks == budget * bytes_per_block // both // bytes_per_block
        assert engine.kv.num_blocks * both <= budget
        if share is not None:
            assert engine.kv.num_blocks == alone.kv.num_blocks * share
    own = LLM(model_dir, dtype="float32", block_size=4, kv_cache_bytes=budget, speculative="draft",
              speculative_model=model_dir, speculative_config='{"kv_cache_tokens": 64}').engine
    assert own.kv.num_blocks == alone.kv.num_blocks and own.speculator.proposer.kv.num_blocks == 16


def test_draft_model_with_another_vocabulary_is_refused(model_dir, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(model_dir, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    tok["added_tokens"].append({"id": 49152, "content": "<extra>", "single_word": False, "lstrip": False,
                                "rstrip": False, "normalized": False, "special": True})
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ValueError, match="another vocabulary"):
        LLM(model_dir, speculative="draft", speculative_model=str(other))


@pytest.mark.parametrize("opts, message", [
    (dict(speculative="ngram", speculative_k="-1"), "auto or a whole number"),
    (dict(speculative="ngram", speculative_config='{"max_n": 0}'), "min_n <= max_n"),
    (dict(speculative="ngram", speculative_config='{"depth": 3}'), "unknown option 'depth' for the ngram proposer"),
    (dict(speculative="draft"), "needs a draft model"),
    (dict(speculative="draft", speculative_model="x", speculative_config='{"quantization": "q3"}'),
     "quantization must be one of auto, none, q4_0"),
    (dict(speculative="magic"), "must be one of none, ngram, draft, lookahead"),
])
def test_bad_options_are_refused(model_dir, opts, message):
    with pytest.raises(ValueError, match=message):
        LLM(model_dir, **opts)


class Fixed(Proposer):
    """Proposes given continuations per prompt (by their first token)."""

    name = "fixed"
    makes_trees = True  # offered trees are verified as trees, not cut to their first branch

    def __init__(self, guesses: dict[int, list[int]], parents: dict[int, list[int]] | None = None) -> None:
        self.guesses = guesses
        self.parents = parents or {}

    def propose(self, requests, ks):
        out = []
        for r, k in zip(requests, ks):
            done = len(r.output_token_ids)
            guess = self.guesses[r.prompt_token_ids[0]]
            if r.prompt_token_ids[0] in self.parents:  # a tree, offered whole at the first decode only
                out.append(Draft(tuple(guess), tuple(self.parents[r.prompt_token_ids[0]])).cut(k) if done == 1 else Draft())
            else:
                out.append(Draft(tuple(guess[done : done + k])))
        return out


def run_engine(model_dir, proposer, ps, params, **opts) -> dict[str, object]:
    engine = Engine(engine_config(model_dir, dtype="float32", block_size=4, **opts), proposer=proposer)
    for i, p in enumerate(ps):
        engine.add_request(str(i), p, params)
    finals = {}
    while engine.has_unfinished_requests():
        finals.update({o.request_id: o for o in engine.step() if o.finished})
    assert engine.kv.num_free_blocks == engine.kv.num_blocks
    return finals


def test_stops_and_max_tokens_inside_an_accepted_run(model_dir):
    ps = prompts(3, seed=8)
    expected, llm = generate(model_dir, ps)
    exact = Fixed({p[0]: e for p, e in zip(ps, expected)})
    # a stop token at position 5, a stop string in the text, and max_tokens, all inside a run of 8 drafts
    stop_token = SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[expected[0][5]])
    text = llm.engine.tokenizer.decode(expected[1][:12])
    stop_string = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[text[-6:-2]])
    capped = SamplingParams(temperature=0, max_tokens=7, ignore_eos=True, logprobs=0)
    for params in (stop_token, stop_string, capped):
        plain = llm.generate(ps, params, use_tqdm=False)
        spec = run_engine(model_dir, exact, ps, params, speculative_k="8")
        for i, o in enumerate(plain):
            got = spec[str(i)].outputs[0]
            want = o.outputs[0]
            assert (got.token_ids, got.text, got.finish_reason) == (want.token_ids, want.text, want.finish_reason)
            assert len(got.logprobs or []) == len(want.logprobs or [])


def test_rejected_drafts_never_enter_the_prefix_cache(model_dir):
    p = prompts(1, seed=9)[0][:20]
    wrong = [7] * 40
    engine = Engine(engine_config(model_dir, dtype="float32", block_size=4, speculative_k="8"),
                    proposer=Fixed({p[0]: wrong}))
    engine.add_request("a", p, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    while engine.has_unfinished_requests():
        out = engine.step()
    assert engine.stats().spec.draft_tokens > 0 and engine.stats().spec.accepted_tokens == 0
    real = out[0].outputs[0].token_ids
    # A prompt that continues with the drafted tokens shares only the real prefix with the cache.
    engine.add_request("b", p + wrong[:16], SamplingParams(max_tokens=1))
    engine.add_request("c", p + real[:8] + [1, 2, 3, 4], SamplingParams(max_tokens=1))
    results = {}
    while engine.has_unfinished_requests():
        results.update({o.request_id: o for o in engine.step() if o.finished})
    assert results["b"].num_cached_tokens <= 20
    assert results["c"].num_cached_tokens >= 24


def test_a_tree_of_drafts_is_verified_in_one_pass(model_dir):
    ps = prompts(2, seed=4)
    expected, _ = generate(model_dir, ps)
    # Branch 1 is wrong after one token; branch 2 (sharing no prefix) is right for 4 tokens.
    e0 = expected[0]
    tree = [e0[1], (e0[2] + 1) % 1000, e0[1] + 1, e0[1], e0[2], e0[3], e0[4]]
    # wait: tree tokens are laid out with parents; the right branch starts at index 3
    parents = [-1, 0, -1, -1, 3, 4, 5]
    spec = run_engine(model_dir, Fixed({ps[0][0]: tree, ps[1][0]: expected[1]}, {ps[0][0]: parents}),
                      ps, GREEDY, speculative_k="7")
    assert [spec[str(i)].outputs[0].token_ids for i in range(2)] == expected


def test_tree_rows_see_their_branch_only(model_dir):
    """The logits of a tree's rows equal those of each branch verified as a chain."""
    llm = LLM(model_dir, dtype="float32", block_size=4)
    w = llm.engine.worker
    prompt = prompts(1, seed=6)[0][:10]
    logits = []
    capture = w.model.compute_logits
    w.model.compute_logits = lambda h: logits.append(capture(h)) or logits[-1]

    def verify(drafts, parents):
        r = Request("t", prompt, SamplingParams(temperature=0), block_ids=list(range(8)))
        w.execute(StepPlan([ScheduledRequest(r, 0, len(prompt) - 1, sample=False)]))
        w.execute(StepPlan([ScheduledRequest(r, len(prompt) - 1, 1, sample=True, draft_token_ids=drafts,
                                             draft_parents=parents)]))
        return logits[-1]

    tree = verify((11, 12, 21, 22, 13), (-1, 0, -1, 2, 1))
    chain_a = verify((11, 12, 13), ())
    chain_b = verify((21, 22), ())
    torch.testing.assert_close(tree[[0, 1, 2, 5]], chain_a, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(tree[[3, 4]], chain_b[1:], rtol=1e-4, atol=1e-4)


def test_seeded_sampling_is_identical_with_and_without_speculation(model_dir):
    ps = prompts(4, seed=12)
    params = SamplingParams(temperature=0.8, top_k=20, max_tokens=20, ignore_eos=True, seed=123)
    plain, _ = generate(model_dir, ps, params)
    # drafts: the seeded continuation itself, every third token wrong
    guesses = {p[0]: [t if i % 3 else t + 1 for i, t in enumerate(out)] for p, out in zip(ps, plain)}
    spec = run_engine(model_dir, Fixed(guesses), ps, params, speculative_k="4")
    assert [spec[str(i)].outputs[0].token_ids for i in range(len(ps))] == plain
    alone = run_engine(model_dir, Fixed(guesses), ps[1:2], params, speculative_k="2")
    assert alone["0"].outputs[0].token_ids == plain[1]  # whatever else is in the batch


def test_sampled_tokens_follow_the_distribution_without_speculation(model_dir):
    """Chi-square over many unseeded draws: the tokens at the drafted positions are distributed as
    without speculation (drafts are the greedy continuation, so they are often accepted)."""
    p = prompts(1, seed=7)[0][:16]
    params = SamplingParams(temperature=1.0, top_k=3, max_tokens=3, ignore_eos=True)
    greedy, _ = generate(model_dir, [p], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    n = 1500
    plain = LLM(model_dir, dtype="float32", block_size=4, seed=1).generate([p] * n, params, use_tqdm=False)
    spec = run_engine(model_dir, Fixed({p[0]: greedy[0]}), [p] * n, params, speculative_k="2", seed=2,
                      max_num_seqs=256)
    a = Counter(tuple(o.outputs[0].token_ids[1:]) for o in plain)
    b = Counter(tuple(o.outputs[0].token_ids[1:]) for o in spec.values())
    keys = [k for k in set(a) | set(b) if a[k] + b[k] >= 10]
    chi2 = sum((a[k] - b[k]) ** 2 / (a[k] + b[k]) for k in keys)  # two samples of equal size
    df = len(keys) - 1
    assert df >= 3
    assert chi2 < df + 4 * (2 * df) ** 0.5  # far beyond this is a biased sampler (p < 0.001)
