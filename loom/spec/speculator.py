"""What the engine runs around each step when speculating: before it, pick each running decode's
number of draft tokens and ask the proposer for them; after it, learn from what was accepted and
from what the step cost."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from loom.request import Request, RequestStatus
from loom.spec.controller import (EXPLORE_EVERY, MIN_MEASURED, PRIOR_WEIGHT, PROPOSER_DECAY, PROPOSER_PRIOR,
                                  REQUEST_DECAY, Acceptance, StepCostModel, choose_lengths)
from loom.spec.proposer import Draft, Proposer
from loom.step import StepPlan, StepResult


@dataclass(frozen=True)
class SpecStats:
    """Counters since start-up (``draft_tokens`` counts the drafts a step verified, after the
    scheduler's cuts; a tree counts each of its tokens)."""

    method: str
    draft_tokens: int = 0
    accepted_tokens: int = 0
    verifications: int = 0  # request-steps that verified at least one draft
    steps_without_drafts: int = 0  # decode request-steps where the controller chose k = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Accepted drafts per verification (the step's own token not counted)."""
        return self.accepted_tokens / self.verifications if self.verifications else 0.0


class Speculator:
    """``fixed_k``: that many drafts for every decode that has them (None: chosen per step by
    ``choose_lengths``, which needs ``step_cost``). ``trees``: whether the worker can verify a
    tree (not with a KIVI cache, whose open group cannot hold branches); otherwise a tree's first
    branch is sent."""

    def __init__(self, proposer: Proposer, max_k: int, fixed_k: int | None, step_cost: StepCostModel | None,
                 budget: int, trees: bool = True) -> None:
        if fixed_k is None and step_cost is None:
            raise ValueError("choosing the speculation length needs a step cost model")
        self.proposer = proposer
        self.max_k = max_k if fixed_k is None else fixed_k
        self.fixed_k = fixed_k
        self.step_cost = step_cost
        self.budget = budget
        self.trees = trees and proposer.makes_trees
        # A tree is verified as a chunk with a mask, which costs more than the chain-shaped rows the
        # start-up curve measured: steps with a tree keep their own correction.
        self.tree_cost = (StepCostModel(list(zip(step_cost.tokens, step_cost.seconds)), step_cost.per_context_token)
                          if step_cost and self.trees else None)
        self.proposer_acceptance = Acceptance()
        self.acceptance: dict[str, Acceptance] = {}
        self.draft_tokens = self.accepted_tokens = self.verifications = self.steps_without_drafts = 0
        self.idle_steps = 0  # steps in a row in which the controller chose no draft

    def stats(self) -> SpecStats:
        return SpecStats(self.proposer.name, self.draft_tokens, self.accepted_tokens, self.verifications,
                         self.steps_without_drafts)

    def _candidates(self, running: Sequence[Request]) -> list[Request]:
        """Running decodes that may take drafts: not swapping in, no forks waiting, room left."""
        return [r for r in running if r.status is RequestStatus.RUNNING and r.num_computed_tokens == r.num_tokens - 1
                and not r.swap_in_pending and not r.forks and not r.embed and r.max_total_tokens - r.num_tokens > 1]

    def prepare(self, running: Sequence[Request], prefill_backlog: Callable[[], int] | None = None) -> None:
        """Set ``draft_token_ids`` (and ``draft_parents`` for a tree) on the running decodes;
        ``prefill_backlog``: the prompt tokens the step may take beside them (the scheduler's
        estimate, asked only when the lengths are chosen)."""
        for r in running:
            r.draft_token_ids.clear()  # unscheduled last step: stale now
            r.draft_parents.clear()
        reqs = self._candidates(running)
        if not reqs:
            return
        room = [min(self.max_k, r.max_total_tokens - r.num_tokens - 1) for r in reqs]
        if self.fixed_k is not None:
            ks = self._limits(reqs, room)
        else:
            ks = self._choose(reqs, room, prefill_backlog() if prefill_backlog is not None else 0)
        self.steps_without_drafts += ks.count(0)
        chosen = [(r, k) for r, k in zip(reqs, ks) if k > 0]
        if not chosen:
            return
        drafts = self.proposer.propose([r for r, _ in chosen], [k for _, k in chosen])
        for (req, k), draft in zip(chosen, drafts):
            if draft.parents and (not self.trees or req.grammar is not None):
                draft = draft.chain()
            draft = draft.cut(k)
            req.draft_token_ids[:] = draft.token_ids
            req.draft_parents[:] = draft.parents

    def _limits(self, reqs: list[Request], room: list[int]) -> list[int]:
        """What the proposer could propose for each request, within its room."""
        return [min(k, n) for k, n in zip(self.proposer.limits(reqs, max(room)), room)]

    def _choose(self, reqs: list[Request], room: list[int], prefill_tokens: int) -> list[int]:
        """Each request's number of drafts by predicted goodput; the proposer is not asked when no
        draft could pay even if every one were accepted as often as the likeliest request's, except
        to measure it: while it has been measured over fewer than MIN_MEASURED positions, and after
        EXPLORE_EVERY steps without drafts, when drafts accepted every time would pay."""
        cost = self.tree_cost if self.tree_cost is not None else self.step_cost
        assert cost is not None
        prior = self.proposer_acceptance.rate(PROPOSER_PRIOR, PRIOR_WEIGHT)
        rates = [self.acceptance.get(r.request_id, Acceptance()).rate(prior, PRIOR_WEIGHT) for r in reqs]
        base = len(reqs)
        prefill = min(prefill_tokens, max(self.budget - base, 0))
        contexts = [r.num_tokens for r in reqs]
        base_context = sum(contexts)
        # A proposer's set-up for a request (a draft model catching up) serves the drafts of all the
        # request's remaining tokens: each expected token carries its share.
        setup_seconds = self.proposer.setup_seconds(reqs)
        setup = [s / max(r.max_total_tokens - r.num_tokens, 1) for s, r in zip(setup_seconds, reqs)]

        def lengths(rates: list[float], limits: list[int], setup: list[float]) -> list[int]:
            return choose_lengths(rates, limits, base, self.budget, cost, self.proposer.pass_cost, contexts,
                                  base_context, prefill_tokens=prefill, setup_per_token=setup)

        barely_measured = self.proposer_acceptance.tried < MIN_MEASURED
        explore = barely_measured or self.idle_steps + 1 >= EXPLORE_EVERY
        cheapest = [min(setup)] * len(reqs)
        # Without a try, the likeliest rate must pay; a try is pointless where even a rate of 1
        # would not (the cost holds drafts back then, not the rate a try would measure).
        bound = [1.0] * len(reqs) if explore else [max(rates)] * len(reqs)
        if not barely_measured and not any(lengths(bound, room, cheapest)):
            self.idle_steps += 1
            return [0] * len(reqs)
        limits = self._limits(reqs, room)
        ks = lengths(rates, limits, setup)
        if explore and not any(ks) and any(limits):
            # A proposer barely measured gets a full-length try at once, which measures as many
            # positions as a step can (one draft would leave its rate near the prior, which may
            # never pay); later tries are one draft, as cheap as a try can be, for the request whose
            # set-up costs least, and none where that set-up alone costs more than the step.
            i = min((i for i in range(len(reqs)) if limits[i]), key=lambda i: (setup[i], -rates[i]))
            if barely_measured:
                ks[i] = limits[i]
            elif setup_seconds[i] <= cost(base, base_context):
                ks[i] = 1
        self.idle_steps = 0 if any(ks) else self.idle_steps + 1
        return ks

    def observe(self, plan: StepPlan, result: StepResult, seconds: float) -> None:
        """Learn acceptance from the verified drafts, and the step's cost if it only decoded."""
        decode_only = True
        for s in plan.scheduled:
            if not s.is_decode:
                decode_only = False
            if not s.draft_token_ids:
                continue
            res = result.results.get(s.request.request_id)
            accepted = max(len(res.token_ids) - 1, 0) if res is not None else 0
            depth = Draft(s.draft_token_ids, s.draft_parents).depth
            tried = accepted + (accepted < depth)
            self.draft_tokens += len(s.draft_token_ids)
            self.accepted_tokens += accepted
            self.verifications += 1
            self.proposer_acceptance.observe(accepted, tried, PROPOSER_DECAY)
            self.acceptance.setdefault(s.request.request_id, Acceptance()).observe(accepted, tried, REQUEST_DECAY)
        tokens = sum(s.num_query_tokens for s in plan.scheduled)
        context = sum(s.num_query_tokens * (s.start + 1) for s in plan.scheduled)
        if self.tree_cost is not None and any(s.draft_parents for s in plan.scheduled):
            self.tree_cost.observe(tokens, seconds, context)
        elif decode_only and plan.scheduled and self.step_cost is not None:
            self.step_cost.observe(tokens, seconds, context)

    def forget(self, request_ids: Iterable[str]) -> None:
        ids = list(request_ids)
        for rid in ids:
            self.acceptance.pop(rid, None)
        self.proposer.forget(ids)
