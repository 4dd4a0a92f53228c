"""PNG plots of a run (or several overlaid): latency CDFs, and throughput and
queueing over time."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402

from loom.bench.client import RequestRecord  # noqa: E402
from loom.bench.fairness import service_events  # noqa: E402
from loom.bench.metrics import time_series  # noqa: E402

Run = tuple[str, Sequence[RequestRecord]]


def _save(fig: plt.Figure, path: str | os.PathLike) -> Path:
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _latencies(records: Sequence[RequestRecord]) -> dict[str, list[float]]:
    ok = [r for r in records if r.ok]
    return {
        "TTFT": [r.ttft for r in ok if r.ttft is not None],
        "TPOT": [r.tpot for r in ok if r.tpot is not None],
        "ITL": [g for r in ok for g in r.itl],
        "E2E latency": [r.e2e for r in ok],
    }


def plot_latency_cdfs(runs: Sequence[Run], path: str | os.PathLike) -> Path:
    """One panel per latency metric, one CDF line per run (milliseconds, log x)."""
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, name in zip(axes.flat, ("TTFT", "TPOT", "ITL", "E2E latency")):
        lo, hi = np.inf, 0.0
        for label, records in runs:
            values = np.sort(np.asarray(_latencies(records)[name])) * 1000.0
            if len(values) == 0:
                continue
            lo, hi = min(lo, values[0]), max(hi, values[-1])
            ax.step(values, np.arange(1, len(values) + 1) / len(values), where="post", label=label)
        ax.set_title(f"{name} CDF")
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of requests" if name != "ITL" else "fraction of token gaps")
        if ax.has_data():
            if lo > 0 and hi / lo > 20:  # runs that differ by orders of magnitude
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(NullFormatter())
            ax.legend(fontsize="small")
        ax.grid(True, which="both", alpha=0.3)
    return _save(fig, path)


def plot_timeline(label: str, records: Sequence[RequestRecord], duration: float, path: str | os.PathLike) -> Path:
    """Output-token and request throughput over time, and requests in flight
    and awaiting their first token (the server's queue plus prefill)."""
    ts = time_series(records, duration)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    ax1.plot(ts.t, ts.output_tokens_per_s, drawstyle="steps-post", label="output tokens/s")
    ax1.set_ylabel("output tokens/s")
    ax1b = ax1.twinx()
    ax1b.plot(ts.t, ts.completed_per_s, drawstyle="steps-post", color="tab:green", alpha=0.6, label="completed req/s")
    ax1b.set_ylabel("completed req/s")
    ax1.set_title(f"{label}: throughput over time")
    ax1.legend(loc="upper left", fontsize="small")
    ax1b.legend(loc="upper right", fontsize="small")
    ax2.plot(ts.t, ts.in_flight, drawstyle="steps-post", label="in flight")
    ax2.plot(ts.t, ts.awaiting_first_token, drawstyle="steps-post", label="awaiting first token")
    ax2.set_xlabel("time since start (s)")
    ax2.set_ylabel("requests")
    ax2.set_title("requests in flight and queued")
    ax2.legend(fontsize="small")
    for ax in (ax1, ax2):
        ax.grid(True, alpha=0.3)
    return _save(fig, path)


def plot_tenant_service(label: str, records: Sequence[RequestRecord], duration: float, path: str | os.PathLike) -> Path:
    """Each tenant's cumulative service (weighted tokens, as the fairness index counts them) over
    time: parallel lines are a fair split, diverging ones an unfair one."""
    tenants = sorted({r.tenant or "" for r in records})
    t = np.linspace(0.0, duration, 200)
    fig, ax = plt.subplots(figsize=(11, 5))
    for tenant in tenants:
        times, weights = service_events([r for r in records if (r.tenant or "") == tenant])
        order = np.argsort(times)
        cumulative = np.concatenate([[0.0], np.cumsum(np.asarray(weights)[order])])
        ax.plot(t, cumulative[np.searchsorted(np.asarray(times)[order], t, side="right")], label=tenant or "(none)")
    ax.axvline(max(r.scheduled for r in records), color="grey", linestyle=":", label="last arrival")
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("service (prompt + 2 x output tokens)")
    ax.set_title(f"{label}: service per tenant")
    ax.legend(fontsize="small", ncol=2)
    ax.grid(True, alpha=0.3)
    return _save(fig, path)
