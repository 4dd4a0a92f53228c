"""The speculation-length controller: expected tokens, the step cost model, and the choice of k."""

from __future__ import annotations

import numpy as np
import pytest

from loom.spec.controller import Acceptance, StepCostModel, choose_lengths


def steep() -> StepCostModel:
    """Cost proportional to tokens: no draft ever pays."""
    return StepCostModel([(1, 0.001), (512, 0.512)])


def dear_row() -> StepCostModel:
    """A draft row costs 15% of a step: drafts pay if accepted often, not at a rate measured near 0."""
    return StepCostModel([(1, 0.010), (2, 0.0115), (512, 0.600)])


def test_step_cost_model_interpolates_and_corrects():
    cost = StepCostModel([(1, 0.010), (8, 0.011), (64, 0.040)])
    assert cost(1) == pytest.approx(0.010) and cost(4.5) == pytest.approx(0.0105)
    assert cost(128) == pytest.approx(0.040 + (0.029 / 56) * 64)  # along the last segment
    for _ in range(100):
        cost.observe(8, 0.022)  # steps take twice what was measured
    assert cost(8) == pytest.approx(0.022, rel=0.01)
    with pytest.raises(ValueError):
        StepCostModel([])


def test_step_cost_model_takes_arrays():
    """The controller prices every prefix of its increments at once: an array gives what each
    size alone would, below the first point, between points and past the last."""
    cost = StepCostModel([(2, 0.010), (8, 0.011), (64, 0.040)], per_context_token=1e-6)
    sizes, contexts = np.array([1, 2, 5, 8, 64, 100]), np.array([0, 10, 100, 1000, 0, 5])
    assert cost(sizes, contexts) == pytest.approx([cost(int(n), int(c)) for n, c in zip(sizes, contexts)])
    assert cost(1) == cost(2) == pytest.approx(0.010)  # no cheaper than the smallest pass measured
    single = StepCostModel([(4, 0.008)])  # one point: proportional past it
    assert single(2) == pytest.approx(0.008) and single(np.array([8.0]))[0] == pytest.approx(0.016)
    assert StepCostModel([(4, 0.010), (4, 0.012), (8, 0.020)])(4) == pytest.approx(0.012)  # the dearer of two


def test_acceptance_starts_at_the_prior_and_learns():
    a = Acceptance()
    assert a.rate(0.5, 2.0) == 0.5
    for _ in range(20):
        a.observe(accepted=4, tried=4, decay=0.7)
    assert a.rate(0.5, 2.0) > 0.9


def test_memory_bound_steps_speculate_and_compute_bound_ones_do_not():
    flat = StepCostModel([(1, 0.010), (64, 0.011), (512, 0.100)])  # weight-bound: rows are almost free
    assert choose_lengths([0.8], [8], 1, 512, flat) == [8]
    assert choose_lengths([0.05], [8], 1, 512, flat, min_gain=0)[0] >= 1  # a poor guess costs next to nothing
    assert choose_lengths([0.05], [8], 1, 512, flat) == [0]  # but gains under MIN_GAIN are not worth it
    assert choose_lengths([0.8] * 64, [8] * 64, 64, 512, steep()) == [0] * 64
    # In between: the likelier requests get drafts first, and never past the token budget.
    mid = StepCostModel([(1, 0.010), (16, 0.012), (64, 0.030), (512, 0.250)])
    ks = choose_lengths([0.9] * 8 + [0.1] * 8, [8] * 16, 16, 40, mid)
    assert sum(ks) <= 40 - 16 and min(ks[:8]) >= max(ks[8:])


def test_a_draft_models_passes_cost_speculation():
    flat = StepCostModel([(1, 0.010), (64, 0.011)])
    free = choose_lengths([0.6], [8], 1, 512, flat)
    costly = choose_lengths([0.6], [8], 1, 512, flat, StepCostModel([(1, 0.004), (64, 0.005)]))
    assert free[0] > costly[0] >= 1
    assert choose_lengths([0.6], [8], 1, 512, flat, StepCostModel([(1, 0.050)])) == [0]


def test_beside_a_prefill_chunk_the_decodes_pay_only_their_rows():
    """A step that prefills reads the weights anyway, so the decodes' own cost is what their rows
    add; beside it a draft model's passes are dear, where alone they would pay."""
    cost = StepCostModel([(1, 0.010), (64, 0.011), (512, 0.500)])
    passes = StepCostModel([(1, 0.004), (64, 0.005)])
    assert choose_lengths([0.8] * 4, [8] * 4, 4, 512, cost, passes) == [2] * 4
    assert choose_lengths([0.8] * 4, [8] * 4, 4, 512, cost, passes, prefill_tokens=400) == [0] * 4
    # The chunk takes its share of the budget first.
    assert sum(choose_lengths([0.9] * 4, [8] * 4, 4, 512, cost, prefill_tokens=500)) <= 8


def test_a_proposers_set_up_is_charged_to_the_tokens_it_serves():
    flat = StepCostModel([(1, 0.010), (64, 0.011)])
    passes = StepCostModel([(1, 0.002), (64, 0.003)])
    assert choose_lengths([0.9], [8], 1, 512, flat, passes, setup_per_token=[0.002]) == [7]
    assert choose_lengths([0.9], [8], 1, 512, flat, passes, setup_per_token=[0.006]) == [0]
    # Of two requests alike, the one the proposer has caught up on gets the drafts.
    assert choose_lengths([0.9] * 2, [8] * 2, 2, 512, flat, passes, setup_per_token=[0.004, 0.0]) == [0, 5]


def test_long_contexts_make_draft_rows_dearer():
    """A draft row reads its whole sequence: over a long context a row costs more than the curve
    measured over a short one, and fewer drafts pay."""
    cost = StepCostModel([(1, 0.010), (8, 0.012), (64, 0.040)], per_context_token=1e-6)
    assert cost(1, 1000) == pytest.approx(0.011)
    short = choose_lengths([0.5], [8], 1, 512, cost, contexts=[100], base_context=100)
    long = choose_lengths([0.5], [8], 1, 512, cost, contexts=[4000], base_context=4000)
    assert short[0] > long[0]
    cost.observe(1, 0.022, 1000)  # twice the prediction: the correction moves towards 2
    assert 1.0 < cost.correction < 2.0


def _speculator(cost: StepCostModel, setup_seconds: float = 0.0):
    """A speculator over a proposer that always has drafts (after ``setup_seconds`` of set-up for
    each request), with the given step cost, and a running decode for it."""
    from loom.request import Request, RequestStatus
    from loom.sampling import SamplingParams
    from loom.spec import Draft, Proposer, Speculator

    class Always(Proposer):
        name = "always"

        def setup_seconds(self, requests):
            return [setup_seconds] * len(requests)

        def propose(self, requests, ks):
            return [Draft((5,) * k) for k in ks]

    spec = Speculator(Always(), 4, None, cost, 512)
    req = Request("r", [1, 2, 3], SamplingParams(), status=RequestStatus.RUNNING, num_computed_tokens=2,
                  max_total_tokens=100)
    return spec, req


def test_the_speculator_tries_one_draft_after_a_run_of_idle_steps():
    """A proposer whose measured acceptance does not pay gets no drafts; after EXPLORE_EVERY steps
    without drafts one request gets one, so that its acceptance is measured again."""
    from loom.spec.controller import EXPLORE_EVERY, MIN_MEASURED

    spec, req = _speculator(dear_row())
    spec.proposer_acceptance.observe(0, MIN_MEASURED, 1.0)  # measured (all rejected): no longer at its prior
    tried = []
    for _ in range(2 * EXPLORE_EVERY):
        spec.prepare([req])
        tried.append(len(req.draft_token_ids))
    assert tried.count(1) == 2 and sum(tried) == 2


def test_no_tries_where_a_request_s_set_up_costs_more_than_the_step():
    """A try costs what the proposer must do before its first draft: where that is a draft model's
    prefill of the whole prompt, dearer than the step, a try's measurement is not worth it."""
    from loom.spec.controller import EXPLORE_EVERY, MIN_MEASURED

    for setup, tries in ((0.005, 2), (0.050, 0)):  # the step costs 10 ms
        spec, req = _speculator(dear_row(), setup)
        spec.proposer_acceptance.observe(0, MIN_MEASURED, 1.0)
        tried = []
        for _ in range(2 * EXPLORE_EVERY):
            spec.prepare([req])
            tried.append(len(req.draft_token_ids))
        assert sum(tried) == tries


def test_no_tries_where_drafts_accepted_every_time_would_not_pay():
    """Where the cost holds drafts back (a step compute-bound, or a draft model's catching up
    dearer than what it serves), a try would only measure acceptance again: none is made."""
    from loom.spec.controller import EXPLORE_EVERY, MIN_MEASURED

    spec, req = _speculator(steep())
    spec.proposer_acceptance.observe(0, MIN_MEASURED, 1.0)
    for _ in range(2 * EXPLORE_EVERY):
        spec.prepare([req])
        assert not req.draft_token_ids


def test_a_proposer_barely_measured_gets_full_length_tries_at_once():
    """Before MIN_MEASURED draft positions are verified the proposer's rate is mostly its prior, at
    which drafts may never pay: each step tries as many drafts as the proposer has for one request,
    and once enough are verified (here: every draft rejected) the controller goes back to its
    prediction."""
    from loom.spec.controller import MIN_MEASURED
    from loom.step import RequestResult, ScheduledRequest, StepPlan, StepResult

    spec, req = _speculator(steep())
    tries = 0
    while spec.proposer_acceptance.tried < MIN_MEASURED:
        spec.prepare([req])
        assert list(req.draft_token_ids) == [5, 5, 5, 5]
        plan = StepPlan([ScheduledRequest(req, 2, 1, sample=True, draft_token_ids=tuple(req.draft_token_ids))])
        spec.observe(plan, StepResult({"r": RequestResult((7,))}, 0.0), 0.005)  # the first draft rejected
        tries += 1
    assert tries in (MIN_MEASURED, MIN_MEASURED + 1)  # one position per try, the older ones decayed
    spec.prepare([req])
    assert not req.draft_token_ids


def test_drafts_accepted_every_time_are_taken_in_order():
    """With a rate of 1 every increment gains as much: a request's first draft still comes first."""
    flat = StepCostModel([(1, 0.010), (64, 0.011)])
    assert choose_lengths([1.0] * 3, [4, 2, 3], 3, 512, flat, StepCostModel([(1, 0.0001)])) == [4, 2, 3]
    # A draft model's pass for one request's fourth draft costs more than the token it brings.
    assert choose_lengths([1.0] * 3, [4, 2, 3], 3, 512, flat, StepCostModel([(1, 0.002), (64, 0.003)])) == [3, 2, 3]
