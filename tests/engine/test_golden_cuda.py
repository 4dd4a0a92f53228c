"""The golden tests on a GPU (``pytest -m cuda``, on a machine with CUDA and a CUDA build of
torch): the cuda attention backend against transformers on the same weights, and against the
engine's own CPU output."""

from __future__ import annotations

import pytest
import torch

from loom.engine import LLM
from loom.sampling import SamplingParams
from tests.engine.test_golden import ARCHS, hf_greedy, hf_model, mixed_prompts

pytestmark = pytest.mark.cuda


@pytest.fixture(autouse=True)
def _gpu() -> None:
    if not torch.cuda.is_available():
        pytest.fail("the cuda tests need a GPU and a CUDA build of torch (see the README)")


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_transformers_on_the_gpu(tiny_model, arch):
    path = tiny_model(arch)
    ref = hf_model(path)
    prompts = mixed_prompts(ref.config.vocab_size)
    expected = [hf_greedy(ref, p, 12) for p in prompts]
    llm = LLM(str(path), device="cuda", dtype="float32", block_size=4, num_blocks=56, max_num_batched_tokens=24,
              max_num_seqs=8)
    info = llm.model_info()
    assert info.device.startswith("cuda") and info.attention_backend == "cuda"
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert llm.stats().num_preemptions > 0 and llm.stats().prefix_cache_hit_tokens > 0


def test_seeded_sampling_on_the_gpu_is_reproducible(tiny_model):
    llm = LLM(str(tiny_model("llama")), device="cuda", dtype="float32")
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, seed=7, n=2)
    a = llm.generate([[5, 6, 7, 8]], params, use_tqdm=False)[0]
    b = llm.generate([[5, 6, 7, 8]], params, use_tqdm=False)[0]
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
