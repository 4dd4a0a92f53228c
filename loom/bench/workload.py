"""A workload: requests with arrival times and lengths, and the transforms that fit
a GPU-cluster trace onto a small machine (windowing, time and length scaling, caps).

Every transform is a pure function from a workload to a new one, so they compose
and are tested on hand-made inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

# Mooncake traces name one block of 512 tokens per hash id.
MOONCAKE_BLOCK_TOKENS = 512


@dataclass(frozen=True)
class TraceRequest:
    """One request of a workload, before it becomes a prompt.

    ``arrival`` is in seconds from the start of the run. ``hash_ids`` (Mooncake)
    name consecutive blocks of ``block_tokens`` prompt tokens; equal ids in two
    requests mean an equal prefix. ``prompt`` carries real text (ShareGPT) when
    the trace has it; then ``input_len`` is that text's token count.
    """

    arrival: float
    input_len: int
    output_len: int
    hash_ids: tuple[int, ...] = ()
    block_tokens: int = MOONCAKE_BLOCK_TOKENS
    prompt: str | None = None
    tenant: str | None = None  # sent as ``user``
    priority: int = 0  # sent as ``priority`` when not 0
    slo_class: str | None = None  # sent as ``slo_class`` (loom's slo policy)

    def __post_init__(self) -> None:
        if not math.isfinite(self.arrival) or self.arrival < 0:
            raise ValueError(f"arrival must be a finite time >= 0, got {self.arrival}")
        if self.input_len < 1:
            raise ValueError(f"input_len must be >= 1, got {self.input_len}")
        if self.output_len < 1:
            raise ValueError(f"output_len must be >= 1, got {self.output_len}")
        if self.block_tokens < 1:
            raise ValueError(f"block_tokens must be >= 1, got {self.block_tokens}")


Workload = list[TraceRequest]


def sort_and_rebase(requests: Sequence[TraceRequest]) -> Workload:
    """Sort by arrival and shift times so the first request arrives at 0."""
    ordered = sorted(requests, key=lambda r: r.arrival)
    if not ordered:
        return []
    t0 = ordered[0].arrival
    return [replace(r, arrival=r.arrival - t0) for r in ordered]


def window(requests: Sequence[TraceRequest], start: float = 0.0, duration: float | None = None) -> Workload:
    """Keep requests arriving in ``[start, start + duration)`` and rebase time to ``start``."""
    if start < 0:
        raise ValueError(f"window start must be >= 0, got {start}")
    if duration is not None and duration <= 0:
        raise ValueError(f"window duration must be > 0, got {duration}")
    end = math.inf if duration is None else start + duration
    return [replace(r, arrival=r.arrival - start) for r in requests if start <= r.arrival < end]


def take(requests: Sequence[TraceRequest], n: int) -> Workload:
    """The first ``n`` requests."""
    if n < 1:
        raise ValueError(f"number of requests must be >= 1, got {n}")
    return list(requests[:n])


def scale_time(requests: Sequence[TraceRequest], factor: float) -> Workload:
    """Multiply every arrival time by ``factor``: above 1 stretches the trace (fewer
    requests per second), below 1 compresses it."""
    if not factor > 0 or not math.isfinite(factor):
        raise ValueError(f"time scale must be a finite number > 0, got {factor}")
    return [replace(r, arrival=r.arrival * factor) for r in requests]


def mean_rate(requests: Sequence[TraceRequest]) -> float:
    """Requests per second: (n - 1) inter-arrival gaps over the arrival span."""
    if len(requests) < 2:
        raise ValueError("a request rate needs at least two requests")
    span = max(r.arrival for r in requests) - min(r.arrival for r in requests)
    if span <= 0:
        raise ValueError("all requests arrive at the same instant; the rate is unbounded")
    return (len(requests) - 1) / span


def rescale_rate(requests: Sequence[TraceRequest], target_rate: float) -> Workload:
    """Scale time uniformly so the mean rate becomes ``target_rate`` req/s, keeping
    the trace's burst shape."""
    if not target_rate > 0 or not math.isfinite(target_rate):
        raise ValueError(f"target rate must be a finite number > 0, got {target_rate}")
    return scale_time(requests, mean_rate(requests) / target_rate)


def scale_lengths(requests: Sequence[TraceRequest], factor: float) -> Workload:
    """Multiply input and output lengths by ``factor`` (rounded, at least 1).

    Hash-id blocks shrink with the prompt so the number of blocks, and so the
    prefix-sharing structure, is unchanged. Requests carrying real text keep it.
    """
    if not factor > 0 or not math.isfinite(factor):
        raise ValueError(f"length scale must be a finite number > 0, got {factor}")
    out = []
    for r in requests:
        scaled_output = max(1, round(r.output_len * factor))
        if r.prompt is not None:
            out.append(replace(r, output_len=scaled_output))
            continue
        out.append(
            replace(
                r,
                input_len=max(1, round(r.input_len * factor)),
                output_len=scaled_output,
                block_tokens=max(1, round(r.block_tokens * factor)),
            )
        )
    return out


def cap_lengths(
    requests: Sequence[TraceRequest], max_input_len: int | None = None, max_output_len: int | None = None
) -> Workload:
    """Clip lengths to the caps. A clipped hash-id prompt keeps only the blocks
    that still hold some of its tokens. Requests with real text longer than the
    cap are dropped, since their text cannot be clipped without changing it."""
    for name, cap in (("max input length", max_input_len), ("max output length", max_output_len)):
        if cap is not None and cap < 1:
            raise ValueError(f"{name} must be >= 1, got {cap}")
    out = []
    for r in requests:
        if max_input_len is not None and r.prompt is not None and r.input_len > max_input_len:
            continue
        input_len = r.input_len if max_input_len is None else min(r.input_len, max_input_len)
        output_len = r.output_len if max_output_len is None else min(r.output_len, max_output_len)
        hash_ids = r.hash_ids[: math.ceil(input_len / r.block_tokens)] if r.hash_ids else ()
        out.append(replace(r, input_len=input_len, output_len=output_len, hash_ids=hash_ids))
    return out


@dataclass(frozen=True)
class Shaping:
    """How to fit a trace to this machine; ``None`` leaves that aspect alone.

    Applied in this order: window, count, time (``time_scale`` then ``rate``),
    length scale, caps.
    """

    start: float = 0.0
    duration: float | None = None
    num_requests: int | None = None
    time_scale: float | None = None
    rate: float | None = None
    length_scale: float | None = None
    max_input_len: int | None = None
    max_output_len: int | None = None


def shape(requests: Sequence[TraceRequest], s: Shaping) -> Workload:
    """Apply every transform of ``s`` in the documented order."""
    out = sort_and_rebase(requests)
    if s.start or s.duration is not None:
        out = window(out, s.start, s.duration)
    if s.num_requests is not None:
        out = take(out, s.num_requests)
    if s.time_scale is not None:
        out = scale_time(out, s.time_scale)
    if s.rate is not None:
        out = rescale_rate(out, s.rate)
    if s.length_scale is not None:
        out = scale_lengths(out, s.length_scale)
    if s.max_input_len is not None or s.max_output_len is not None:
        out = cap_lengths(out, s.max_input_len, s.max_output_len)
    if not out:
        raise ValueError("the workload is empty after windowing and capping")
    return out
