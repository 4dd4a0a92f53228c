"""Batched sampler: greedy, seeds, filters, penalties, min_tokens, logprobs, distributions."""

from __future__ import annotations

import math

import pytest
import torch

from loom.sampling import SamplingParams, SamplingRow, Sampler, sample_seed
from loom.sampling.sampler import _apply_penalties, _draw

EOS = 2


def _row(params: SamplingParams, output: list[int] | None = None, prompt: list[int] | None = None, index: int = 0) -> SamplingRow:
    return SamplingRow(params, prompt or [], output or [], sample_seed(params, index), (EOS,))


def _logits(rows: int, vocab: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def _sample(logits: torch.Tensor, rows: list[SamplingRow], sampler: Sampler | None = None) -> list[int]:
    return [r.token_id for r in (sampler or Sampler(seed=0))(logits, rows)]


def _support(logits: torch.Tensor, params: SamplingParams, draws: int = 4000) -> set[int]:
    """Tokens drawn from one row's distribution (replicated over a batch)."""
    batch = logits.expand(draws, -1).contiguous()
    return set(_sample(batch, [_row(params) for _ in range(draws)]))


# -- greedy -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_is_argmax(dtype: torch.dtype) -> None:
    logits = _logits(16, 1000).to(dtype)
    results = Sampler()(logits, [_row(SamplingParams(temperature=0)) for _ in range(16)])
    assert [r.token_id for r in results] == logits.float().argmax(-1).tolist()
    assert all(r.logprob is None for r in results)


def test_greedy_ties_pick_lowest_id() -> None:
    logits = torch.zeros(2, 10)
    logits[:, [3, 7]] = 5.0
    assert _sample(logits, [_row(SamplingParams(temperature=0)), _row(SamplingParams(temperature=0, repetition_penalty=1.0, logprobs=1))]) == [3, 3]


def test_top_k_1_and_tiny_top_p_are_greedy() -> None:
    logits = _logits(32, 500, seed=1)
    expected = logits.argmax(-1).tolist()
    assert _sample(logits, [_row(SamplingParams(temperature=1.5, top_k=1)) for _ in range(32)]) == expected
    assert _sample(logits, [_row(SamplingParams(temperature=1.5, top_p=1e-6)) for _ in range(32)]) == expected
    assert _sample(logits, [_row(SamplingParams(temperature=1.5, min_p=1.0)) for _ in range(32)]) == expected


def test_mixed_greedy_and_random_rows() -> None:
    logits = _logits(6, 300, seed=2)
    rows = [_row(SamplingParams(temperature=0 if i % 2 else 1.0)) for i in range(6)]
    tokens = _sample(logits, rows)
    assert [tokens[i] for i in (1, 3, 5)] == logits[[1, 3, 5]].argmax(-1).tolist()


def test_strided_logits_are_read_not_modified() -> None:
    wide = _logits(4, 700, seed=9)
    logits = wide[:, :600]  # a non-contiguous view, as a runner slicing off vocab padding gives
    before = logits.clone()
    params = SamplingParams(temperature=0.9, top_p=0.8, repetition_penalty=1.3, seed=3, logprobs=2)
    tokens = _sample(logits, [_row(params, [1, 2], [3]) for _ in range(4)])
    assert torch.equal(logits, before)
    assert tokens == _sample(logits.contiguous(), [_row(params, [1, 2], [3]) for _ in range(4)])
    assert max(tokens) < 600


def test_batch_shape_must_match_rows() -> None:
    with pytest.raises(ValueError, match="len\\(rows\\)=1"):
        Sampler()(torch.zeros(2, 10), [_row(SamplingParams())])
    assert Sampler()(torch.zeros(0, 10), []) == []


# -- seeds ------------------------------------------------------------------------------------


def _seeded_run(params: SamplingParams, position: int, others: list[SamplingParams], steps: int = 12) -> list[int]:
    """Generate ``steps`` tokens for one seeded row placed at ``position`` among ``others``."""
    target = _row(params)
    neighbours = [_row(p, index=i + 1) for i, p in enumerate(others)]
    out = []
    for step in range(steps):
        rows = neighbours[:position] + [target] + neighbours[position:]
        logits = _logits(len(rows), 2000, seed=100 + step, scale=2.0)
        logits[position] = _logits(1, 2000, seed=step, scale=2.0)[0]  # the target's logits depend on the step only
        token = _sample(logits, rows, Sampler(seed=step * 7 + len(rows)))[position]
        target.output_token_ids.append(token)
        out.append(token)
    return out


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(seed=1234, temperature=1.0),
        SamplingParams(seed=1234, temperature=0.7, top_p=0.9),
        SamplingParams(seed=99, temperature=1.3, top_k=40, min_p=0.01),
        SamplingParams(seed=5, temperature=1.0, top_p=0.95, repetition_penalty=1.3, frequency_penalty=0.5),
    ],
)
def test_seeded_row_ignores_batch_composition(params: SamplingParams) -> None:
    alone = _seeded_run(params, 0, [])
    others = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=0.9, top_p=0.5),
        SamplingParams(seed=7, temperature=1.0, top_k=5),
        SamplingParams(temperature=1.0, presence_penalty=1.0, logprobs=3),
        SamplingParams(temperature=0.5, min_tokens=5),
    ]
    assert _seeded_run(params, 3, others) == alone
    assert _seeded_run(params, 5, others) == alone
    assert _seeded_run(params, 0, others[:2]) == alone
    assert len(set(alone)) > 3  # actually random, not a constant


def test_n_seeded_samples_differ_but_reproduce() -> None:
    params = SamplingParams(seed=42, n=4, temperature=1.0)
    logits = _logits(1, 5000, seed=3, scale=1.0).expand(4, -1).contiguous()

    def run() -> list[tuple[int, ...]]:
        rows = [_row(params, index=i) for i in range(4)]
        return [tuple(t) for t in zip(*[_sample(logits, rows, Sampler(seed=s)) for s in range(10)])]

    first = run()
    assert first == run()
    assert len(set(first)) == 4


def test_unseeded_rows_follow_the_sampler_seed() -> None:
    logits = _logits(8, 1000, seed=4, scale=1.0)
    rows = [_row(SamplingParams(temperature=1.0)) for _ in range(8)]
    assert _sample(logits, rows, Sampler(seed=3)) == _sample(logits, rows, Sampler(seed=3))
    assert sample_seed(SamplingParams(), 0) is None


# -- filters ----------------------------------------------------------------------------------


def test_top_k_support() -> None:
    logits = _logits(1, 200, seed=5, scale=1.0)
    assert _support(logits, SamplingParams(temperature=1.0, top_k=7)) == set(logits[0].topk(7).indices.tolist())


def test_top_p_support_matches_sorted_reference() -> None:
    logits = _logits(1, 300, seed=6, scale=1.5)
    probs = torch.softmax(logits[0] / 0.8, -1).double()
    sorted_probs, order = probs.sort(descending=True)
    kept = int(((sorted_probs.cumsum(0) - sorted_probs) < 0.6).sum())
    expected = set(order[:kept].tolist())
    assert 3 < kept < 50
    assert _support(logits, SamplingParams(temperature=0.8, top_p=0.6), draws=8000) == expected


def test_top_p_applies_to_the_top_k_distribution() -> None:
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]]))
    # top_k=2 leaves 0.4/0.7 and 0.3/0.7; top_p=0.5 then keeps only the first (0.57 >= 0.5)
    assert _support(logits, SamplingParams(top_k=2, top_p=0.5)) == {0}
    # without top_k, 0.4 < 0.5 so two tokens are needed
    assert _support(logits, SamplingParams(top_p=0.5)) == {0, 1}


def test_min_p_support() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    assert _support(logits, SamplingParams(min_p=0.29)) == {0, 1, 2}  # p >= 0.29 * 0.5
    assert _support(logits, SamplingParams(min_p=0.19)) == {0, 1, 2, 3}


def test_large_vocab_filters_keep_exact_counts() -> None:
    """The radix-select thresholds on a realistic vocabulary against a full sort."""
    from loom.sampling.sampler import _filter

    logits = _logits(8, 49152, seed=7, scale=4.0)
    probs = torch.softmax(logits, -1)
    for k in (1, 3, 50, 1000):
        kept = _filter(probs.clone(), [SamplingParams(top_k=k)] * 8)
        assert (kept > 0).sum(-1).tolist() == [k] * 8
    for top_p in (0.05, 0.5, 0.9):
        sorted_probs = probs.double().sort(-1, descending=True).values
        expected = ((sorted_probs.cumsum(-1) - sorted_probs) < top_p).sum(-1)
        kept = _filter(probs.clone(), [SamplingParams(top_p=top_p)] * 8)
        assert ((kept > 0).sum(-1) - expected).abs().max() <= 1  # float32 rounding at the cut-off


# -- penalties --------------------------------------------------------------------------------


def _reference_penalties(logits: list[float], prompt: list[int], output: list[int], p: SamplingParams) -> list[float]:
    out = list(logits)
    for token in set(prompt) | set(output):
        out[token] = out[token] / p.repetition_penalty if out[token] > 0 else out[token] * p.repetition_penalty
    for token in set(output):
        out[token] -= p.frequency_penalty * output.count(token) + p.presence_penalty
    return out


def test_penalties_match_hand_written_reference() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 0.0, 1.0, -0.5], [1.0, 2.0, -3.0, 0.5, 4.0, -1.0, 0.0, 2.5]])
    params = [
        SamplingParams(repetition_penalty=1.5, frequency_penalty=0.5, presence_penalty=0.25),
        SamplingParams(repetition_penalty=0.8, frequency_penalty=-0.5, presence_penalty=1.0),
    ]
    prompts = [[0, 1, 1, 7], [4, 2]]
    outputs = [[3, 3, 4, 0, 3], [1, 6, 6]]
    rows = [_row(p, o, pr) for p, o, pr in zip(params, outputs, prompts)]
    processed = logits.clone()
    _apply_penalties(processed, rows, [0, 1])
    for i in range(2):
        expected = _reference_penalties(logits[i].tolist(), prompts[i], outputs[i], params[i])
        assert processed[i].tolist() == pytest.approx(expected, abs=1e-6)
    # only tokens seen in prompt or output changed
    changed = (processed != logits).nonzero().tolist()
    assert {(r, c) for r, c in changed} <= {(r, c) for r in range(2) for c in set(prompts[r]) | set(outputs[r])}


def test_penalties_skip_unpenalised_rows_and_prompt_without_repetition_penalty() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    rows = [_row(SamplingParams(presence_penalty=1.0), [2], [0, 1]), _row(SamplingParams(), [2], [0])]
    processed = logits.clone()
    _apply_penalties(processed, rows, [0])
    assert processed.tolist() == [[1.0, 2.0, 2.0], [1.0, 2.0, 3.0]]


def test_repetition_penalty_changes_greedy_choice() -> None:
    logits = torch.tensor([[3.0, 2.9, 0.0]])
    assert _sample(logits, [_row(SamplingParams(temperature=0), [0])]) == [0]
    assert _sample(logits, [_row(SamplingParams(temperature=0, repetition_penalty=1.2), [0])]) == [1]
    assert _sample(logits, [_row(SamplingParams(temperature=0, repetition_penalty=1.2), [], [0])]) == [1]


# -- min_tokens ---------------------------------------------------------------------------------


def test_min_tokens_masks_eos_and_stop_tokens() -> None:
    logits = torch.tensor([[0.0, 1.0, 10.0, 0.0, 9.0, 0.0]])  # EOS=2 is the argmax, then 4
    params = SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[4])
    assert _sample(logits, [_row(params, [5, 5])]) == [1]
    assert _sample(logits, [_row(params, [5, 5, 5])]) == [EOS]
    # ignore_eos: EOS does not stop the sample, so min_tokens leaves it allowed (vLLM semantics)
    assert _sample(logits, [_row(SamplingParams(temperature=0, min_tokens=3, ignore_eos=True), [5])]) == [EOS]


# -- logprobs -----------------------------------------------------------------------------------


def test_logprobs_are_raw_log_softmax_with_ranks() -> None:
    logits = _logits(4, 100, seed=8)
    params = [
        SamplingParams(temperature=0, logprobs=5),
        SamplingParams(temperature=0.5, top_k=3, repetition_penalty=1.5, logprobs=0),
        SamplingParams(temperature=1.0, logprobs=20),
        SamplingParams(temperature=1.0),
    ]
    rows = [_row(p, [1, 2, 3]) for p in params]
    results = Sampler(seed=0)(logits, rows)
    raw = torch.log_softmax(logits, -1)
    for i, result in enumerate(results[:3]):
        lp = result.logprob
        assert lp is not None and lp.token_id == result.token_id
        assert lp.logprob == pytest.approx(raw[i, result.token_id].item(), abs=1e-5)
        assert lp.rank == int((raw[i] > raw[i, result.token_id]).sum()) + 1
        top_values, top_ids = raw[i].topk(params[i].logprobs)
        assert [t for t, _ in lp.top] == top_ids.tolist()
        assert [v for _, v in lp.top] == pytest.approx(top_values.tolist(), abs=1e-5)
    assert results[0].logprob.rank == 1
    assert results[1].logprob.top == ()
    assert results[3].logprob is None


# -- distributions ------------------------------------------------------------------------------


def _frequencies(tokens: list[int], vocab: int) -> torch.Tensor:
    return torch.bincount(torch.tensor(tokens), minlength=vocab).double() / len(tokens)


def test_temperature_distribution() -> None:
    draws = 20000
    probs = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03])
    logits = probs.log().expand(draws, -1).contiguous()
    tokens = _sample(logits, [_row(SamplingParams(temperature=0.7)) for _ in range(draws)])
    expected = torch.softmax(probs.log().double() / 0.7, -1)
    assert (_frequencies(tokens, 5) - expected).abs().max() < 0.012  # ~3.5 sigma


def test_seeded_distribution_over_steps() -> None:
    """A seeded sample's draws over its positions follow the distribution too (one stream per position)."""
    probs = torch.tensor([[0.6, 0.3, 0.1]])
    params = SamplingParams(temperature=1.0, seed=11)
    sampler = Sampler()
    output: list[int] = []
    tokens = []
    for _ in range(5000):
        tokens.append(sampler(probs.log(), [_row(params, output=output)])[0].token_id)
        output.append(0)
    assert sampler(probs.log(), [_row(params, output=[0] * 7)])[0].token_id == tokens[7]  # a position's draw is fixed
    assert (_frequencies(tokens, 3) - probs[0].double()).abs().max() < 0.025


def test_draw_handles_padding_masked_tail_and_tiny_mass() -> None:
    vocab = 300  # not a multiple of the 128-token draw block
    probs = torch.zeros(4, vocab)
    probs[0, 0] = 1.0  # all mass on the first token
    probs[1, vocab - 1] = 1.0  # ... on the last one, next to the padding
    probs[2, 10:20] = 0.1
    probs[3, 5] = 1e-30  # an unnormalised row with tiny mass
    for u in (0.0, 0.5, 1.0 - 2**-53):
        tokens = _draw(probs, torch.full((4,), u, dtype=torch.float64)).tolist()
        assert tokens[:2] == [0, vocab - 1] and 10 <= tokens[2] < 20 and tokens[3] == 5


def test_draw_frequencies_on_a_large_vocabulary() -> None:
    vocab, draws = 5000, 20000
    probs = torch.full((vocab,), 0.5 / (vocab - 1))
    probs[1234] = 0.5
    tokens = _draw(probs.expand(draws, -1).contiguous(), torch.rand(draws, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    assert abs((tokens == 1234).double().mean().item() - 0.5) < 0.012
    assert abs((tokens >= 2500).double().mean().item() - 0.25) < 0.012  # the uniform tail keeps its share
    assert int(tokens.max()) < vocab


def test_distribution_with_top_p_renormalises() -> None:
    draws = 20000
    probs = torch.tensor([0.45, 0.3, 0.15, 0.1])
    logits = probs.log().expand(draws, -1).contiguous()
    tokens = _sample(logits, [_row(SamplingParams(top_p=0.8)) for _ in range(draws)])
    expected = torch.tensor([0.45, 0.3, 0.15, 0.0], dtype=torch.float64) / 0.9
    assert (_frequencies(tokens, 4) - expected).abs().max() < 0.012
    assert math.isclose(sum(_frequencies(tokens, 4)[:3].tolist()), 1.0)
