"""Latency statistics, SLOs and goodput, and time series for plots.

Goodput is the DistServe notion as vLLM's benchmark reports it: requests per
second, over the whole run, that completed and met every SLO given. A failed
request never meets an SLO. A one-token response has no TPOT and so cannot
miss a TPOT SLO.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from loom.bench.client import RequestRecord, RunResult

PERCENTILES = (50, 90, 99)
_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}
_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(us|ms|s|m)\s*$")


def parse_duration(text: str) -> float:
    """``"200ms"`` -> 0.2 seconds. A unit (us, ms, s, m) is required."""
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"bad duration {text!r}: expected a number with a unit (us, ms, s or m), e.g. 200ms")
    return float(m.group(1)) * _UNITS[m.group(2)]


@dataclass(frozen=True)
class SLO:
    """Per-request latency targets in seconds; ``None`` means no target."""

    ttft: float | None = None
    tpot: float | None = None
    e2e: float | None = None

    @staticmethod
    def parse(text: str | None) -> SLO:
        """``"ttft=2s,tpot=200ms,e2e=30s"``; empty or None gives no targets."""
        if not text or not text.strip():
            return SLO()
        values: dict[str, float] = {}
        for part in text.split(","):
            key, sep, value = part.partition("=")
            key = key.strip().lower()
            if not sep or key not in ("ttft", "tpot", "e2e"):
                raise ValueError(f"bad SLO item {part.strip()!r}: expected ttft=, tpot= or e2e= with a duration")
            if key in values:
                raise ValueError(f"SLO {key} given twice")
            seconds = parse_duration(value)
            if seconds <= 0:
                raise ValueError(f"SLO {key} must be > 0, got {value.strip()}")
            values[key] = seconds
        return SLO(**values)

    @property
    def empty(self) -> bool:
        return self.ttft is None and self.tpot is None and self.e2e is None

    def met(self, rec: RequestRecord) -> bool:
        if not rec.ok:
            return False
        ttft, tpot = rec.ttft, rec.tpot
        if self.ttft is not None and (ttft is None or ttft > self.ttft):
            return False
        if self.tpot is not None and tpot is not None and tpot > self.tpot:
            return False
        if self.e2e is not None and rec.e2e > self.e2e:
            return False
        return True

    def to_json(self) -> dict[str, float | None]:
        return asdict(self)


def stats(values: Sequence[float]) -> dict[str, float] | None:
    """mean, std, min, max and the percentiles (linear interpolation), or None when empty."""
    if len(values) == 0:
        return None
    a = np.asarray(values, dtype=np.float64)
    out = {"mean": float(a.mean()), "std": float(a.std()), "min": float(a.min()), "max": float(a.max())}
    for p, v in zip(PERCENTILES, np.percentile(a, PERCENTILES)):
        out[f"p{p}"] = float(v)
    return out


def peak_in_flight(records: Sequence[RequestRecord]) -> int:
    """Most requests in flight at once (a request ending frees its slot before
    one starting at the same instant takes it)."""
    events = sorted([(r.sent, 1) for r in records] + [(r.finished, -1) for r in records])
    peak = cur = 0
    for _, d in events:
        cur += d
        peak = max(peak, cur)
    return peak


def summarize(result: RunResult, slo: SLO) -> dict[str, Any]:
    """The run's summary; latencies in seconds, throughputs per second of run time."""
    recs = result.records
    ok = [r for r in recs if r.ok]
    dur = result.duration
    if dur <= 0:
        raise ValueError(f"run duration must be > 0, got {dur}")
    in_tokens = sum(r.prompt_tokens if r.prompt_tokens is not None else r.prompt_len for r in ok)
    out_tokens = sum(r.output_tokens for r in ok)
    good = sum(1 for r in recs if slo.met(r))
    return {
        "duration_s": dur,
        "num_requests": len(recs),
        "completed": len(ok),
        "failed": len(recs) - len(ok),
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / dur,
        "input_token_throughput": in_tokens / dur,
        "output_token_throughput": out_tokens / dur,
        "total_token_throughput": (in_tokens + out_tokens) / dur,
        "ttft": stats([r.ttft for r in ok if r.ttft is not None]),
        "tpot": stats([r.tpot for r in ok if r.tpot is not None]),
        "itl": stats([g for r in ok for g in r.itl]),
        "e2e": stats([r.e2e for r in ok]),
        "peak_in_flight": peak_in_flight(recs),
        "slo": slo.to_json(),
        "slo_met": good,
        "slo_attainment": good / len(recs) if recs else math.nan,
        "goodput": good / dur,
    }


@dataclass(frozen=True)
class TimeSeries:
    t: np.ndarray  # left edges of the bins, seconds
    output_tokens_per_s: np.ndarray
    completed_per_s: np.ndarray
    in_flight: np.ndarray  # sent and not finished, at each bin's left edge
    awaiting_first_token: np.ndarray  # sent, no text yet: queued or in prefill


def time_series(records: Sequence[RequestRecord], duration: float, bin_s: float | None = None) -> TimeSeries:
    """Binned throughput and occupancy over the run. Each successful request's
    output tokens are spread evenly over its text chunks' arrival times."""
    if duration <= 0:
        raise ValueError(f"run duration must be > 0, got {duration}")
    if bin_s is None:
        bin_s = max(duration / 60.0, 0.1)
    n_bins = max(1, math.ceil(duration / bin_s))
    edges = np.arange(n_bins + 1) * bin_s
    times: list[float] = []
    weights: list[float] = []
    for r in records:
        if r.ok and r.chunk_times:
            w = r.output_tokens / len(r.chunk_times)
            times.extend(r.chunk_times)
            weights.extend([w] * len(r.chunk_times))
    tokens, _ = np.histogram(times, bins=edges, weights=weights)
    done, _ = np.histogram([r.finished for r in records if r.ok], bins=edges)
    left = edges[:-1]
    sent = np.array([r.sent for r in records])
    fin = np.array([r.finished for r in records])
    first = np.array([r.chunk_times[0] if r.chunk_times else r.finished for r in records])
    if len(records):
        in_flight = ((sent[None, :] <= left[:, None]) & (left[:, None] < fin[None, :])).sum(axis=1)
        waiting = ((sent[None, :] <= left[:, None]) & (left[:, None] < first[None, :])).sum(axis=1)
    else:
        in_flight = waiting = np.zeros(n_bins, dtype=np.int64)
    return TimeSeries(
        t=left,
        output_tokens_per_s=tokens / bin_s,
        completed_per_s=done / bin_s,
        in_flight=in_flight,
        awaiting_first_token=waiting,
    )
