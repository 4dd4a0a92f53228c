"""Tensor parallelism end to end: two processes over gloo give the greedy output and the logprobs
of one (fp32, dense weights: the partial sums differ from one sum only in rounding), through
chunked prefill, batching, accepted draft trees and seeded sampling; a peer's failure comes
back as its own error; what cannot run split is refused before any process starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from loom import LLM, SamplingParams
from loom.config import EngineConfig
from loom.engine import Engine, engine_config
from loom.model.arch import load_model_config
from loom.model.parallel.group import TensorGroup
from loom.model.worker import PeerStep, run_peer
from tests.spec.test_speculation import Fixed
from tests.tiny_models import make_tiny_hf_model

OPTS = dict(dtype="float32", quantization="none", num_threads=1, num_blocks=96, block_size=4,
            max_num_batched_tokens=32)
PROMPTS = [list(range(5, 60)), list(range(100, 109)), list(range(300, 340)), list(range(100, 120))]


def _outputs(llm: LLM, params: SamplingParams) -> list[tuple[list[int], list[float]]]:
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    return [(list(o.outputs[0].token_ids), [lp.logprob for lp in o.outputs[0].logprobs or []]) for o in outs]


def _compare(path: Path, params: SamplingParams, **options) -> None:
    one = _outputs(LLM(str(path), **OPTS, **options), params)
    two = _outputs(LLM(str(path), **OPTS, tensor_parallel_size=2, **options), params)
    for (tokens1, lps1), (tokens2, lps2) in zip(one, two, strict=True):
        assert tokens2 == tokens1
        assert lps2 == pytest.approx(lps1, abs=1e-4)


GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, logprobs=1)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_two_ranks_give_the_output_of_one(tiny_model, arch: str) -> None:
    _compare(tiny_model(arch), GREEDY)


@pytest.mark.parametrize("transport", ["shared", "gloo"])
def test_uneven_heads_and_units_split(tmp_path: Path, transport: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # 3 key/value heads and 96 intermediate units over 2 ranks: 1 and 2 heads, 32 and 64 units.
    if transport == "gloo":
        monkeypatch.setenv("LOOM_TP_ALL_REDUCE", "gloo")
    path = make_tiny_hf_model("llama", tmp_path / "m", hidden_size=96, num_attention_heads=6, num_key_value_heads=3,
                              intermediate_size=96)
    _compare(path, GREEDY)


def test_seeded_sampling_matches(tiny_model) -> None:
    _compare(tiny_model("llama"), SamplingParams(max_tokens=16, temperature=0.8, seed=3, ignore_eos=True, logprobs=1))


def test_parallel_samples_copy_shared_blocks_on_every_rank(tiny_model) -> None:
    # n = 3 samples share the prompt's partial last block: each copy-on-write copy reaches the peer.
    path = str(tiny_model("llama"))
    params = SamplingParams(max_tokens=12, temperature=0.9, seed=5, n=3, ignore_eos=True)
    prompt = list(range(5, 27))  # 22 tokens: a partial block of 4
    outs = [[list(c.token_ids) for c in LLM(path, **OPTS, tensor_parallel_size=tp).generate(
        [prompt], params, use_tqdm=False)[0].outputs] for tp in (1, 2)]
    assert outs[0] == outs[1]


def test_accepted_tree_drafts_move_on_every_rank(tiny_model) -> None:
    # The right branch of a draft tree is accepted: its KV moves into place after sampling on rank 0,
    # and on the peer before its next step. A peer that missed the move would read stale keys.
    path = str(tiny_model("llama"))
    prompt = PROMPTS[0]
    (expected,) = [list(o.outputs[0].token_ids) for o in LLM(path, **OPTS).generate([prompt], GREEDY, use_tqdm=False)]
    tree = [expected[1], (expected[2] + 1) % 1000, expected[1] + 1, expected[1], expected[2], expected[3], expected[4]]
    proposer = Fixed({prompt[0]: tree}, {prompt[0]: [-1, 0, -1, -1, 3, 4, 5]})
    engine = Engine(engine_config(path, **OPTS, tensor_parallel_size=2, speculative_k="7"), proposer=proposer)
    engine.add_request("r", prompt, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
    final = None
    while engine.has_unfinished_requests():
        final = next((o for o in engine.step() if o.finished), final)
    assert engine.stats().spec.accepted_tokens == 4
    assert list(final.outputs[0].token_ids) == expected


def test_the_all_reduce_time_is_a_phase(tiny_model) -> None:
    llm = LLM(str(tiny_model("llama")), **OPTS, tensor_parallel_size=2)
    llm.generate([PROMPTS[0]], GREEDY, use_tqdm=False)
    phases = llm.stats().phase_seconds
    assert 0 < phases["all_reduce"] < phases["forward"]


def test_a_peer_that_fails_reports_its_own_error(tiny_model, tmp_path: Path) -> None:
    path = tiny_model("llama")
    config = EngineConfig(model=str(path), num_threads=1)
    group = TensorGroup.start(2, run_peer, (config, load_model_config(path), tmp_path, 64, (2,), None))
    with pytest.raises(ValueError, match=r"rank 1: ValueError: .*no model.safetensors"):
        try:
            group.barrier()  # the peer fails loading weights from an empty directory
        except RuntimeError as e:
            group.check_peers(e)


def test_a_peer_that_fails_mid_step_fails_the_step_with_its_error(tiny_model) -> None:
    engine = Engine(engine_config(str(tiny_model("llama")), **OPTS, tensor_parallel_size=2))
    engine.add_request("r", PROMPTS[1], GREEDY)
    engine.step()
    engine.worker.group.send(PeerStep([], [(10**6, 0)], [], None))  # a block copy the peer cannot make
    with pytest.raises(ValueError, match=r"rank 1: IndexError"):
        for _ in range(3):
            engine.step()  # waits in an all-reduce until the peer's pipe says why it left


def test_what_cannot_run_split_is_refused(tiny_model) -> None:
    path = str(tiny_model("llama"))  # 2 key/value heads
    with pytest.raises(ValueError, match="at least 4 key/value heads"):
        LLM(path, **OPTS, tensor_parallel_size=4)
    with pytest.raises(ValueError, match="--swap-space is not supported with --tensor-parallel-size"):
        engine_config(path, tensor_parallel_size=2, swap_space=1 << 20, preemption_mode="swap")
    engine = Engine(engine_config(path, **OPTS, tensor_parallel_size=2))
    engine.add_request("r", list(range(5, 30)), SamplingParams(max_tokens=8))
    engine.step()
    with pytest.raises(ValueError, match="KV blocks do not move between engines with --tensor-parallel-size"):
        engine.export_request("r")
