import io

import pytest

from loom.bench.report import compare_rows, format_plain, latency_rows, lookup, print_comparison, ratio, summary_rows


def summary(throughput: float, ttft_p50: float, failed: int = 0) -> dict:
    lat = {"mean": 0.1, "p50": ttft_p50, "p90": 0.3, "p99": 0.4}
    return {
        "completed": 10, "failed": failed, "duration_s": 5.0, "request_throughput": throughput,
        "input_token_throughput": 100.0, "output_token_throughput": 50.0, "total_token_throughput": 150.0,
        "peak_in_flight": 3, "goodput": throughput / 2, "slo_attainment": 0.5,
        "ttft": lat, "tpot": None, "itl": lat, "e2e": lat, "slo": {"ttft": 2.0, "tpot": 0.2, "e2e": None},
    }  # fmt: skip


def test_lookup_and_ratio():
    s = summary(2.0, 0.25)
    assert lookup(s, ("ttft", "p50")) == 0.25
    assert lookup(s, ("tpot", "p50")) is None
    assert lookup(s, ("nothing",)) is None
    assert ratio(2.0, 3.0) == 1.5
    assert ratio(0.0, 3.0) is None and ratio(None, 1.0) is None


def test_summary_and_latency_rows():
    s = summary(2.0, 0.25)
    rows = dict((r[0], r[1]) for r in summary_rows(s))
    assert rows["Request throughput (req/s)"] == "2.000"
    assert rows["SLO attainment (%)"] == "50.0"
    assert rows["SLOs"] == "ttft=2000ms, tpot=200ms"
    lat = {r[0]: r[1:] for r in latency_rows(s)}
    assert lat["TTFT (ms)"] == ["100.00", "250.00", "300.00", "400.00"]
    assert lat["TPOT (ms)"] == ["-", "-", "-", "-"]


def test_compare_rows_ratios_against_first():
    header, rows = compare_rows(["a", "b", "c"], [summary(2.0, 0.2), summary(4.0, 0.1), summary(1.0, 0.2)])
    assert header == ["metric", "a", "b", "c", "b / a", "c / a"]
    by = {r[0]: r[1:] for r in rows}
    assert by["Request throughput (req/s)"] == ["2.000", "4.000", "1.000", "2.00x", "0.50x"]
    assert by["TTFT p50 (ms)"] == ["200.00", "100.00", "200.00", "0.50x", "1.00x"]
    assert by["Requests failed"][3:] == ["-", "-"]  # 0 failures: no ratio
    with pytest.raises(ValueError):
        compare_rows([], [])


def test_format_plain_aligns():
    text = format_plain("T", ["metric", "v"], [["a", "1"], ["long name", "22"]])
    lines = text.splitlines()
    assert lines[0] == "T"
    assert lines[4] == "a           1"
    assert lines[5] == "long name  22"
    assert len({len(line) for line in lines[1:]}) == 1


def test_print_comparison_writes_table():
    out = io.StringIO()
    print_comparison(["x", "y"], [summary(1.0, 0.1), summary(3.0, 0.1)], file=out)
    assert "3.00x" in out.getvalue()
