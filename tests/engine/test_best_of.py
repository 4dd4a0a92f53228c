"""best_of: the engine runs best_of samples and returns the n with the highest cumulative logprob
of the raw model distribution, whether or not logprobs were asked for."""

from __future__ import annotations

import pytest

from loom.engine import LLM
from loom.sampling import SamplingParams

PROMPT = "The quick brown fox"
# Seeded: sample i draws from the generator seeded by (seed, i), so the same samples come back
# whether 4 of 4 or the best 2 of 4 are returned.
COMMON = dict(temperature=1.3, top_k=50, seed=11, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_model):
    return LLM(str(tiny_model("llama")), dtype="float32")


def test_the_n_best_samples_by_cumulative_raw_logprob(llm):
    every = llm.generate(PROMPT, SamplingParams(n=4, logprobs=0, **COMMON), use_tqdm=False)[0]
    assert len({tuple(c.token_ids) for c in every.outputs}) == 4
    for c in every.outputs:  # logprobs of the raw distribution, not the tempered and top-k one
        assert c.cumulative_logprob == pytest.approx(sum(e.logprob for e in c.logprobs))
    ranked = sorted(every.outputs, key=lambda c: c.cumulative_logprob, reverse=True)

    best = llm.generate(PROMPT, SamplingParams(n=2, best_of=4, **COMMON), use_tqdm=False)[0]
    assert [c.index for c in best.outputs] == [0, 1]
    assert [c.token_ids for c in best.outputs] == [c.token_ids for c in ranked[:2]]
    assert [c.text for c in best.outputs] == [c.text for c in ranked[:2]]
    assert [c.cumulative_logprob for c in best.outputs] == pytest.approx([c.cumulative_logprob for c in ranked[:2]])
    assert all(c.logprobs is None for c in best.outputs)  # not asked for
    assert best.num_generated_tokens == 4 * 8  # every sample counts

    one = llm.generate(PROMPT, SamplingParams(best_of=4, **COMMON), use_tqdm=False)[0]
    assert [c.token_ids for c in one.outputs] == [ranked[0].token_ids]


def test_without_ranking_no_logprobs_are_computed(llm):
    out = llm.generate(PROMPT, SamplingParams(n=2, best_of=2, **COMMON), use_tqdm=False)[0]
    assert [c.cumulative_logprob for c in out.outputs] == [None, None]
    assert out.num_generated_tokens == 16
