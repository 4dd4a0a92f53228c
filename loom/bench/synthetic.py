"""Synthetic workloads: arrival processes and length distributions.

Arrivals: Poisson (exponential gaps) or Gamma gaps with a burstiness knob, the
model BurstGPT fits to production traffic. With shape ``k = burstiness`` and
mean gap ``1 / rate``, the coefficient of variation of the gaps is
``1 / sqrt(k)``: ``k = 1`` is Poisson, ``k < 1`` burstier, ``k > 1`` smoother.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from loom.bench.workload import TraceRequest, Workload


def arrival_times(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """``n`` arrival times: the first at 0, then Gamma(k, 1/(rate k)) gaps.

    ``rate = inf`` sends everything at time 0 (a closed batch).
    """
    if n < 1:
        raise ValueError(f"number of requests must be >= 1, got {n}")
    if not rate > 0:
        raise ValueError(f"rate must be > 0 req/s, got {rate}")
    if not burstiness > 0 or not math.isfinite(burstiness):
        raise ValueError(f"burstiness (gamma shape) must be a finite number > 0, got {burstiness}")
    if math.isinf(rate):
        return [0.0] * n
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n - 1)
    return [0.0, *np.cumsum(gaps).tolist()]


def with_arrivals(requests: Sequence[TraceRequest], times: Sequence[float]) -> Workload:
    """Give the requests new arrival times, pairwise."""
    if len(times) != len(requests):
        raise ValueError(f"{len(times)} arrival times for {len(requests)} requests")
    return [replace(r, arrival=float(t)) for r, t in zip(requests, times)]


@dataclass(frozen=True)
class LengthSpec:
    """How to draw (input, output) lengths.

    ``fixed``: always ``(input_len, output_len)``. ``uniform``: each uniform in
    ``[len * (1 - range_ratio), len * (1 + range_ratio)]`` (vLLM's random
    dataset). ``trace``: pairs drawn with replacement from ``pairs``, so input
    and output keep their joint distribution.
    """

    kind: str = "fixed"
    input_len: int = 128
    output_len: int = 128
    range_ratio: float = 0.0
    pairs: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in ("fixed", "uniform", "trace"):
            raise ValueError(f"length distribution must be fixed, uniform or trace, got {self.kind!r}")
        if self.input_len < 1 or self.output_len < 1:
            raise ValueError(f"lengths must be >= 1, got input {self.input_len}, output {self.output_len}")
        if not 0.0 <= self.range_ratio < 1.0:
            raise ValueError(f"range ratio must be in [0, 1), got {self.range_ratio}")
        if self.kind == "trace" and not self.pairs:
            raise ValueError("the trace length distribution needs (input, output) pairs to sample")


def sample_lengths(spec: LengthSpec, n: int, seed: int = 0) -> list[tuple[int, int]]:
    """``n`` (input, output) length pairs drawn as ``spec`` says."""
    rng = np.random.default_rng(seed)
    if spec.kind == "fixed":
        return [(spec.input_len, spec.output_len)] * n
    if spec.kind == "uniform":

        def draw(center: int) -> np.ndarray:
            lo = max(1, math.floor(center * (1 - spec.range_ratio)))
            hi = max(lo, math.ceil(center * (1 + spec.range_ratio)))
            return rng.integers(lo, hi + 1, size=n)

        return list(zip(draw(spec.input_len).tolist(), draw(spec.output_len).tolist()))
    idx = rng.integers(0, len(spec.pairs), size=n)
    return [spec.pairs[i] for i in idx.tolist()]


def synthetic(n: int, rate: float, lengths: LengthSpec, burstiness: float = 1.0, seed: int = 0) -> Workload:
    """A synthetic workload of ``n`` requests."""
    times = arrival_times(n, rate, burstiness, seed)
    pairs = sample_lengths(lengths, n, seed + 1)
    return [TraceRequest(arrival=t, input_len=i, output_len=o) for t, (i, o) in zip(times, pairs)]
