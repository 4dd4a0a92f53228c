"""SLO-aware scheduling: ``slo`` and ``sjf``, and the output-length predictor both use.

- Output lengths are predicted online in the spirit of CASTILLO: finished requests' output lengths
  are kept per prompt feature (tenant and power-of-two prompt-length bucket, then the bucket
  alone, then all requests) and a request's remaining length is a quantile of the lengths of its
  feature that are longer than what it has generated so far.
- ``slo`` admission follows Past-Future (LightLLM): with every running request's remaining length
  predicted, the KV demand of the running set plus the candidate is highest just before one of them
  finishes; the candidate is admitted only when that peak fits the cache, so admitted work should
  not need evicting (a prediction that falls short can still force a preemption; see the README).
- ``slo`` ordering follows JITServe: each request has an SLO class (``interactive``: TTFT and TPOT
  targets; ``deadline``: a deadline for the whole response; ``batch``: none; the classes are
  options). The waiting request with the least slack (time to its deadline less the predicted time
  it still needs) goes first; requests without a target come next; requests that can no longer
  make their deadline go last, so they do not make others miss theirs (goodput over FIFO).
- ``sjf``: the shortest predicted output first (no admission control, no aging: long requests can
  wait as long as short ones keep coming)."""

from __future__ import annotations

import bisect
import math
from collections import defaultdict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from loom.request import Request
from loom.scheduler.policy import QueueState, SchedulingPolicy, tenant_of


@dataclass(frozen=True)
class SLOClass:
    """Latency targets in seconds; None: no target."""

    ttft: float | None = None
    tpot: float | None = None
    e2e: float | None = None

    @property
    def has_target(self) -> bool:
        return self.ttft is not None or self.tpot is not None or self.e2e is not None

    def met(self, req: Request) -> bool:
        """Whether finished ``req`` met every target (on the engine's clock)."""
        m = req.metrics
        if m.first_token_time is None or m.finished_time is None:
            return False
        if self.ttft is not None and m.first_token_time - m.arrival_time > self.ttft:
            return False
        n = len(req.output_token_ids)
        if self.tpot is not None and n > 1 and (m.last_token_time - m.first_token_time) / (n - 1) > self.tpot:
            return False
        return self.e2e is None or m.finished_time - m.arrival_time <= self.e2e


DEFAULT_CLASSES = {
    "interactive": {"ttft": 2.0, "tpot": 0.2},
    "deadline": {"e2e": 60.0},
    "batch": {},
}


def parse_classes(raw: Any) -> dict[str, SLOClass]:
    if not isinstance(raw, dict) or not raw:
        raise ValueError("slo policy option classes must be a JSON object of class name -> targets")
    out = {}
    for name, targets in raw.items():
        if not isinstance(targets, dict) or set(targets) - {"ttft", "tpot", "e2e"}:
            raise ValueError(f"SLO class {name!r}: targets are an object with ttft, tpot and/or e2e in seconds")
        for key, value in targets.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 and math.isfinite(value)):
                raise ValueError(f"SLO class {name!r}: {key} must be a finite number of seconds > 0, got {value!r}")
        out[name] = SLOClass(**{k: float(v) for k, v in targets.items()})
    return out


@dataclass(frozen=True)
class PredictorOptions:
    length_quantile: float = 0.95  # of the remaining output length: higher is safer, admits less
    history: int = 1000  # finished requests remembered per feature
    min_samples: int = 8  # a feature with fewer falls back to a coarser one

    def check(self, policy: str) -> None:
        if not 0 < self.length_quantile <= 1:
            raise ValueError(f"{policy} policy option length_quantile must be in (0, 1], got {self.length_quantile}")
        if self.history < 1 or self.min_samples < 1:
            raise ValueError(f"{policy} policy options history and min_samples must be >= 1")


@dataclass(frozen=True)
class SLOOptions(PredictorOptions):
    classes: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_CLASSES))
    default_class: str = "interactive"  # of requests that name none
    admission: bool = True  # Past-Future admission control

    def __post_init__(self) -> None:
        self.check("slo")
        parsed = parse_classes(self.classes)
        if self.default_class not in parsed:
            raise ValueError(f"slo policy option default_class {self.default_class!r} is not one of the classes "
                             f"({', '.join(parsed)})")


@dataclass(frozen=True)
class SJFOptions(PredictorOptions):
    def __post_init__(self) -> None:
        self.check("sjf")


def _bucket(num_prompt_tokens: int) -> int:
    return max(num_prompt_tokens, 1).bit_length()


class LengthPredictor:
    """Output lengths of finished requests per feature, and quantiles of what remains."""

    def __init__(self, options: PredictorOptions) -> None:
        self.options = options
        self._lengths: dict[tuple, deque[int]] = defaultdict(lambda: deque(maxlen=options.history))
        self._sorted: dict[tuple, list[int]] = {}  # the same, sorted; rebuilt after a new length arrives

    @staticmethod
    def _features(tenant: str, num_prompt_tokens: int) -> tuple[tuple, ...]:
        bucket = _bucket(num_prompt_tokens)
        return (("tenant", tenant, bucket), ("bucket", bucket), ("all",))

    def observe(self, req: Request) -> None:
        self.observe_length(tenant_of(req), req.num_prompt_tokens, len(req.output_token_ids))

    def observe_length(self, tenant: str, num_prompt_tokens: int, num_output_tokens: int) -> None:
        """Learn that a request of ``tenant`` with this many prompt tokens made this many tokens."""
        for key in self._features(tenant, num_prompt_tokens):
            self._lengths[key].append(num_output_tokens)
            self._sorted.pop(key, None)

    def remaining(self, req: Request, quantile: float | None = None) -> int | None:
        """Predicted output tokens ``req`` still generates; None without enough history."""
        return self.remaining_for(tenant_of(req), req.num_prompt_tokens, len(req.output_token_ids), quantile)

    def remaining_for(self, tenant: str, num_prompt_tokens: int, done: int, quantile: float | None = None) -> int | None:
        """Predicted output tokens still to come of a request with these features that has made
        ``done``; None without enough history."""
        q = self.options.length_quantile if quantile is None else quantile
        for key in self._features(tenant, num_prompt_tokens):
            lengths = self._lengths.get(key)
            if lengths is None or len(lengths) < self.options.min_samples:
                continue
            ordered = self._sorted.get(key)
            if ordered is None:
                ordered = self._sorted[key] = sorted(lengths)
            first = bisect.bisect_right(ordered, done)  # the lengths longer than what is done
            longer = len(ordered) - first
            if not longer:  # longer than anything seen: expect as many again
                return max(done, 1)
            return ordered[first + min(longer - 1, math.ceil(q * longer) - 1)] - done
        return None


class SJFPolicy(SchedulingPolicy):
    name = "sjf"
    Options = SJFOptions

    def __init__(self, options: Any = None, tenant_weights: dict[str, float] | None = None) -> None:
        super().__init__(options, tenant_weights)
        self.predictor = LengthPredictor(self.options)

    def sort_key(self, req: Request, now: float) -> Any:
        predicted = self.predictor.remaining(req, 0.5)
        return (math.inf if predicted is None else predicted, req.arrival_time, req.sample_index)

    def on_finished(self, req: Request) -> None:
        if req.finish_reason != "abort":
            self.predictor.observe(req)


class SLOPolicy(SchedulingPolicy):
    name = "slo"
    Options = SLOOptions
    observes_steps = True

    def __init__(self, options: Any = None, tenant_weights: dict[str, float] | None = None) -> None:
        super().__init__(options, tenant_weights)
        self.classes = parse_classes(self.options.classes)
        self.predictor = LengthPredictor(self.options)
        self.finished: dict[str, int] = defaultdict(int)
        self.met: dict[str, int] = defaultdict(int)
        self.num_refused = 0  # admissions Past-Future held back
        self._prefill_seconds_per_token = 0.0  # moving averages of this machine's step costs
        self._decode_step_seconds = 0.0

    def class_of(self, req: Request) -> str:
        return req.slo_class or self.options.default_class

    def check_request(self, req: Request) -> None:
        super().check_request(req)
        if self.class_of(req) not in self.classes:
            raise ValueError(f"unknown SLO class {req.slo_class!r} (the slo policy's classes: {', '.join(self.classes)})")

    # -- time estimates -----------------------------------------------------------------------
    def on_step(self, num_tokens: int, num_decodes: int, seconds: float) -> None:
        if num_tokens == num_decodes and num_decodes:
            self._decode_step_seconds = _ema(self._decode_step_seconds, seconds)
        elif num_tokens - num_decodes >= 32:
            self._prefill_seconds_per_token = _ema(self._prefill_seconds_per_token, seconds / num_tokens)

    def slack(self, req: Request, now: float) -> float:
        """Seconds to spare before ``req`` misses its class's first deadline, given the predicted
        time it still needs; inf without a target."""
        cls = self.classes[self.class_of(req)]
        started = req.metrics.first_token_time is not None
        prefill = 0.0 if started else (req.num_tokens - req.num_computed_tokens) * self._prefill_seconds_per_token
        if cls.ttft is not None and not started:
            return req.arrival_time + cls.ttft - now - prefill
        if cls.e2e is not None:
            remaining = self.predictor.remaining(req, 0.5)
            decode = (remaining or 0) * self._decode_step_seconds
            return req.arrival_time + cls.e2e - now - prefill - decode
        return 0.0 if cls.tpot is not None and started else math.inf  # a preempted stream waits on us

    def sort_key(self, req: Request, now: float) -> Any:
        slack = self.slack(req, now)
        return (0, slack, req.arrival_time) if slack >= 0 else (1, req.arrival_time, 0.0)

    # -- admission ----------------------------------------------------------------------------
    def next_request(self, waiting: Sequence[Request], state: QueueState) -> Request | None:
        req = super().next_request(waiting, state)
        if req is None or not self.options.admission or not state.running:
            return req
        if self.future_peak_tokens([*state.running, req], state.block_size) > state.capacity_tokens:
            self.num_refused += 1
            return None
        return req

    def future_peak_tokens(self, requests: Sequence[Request], block_size: int = 1) -> int:
        """The most KV tokens ``requests`` will hold at once, each growing by one token a step
        until its predicted end (no history: its ``max_tokens`` cap), when its tokens are freed."""
        ends = sorted((self._remaining(r), r.num_tokens) for r in requests)
        peak = held = 0
        for count, (remaining, tokens) in enumerate(reversed(ends), start=1):
            held += tokens + block_size - 1  # a request's last block may be partly empty
            peak = max(peak, held + count * remaining)  # just before the request with this end finishes
        return peak

    def _remaining(self, req: Request) -> int:
        cap = max(req.max_total_tokens - req.num_tokens, 0)
        predicted = self.predictor.remaining(req)
        return cap if predicted is None else min(cap, predicted)

    def select_victim(self, candidates: Sequence[Request], now: float) -> Request:
        """Work without a target first, then the latest arrival."""
        return max(candidates, key=lambda r: (not self.classes[self.class_of(r)].has_target, r.arrival_time,
                                              r.sample_index))

    def on_finished(self, req: Request) -> None:
        if req.finish_reason == "abort":
            return
        self.predictor.observe(req)
        name = self.class_of(req)
        self.finished[name] += 1
        self.met[name] += self.classes[name].met(req)

    def slo_report(self) -> dict[str, tuple[int, int]]:
        return {name: (self.finished[name], self.met[name]) for name in self.finished}


def _ema(previous: float, value: float, weight: float = 0.1) -> float:
    return value if previous == 0.0 else previous + weight * (value - previous)
