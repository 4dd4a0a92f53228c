"""The worker turns a step plan into plain results: token ids and logprobs, no tensors."""

from __future__ import annotations

import pytest
import torch

from loom.config import CacheConfig, EngineConfig
from loom.model.arch import load_model_config
from loom.model.worker import Worker
from loom.request import Request
from loom.sampling import SamplingParams
from loom.step import ScheduledRequest, StepPlan

BS = 4


@pytest.fixture(scope="module")
def worker(tiny_model):
    path = tiny_model("llama")
    config = EngineConfig(model=str(path), dtype="float32", cache=CacheConfig(block_size=BS, num_blocks=32))
    return Worker(config, load_model_config(path), path, max_model_len=256, eos_token_ids=(2,))


def request(rid: str, prompt: list[int], blocks: list[int], **params) -> Request:
    r = Request(rid, prompt, SamplingParams(temperature=0, ignore_eos=True, **params), max_total_tokens=256)
    r.block_ids = blocks
    return r


def greedy_next(worker: Worker, tokens: list[int]) -> int:
    """The greedy next token after ``tokens`` from a one-chunk prefill into scratch blocks."""
    r = request("ref", tokens, [20, 21, 22, 23, 24, 25, 26, 27])
    res = worker.execute(StepPlan([ScheduledRequest(r, 0, len(tokens), sample=True)])).results["ref"]
    return res.token_ids[0]


def test_prefill_then_decode_returns_plain_tokens(worker):
    prompt = [11, 12, 13, 14, 15, 16]
    r = request("a", prompt, [3, 5])
    result = worker.execute(StepPlan([ScheduledRequest(r, 0, 6, sample=True)]))
    (token,) = result.results["a"].token_ids
    assert isinstance(token, int) and result.results["a"].logprobs == () and result.forward_end_time > 0
    assert token == greedy_next(worker, prompt)
    r.output_token_ids.append(token)
    r.block_ids.append(7)
    result = worker.execute(StepPlan([ScheduledRequest(r, 6, 1, sample=True)]))
    assert result.results["a"].token_ids == (greedy_next(worker, prompt + [token]),)


def test_chunk_that_does_not_reach_the_end_samples_nothing_but_scores_the_prompt(worker):
    prompt = [21, 22, 23, 24, 25, 26, 27]
    r = request("p", prompt, [8, 9], prompt_logprobs=2)
    res = worker.execute(StepPlan([ScheduledRequest(r, 0, 4, sample=False)])).results["p"]
    assert res.token_ids == () and [lp.token_id for lp in res.prompt_logprobs] == prompt[1:5]
    assert all(len(lp.top) == 2 for lp in res.prompt_logprobs)
    res = worker.execute(StepPlan([ScheduledRequest(r, 4, 3, sample=True)])).results["p"]
    assert len(res.token_ids) == 1 and [lp.token_id for lp in res.prompt_logprobs] == prompt[5:]


def test_drafts_are_verified_against_the_model(worker):
    prompt = [31, 32, 33, 34, 35]
    chain = list(prompt)
    for _ in range(3):
        chain.append(greedy_next(worker, chain))
    r = request("d", prompt, [10, 11, 12])
    first = worker.execute(StepPlan([ScheduledRequest(r, 0, 5, sample=True)])).results["d"].token_ids
    assert list(first) == chain[5:6]
    r.output_token_ids.append(first[0])
    right, wrong = chain[6], (chain[7] + 1) % 1000
    plan = StepPlan([ScheduledRequest(r, 5, 1, sample=True, draft_token_ids=(right, wrong, 99))])
    res = worker.execute(plan).results["d"]
    assert res.token_ids == (right, chain[7])  # the right draft, then the model's token where the wrong one was


def test_forks_sample_from_the_same_logits(worker):
    prompt = [41, 42, 43]
    parent = request("f#0", prompt, [13])
    child = request("f#1", prompt, [])
    results = worker.execute(StepPlan([ScheduledRequest(parent, 0, 3, sample=True, forks=(child,))])).results
    assert results["f#0"].token_ids == results["f#1"].token_ids == (greedy_next(worker, prompt),)


def test_block_copies_run_before_the_forward_pass(worker):
    worker.kv.keys[0][30].fill_(3.0)
    worker.execute(StepPlan([ScheduledRequest(request("c", [1, 2], [29]), 0, 2, sample=True)], block_copies=[(30, 31)]))
    assert torch.equal(worker.kv.keys[0][31], worker.kv.keys[0][30])
