"""SmartSpec-style choice of the speculation length: each step, the number of draft tokens per
request (0 included) that maximises predicted goodput, the tokens the step is expected to produce
per second of step time.

A request whose drafts are each accepted with probability ``a`` (independently, until the first
rejection) and that gets ``k`` of them yields ``1 + a + ... + a^k`` tokens. The decodes' share of
the step costs what their rows add to the target's forward pass (``StepCostModel``, measured; beside
a prefill chunk, only the rows' own cost: the chunk reads the weights anyway) plus what proposing
costs (a draft model's passes, and the catching up a draft model must do before its first draft for
a request, spread over that request's remaining tokens). Acceptance rates are moving averages per
request, starting from the proposer's own average."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import overload

import numpy as np
from numpy.typing import ArrayLike

PROPOSER_PRIOR = 0.5  # a proposer's acceptance rate before anything was measured
PRIOR_WEIGHT = 2.0  # how many observed positions the proposer's average is worth for a new request
REQUEST_DECAY = 0.7  # per verification: a request's older observations fade (its text changes)
PROPOSER_DECAY = 0.98
CORRECTION_DECAY = 0.9  # per decode step: the model's correction to the measured curve
# Drafts must be predicted to raise goodput by this share: smaller predicted gains are within the
# cost model's error and the proposer's own time (at 64 requests they measured as losses).
MIN_GAIN = 0.05
# After this many steps in which the controller gave no request a draft, one request gets one: the
# acceptance it measures is what lets speculation start again (a rate that never gets measured
# stays at its prior, which may be too low to ever pay).
EXPLORE_EVERY = 32
# A proposer measured over fewer draft positions than this is tried at once, at its full length: one
# early rejection (say, of a short sampled first request) would otherwise hold its rate below what
# pays until the next try, EXPLORE_EVERY steps later.
MIN_MEASURED = 4


class StepCostModel:
    """Seconds of a forward pass as a function of its query tokens and of the context they attend
    to: a curve measured at start-up at a few sizes over a short context (interpolated linearly,
    extrapolated along the last segment) plus ``per_context_token`` seconds per query row and
    token of context it reads (attention: a verification row reads its whole sequence, which on a
    CPU costs as much as a row's matrix products at a few thousand tokens). All of it is scaled by a
    moving average of observed / predicted over the decode steps actually run."""

    def __init__(self, points: Sequence[tuple[int, float]], per_context_token: float = 0.0) -> None:
        if not points:
            raise ValueError("a step cost model needs at least one measured point")
        pts = sorted(dict(sorted(points)).items())  # one point per size: the dearest measured
        self.tokens = [n for n, _ in pts]
        # Non-decreasing (a noisy probe may measure a bigger pass as cheaper): a row never costs less than nothing.
        self.seconds = list(itertools.accumulate((max(s, 1e-9) for _, s in pts), max))
        self._xs, self._ys = xs, ys = np.asarray(self.tokens, float), np.asarray(self.seconds, float)
        # the slope past the last point (through the origin for a single point)
        self._tail = float((ys[-1] - ys[-2]) / (xs[-1] - xs[-2]) if len(xs) > 1 else ys[0] / xs[0])
        self.per_context_token = max(per_context_token, 0.0)
        self.correction = 1.0

    def _curve(self, n: ArrayLike) -> np.ndarray:
        # np.interp holds the end values outside the points: past the last, go on along the last segment.
        return np.interp(n, self._xs, self._ys) + self._tail * np.maximum(np.subtract(n, self._xs[-1]), 0.0)

    def _model(self, n: ArrayLike, context: ArrayLike) -> np.ndarray:
        return self._curve(n) + self.per_context_token * np.asarray(context, float)

    @overload
    def __call__(self, n: float, context: float = 0.0) -> float: ...
    @overload
    def __call__(self, n: np.ndarray, context: ArrayLike = 0.0) -> np.ndarray: ...

    def __call__(self, n: ArrayLike, context: ArrayLike = 0.0) -> float | np.ndarray:
        """Seconds for ``n`` query tokens whose rows read ``context`` tokens of context in all
        (elementwise for arrays: one pass each)."""
        seconds = self.correction * self._model(n, context)
        return seconds if seconds.ndim else float(seconds)

    def observe(self, n: int, seconds: float, context: float = 0.0) -> None:
        ratio = seconds / float(self._model(n, context))
        self.correction = CORRECTION_DECAY * self.correction + (1 - CORRECTION_DECAY) * min(max(ratio, 0.1), 10.0)


@dataclass
class Acceptance:
    """A decayed count of accepted and tried draft positions."""

    accepted: float = 0.0
    tried: float = 0.0

    def rate(self, prior: float, prior_weight: float) -> float:
        return (self.accepted + prior * prior_weight) / (self.tried + prior_weight)

    def observe(self, accepted: int, tried: int, decay: float) -> None:
        self.accepted = decay * self.accepted + accepted
        self.tried = decay * self.tried + tried


def choose_lengths(rates: Sequence[float], limits: Sequence[int], base_tokens: int, budget: int,
                   step_cost: StepCostModel, pass_cost: StepCostModel | None = None,
                   contexts: Sequence[int] = (), base_context: int = 0, min_gain: float = MIN_GAIN,
                   prefill_tokens: int = 0, setup_per_token: Sequence[float] = ()) -> list[int]:
    """Draft tokens per request maximising the decodes' goodput, ``sum(expected tokens) / (what
    their rows add to the step + proposing)``. ``base_tokens``, ``base_context``: the decodes' query
    tokens and the context their rows read without drafts (a decode's row reads its sequence);
    ``contexts[i]``: what each draft row of request ``i`` reads (its sequence's length);
    ``prefill_tokens``: the prefill chunks beside them in the step (their cost is not the decodes'
    to pay, and they take their share of the budget first); ``budget``: the step's token budget;
    ``pass_cost``: a draft model's forward pass over a number of requests (its ``j``-th pass serves
    the requests given ``j`` or more drafts), None when proposing is free; ``setup_per_token[i]``:
    seconds charged per expected token of request ``i`` once it gets a draft (a draft model's
    catching up, spread over the request's remaining tokens); ``min_gain``: drafts must be predicted
    to beat no drafts by this share.

    Adding a draft to a request raises its expected tokens by ``rate^(k+1)``, less for each further
    one, so the best lengths for a given total are the largest such gains: the increments are
    taken in that order (requests with a set-up charge last) and the best prefix wins (the cost
    curve is not convex: speculation may pay only past a point)."""
    n_req = len(rates)
    room = max(budget - base_tokens - prefill_tokens, 0)
    if not room or not any(limits):
        return [0] * n_req
    prefill_cost = step_cost(prefill_tokens) if prefill_tokens else 0.0

    def decode_cost(tokens: ArrayLike, context: ArrayLike) -> np.ndarray:
        if not prefill_tokens:
            return np.asarray(step_cost(np.asarray(tokens, float), context))
        return np.maximum(step_cost(prefill_tokens + np.asarray(tokens, float), context) - prefill_cost, 1e-9)

    # A request's set-up charge moves all its increments back (by its share of what its first
    # draft costs: near 1 where the charge dwarfs a row's own cost), so that requests the proposer
    # has caught up on come first; a request's own increments keep their order.
    base_cost, one_more = decode_cost(np.array([base_tokens, base_tokens + 1]), base_context)
    setup = np.asarray(setup_per_token, float) if len(setup_per_token) else np.zeros(n_req)
    penalty = np.divide(setup, setup + (one_more - base_cost), out=np.zeros(n_req), where=setup > 0)
    limits_ = np.asarray(limits, dtype=np.int64)
    req = np.repeat(np.arange(n_req), limits_)  # each increment's request, and which of its drafts it is
    depth = np.arange(len(req)) - np.repeat(np.cumsum(limits_) - limits_, limits_) + 1
    gain = np.asarray(rates, float)[req] ** depth
    # the largest first; on a tie (a rate of 1) a request's earlier drafts first
    order = np.lexsort((-req, depth, -(gain - penalty[req])))[:room]
    req, depth, gain = req[order], depth[order], gain[order]
    tokens = base_tokens + np.arange(1, len(order) + 1)
    context = base_context + np.cumsum(np.asarray(contexts, float)[req]) if len(contexts) else base_context
    produced = n_req + np.cumsum(gain)
    proposing = np.cumsum(setup[req] * (gain + (depth == 1)))  # its own token too, once it drafts
    if pass_cost is not None:
        # the j-th draft pass serves the requests given j or more drafts: an increment adds one to its pass
        served = _earlier_equal(depth)
        proposing += np.cumsum(pass_cost(served + 1.0) - np.where(served > 0, pass_cost(served.astype(float)), 0.0))
    goodput = produced / (decode_cost(tokens, context) + proposing)
    baseline = n_req / base_cost * (1 + min_gain)
    best_n = int(np.argmax(goodput)) + 1 if goodput.max() > baseline else 0
    return np.bincount(req[:best_n], minlength=n_req).tolist()


def _earlier_equal(values: np.ndarray) -> np.ndarray:
    """For each element, how many before it hold the same value."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    out = np.empty_like(values)
    out[order] = np.arange(len(values)) - np.searchsorted(ordered, ordered, side="left")
    return out
