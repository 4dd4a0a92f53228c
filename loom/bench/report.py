"""Terminal tables: one run's summary, and several runs side by side with ratios.

Tables are built as plain rows first (tested), then drawn with rich when it is
installed, else as aligned text.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TextIO

LATENCIES = (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2e", "E2E latency"))
STATS = ("mean", "p50", "p90", "p99")


@dataclass(frozen=True)
class Metric:
    label: str
    path: tuple[str, ...]  # keys into the summary dict
    scale: float = 1.0  # display unit = value * scale
    fmt: str = "{:.2f}"


OVERVIEW = (
    Metric("Requests completed", ("completed",), fmt="{:.0f}"),
    Metric("Requests failed", ("failed",), fmt="{:.0f}"),
    Metric("Duration (s)", ("duration_s",)),
    Metric("Request throughput (req/s)", ("request_throughput",), fmt="{:.3f}"),
    Metric("Input token throughput (tok/s)", ("input_token_throughput",), fmt="{:.1f}"),
    Metric("Output token throughput (tok/s)", ("output_token_throughput",), fmt="{:.1f}"),
    Metric("Total token throughput (tok/s)", ("total_token_throughput",), fmt="{:.1f}"),
    Metric("Peak requests in flight", ("peak_in_flight",), fmt="{:.0f}"),
    Metric("Goodput (req/s)", ("goodput",), fmt="{:.3f}"),
    Metric("SLO attainment (%)", ("slo_attainment",), scale=100.0, fmt="{:.1f}"),
    Metric("Jain's fairness index", ("fairness", "jain_index"), fmt="{:.3f}"),
)
LATENCY_METRICS = tuple(Metric(f"{label} {stat} (ms)", (key, stat), scale=1000.0) for key, label in LATENCIES for stat in STATS)


def lookup(summary: dict[str, Any], path: Sequence[str]) -> float | None:
    """The number at ``path`` in the summary, or None when absent or null."""
    cur: Any = summary
    for key in path:
        if not isinstance(cur, dict) or cur.get(key) is None:
            return None
        cur = cur[key]
    return float(cur)


def fmt(m: Metric, v: float | None) -> str:
    if v is None or math.isnan(v):
        return "-"
    return m.fmt.format(v * m.scale)


def slo_text(slo: dict[str, float | None]) -> str:
    parts = [f"{k}={v * 1000:g}ms" for k, v in slo.items() if v is not None]
    return ", ".join(parts) if parts else "none (every completed request counts)"


def summary_rows(summary: dict[str, Any]) -> list[list[str]]:
    """Overview rows: [metric, value]."""
    rows = [[m.label, fmt(m, lookup(summary, m.path))] for m in OVERVIEW]
    rows.append(["SLOs", slo_text(summary.get("slo", {}))])
    return rows


def latency_rows(summary: dict[str, Any]) -> list[list[str]]:
    """Latency grid rows: [metric, mean, p50, p90, p99] in milliseconds."""
    rows = []
    for key, label in LATENCIES:
        m = Metric(label, (key,), scale=1000.0)
        rows.append([f"{label} (ms)", *(fmt(m, lookup(summary, (key, s))) for s in STATS)])
    return rows


def ratio(a: float | None, b: float | None) -> float | None:
    """b / a, or None when either is missing or a is 0."""
    if a is None or b is None or a == 0 or math.isnan(a) or math.isnan(b):
        return None
    return b / a


def compare_rows(labels: Sequence[str], summaries: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows with each run's value and its ratio to the first run."""
    if not summaries:
        raise ValueError("nothing to compare")
    header = ["metric", *labels, *(f"{lab} / {labels[0]}" for lab in labels[1:])]
    rows = []
    for m in (*OVERVIEW, *LATENCY_METRICS):
        values = [lookup(s, m.path) for s in summaries]
        ratios = [ratio(values[0], v) for v in values[1:]]
        rows.append([m.label, *(fmt(m, v) for v in values), *("-" if r is None else f"{r:.2f}x" for r in ratios)])
    return header, rows


def format_plain(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """An aligned text table: first column left-aligned, the rest right-aligned."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    rule = "-" * len(line(header))
    return "\n".join([title, rule, line(header), rule, *(line(r) for r in rows), rule])


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]], file: TextIO | None = None) -> None:
    """Drawn with rich on a terminal; as plain text in a pipe or file, or without rich."""
    out = file or sys.stdout
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        Console = None
    if Console is None or not out.isatty():
        print(format_plain(title, header, rows), file=out)
        return
    table = Table(title=title)
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 0 else "right")
    for r in rows:
        table.add_row(*r)
    Console(file=out).print(table)


GROUP_HEADER = ["requests", "completed", "output tokens", "TTFT p50 (ms)", "TTFT p99 (ms)", "E2E p50 (ms)", "goodput (req/s)"]


def group_rows(groups: dict[str, dict[str, Any]], fairness: dict[str, Any] | None = None) -> list[list[str]]:
    """One row per tenant or priority class; with ``fairness``, each tenant's normalised service."""
    ms = Metric("", (), scale=1000.0)
    rows = []
    for name, g in groups.items():
        row = [name or "(none)", str(g["requests"]), str(g["completed"]), str(g["output_tokens"]),
               fmt(ms, lookup(g, ("ttft", "p50"))), fmt(ms, lookup(g, ("ttft", "p99"))),
               fmt(ms, lookup(g, ("e2e", "p50"))), f"{g['goodput']:.3f}"]
        if fairness is not None:
            share = fairness["tenants"].get(name, {}).get("normalised_service")
            row.append("-" if share is None else f"{share:.2f}")
        rows.append(row)
    return rows


def print_summary(label: str, summary: dict[str, Any], file: TextIO | None = None) -> None:
    print_table(f"loom bench serve: {label}", ["metric", "value"], summary_rows(summary), file)
    print_table("Latency", ["", *STATS], latency_rows(summary), file)
    fairness = summary.get("fairness")
    if "tenants" in summary:
        extra = ["service / fair share"] if fairness else []
        print_table("Per tenant", ["tenant", *GROUP_HEADER, *extra], group_rows(summary["tenants"], fairness), file)
    if fairness:
        print(f"Jain's fairness index over tenants' normalised service (first {fairness['window_s']:.1f} s, "
              f"while load arrives; 1 = fair): {fairness['jain_index']:.3f}", file=file or sys.stdout)
    if "priorities" in summary:
        print_table("Per priority", ["priority", *GROUP_HEADER], group_rows(summary["priorities"]), file)
    if "turns" in summary:
        print_table("Per turn", ["turns", *GROUP_HEADER], group_rows(summary["turns"]), file)
    if "slo_classes" in summary:
        print_table("Per SLO class", ["class", *GROUP_HEADER], group_rows(summary["slo_classes"]), file)


def print_comparison(labels: Sequence[str], summaries: Sequence[dict[str, Any]], file: TextIO | None = None) -> None:
    header, rows = compare_rows(labels, summaries)
    print_table("loom bench compare", header, rows, file)
