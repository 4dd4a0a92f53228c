import math

import numpy as np
import pytest

from loom.bench.client import RequestRecord, RunResult
from loom.bench.metrics import SLO, parse_duration, peak_in_flight, stats, summarize, time_series


def rec(index=0, sent=0.0, chunks=(1.0, 1.5, 2.0), finished=None, out=None, prompt_tokens=10, error=None) -> RequestRecord:
    chunks = tuple(chunks)
    return RequestRecord(
        index=index,
        scheduled=sent,
        sent=sent,
        finished=finished if finished is not None else (chunks[-1] if chunks else sent + 1),
        chunk_times=chunks,
        prompt_len=prompt_tokens,
        max_tokens=len(chunks),
        prompt_tokens=prompt_tokens,
        output_tokens=len(chunks) if out is None else out,
        usage_reported=True,
        finish_reason="length",
        error=error,
    )


def test_parse_duration():
    assert parse_duration("200ms") == pytest.approx(0.2)
    assert parse_duration("2s") == 2.0
    assert parse_duration("1.5 m") == 90.0
    assert parse_duration("250us") == pytest.approx(0.00025)
    for bad in ("2", "ms", "2h", "-1s"):
        with pytest.raises(ValueError, match="unit"):
            parse_duration(bad)


def test_slo_parse():
    assert SLO.parse("ttft=2s,tpot=200ms") == SLO(ttft=2.0, tpot=0.2)
    assert SLO.parse(" E2E = 30s ") == SLO(e2e=30.0)
    assert SLO.parse("") == SLO() and SLO.parse(None).empty
    with pytest.raises(ValueError, match="bad SLO item 'itl=1s'"):
        SLO.parse("itl=1s")
    with pytest.raises(ValueError, match="given twice"):
        SLO.parse("ttft=1s,ttft=2s")
    with pytest.raises(ValueError, match="> 0"):
        SLO.parse("ttft=0s")


def test_record_timings():
    r = rec(sent=0.5, chunks=(1.0, 1.5, 2.5), finished=3.0, out=5)
    assert r.ttft == 0.5
    assert r.e2e == 2.5
    assert r.tpot == pytest.approx((2.5 - 0.5) / 4)  # usage says 5 tokens over 3 chunks
    assert r.itl == [0.5, 1.0]
    single = rec(chunks=(1.0,), out=1)
    assert single.tpot is None and single.itl == []


def test_slo_met():
    slo = SLO(ttft=1.0, tpot=0.5, e2e=2.0)
    assert slo.met(rec(chunks=(1.0, 1.5, 2.0)))  # ttft 1.0, tpot 0.5, e2e 2.0: on the limits
    assert not slo.met(rec(chunks=(1.1, 1.5, 2.0)))
    assert not slo.met(rec(chunks=(0.5, 1.5, 1.6)))  # tpot 0.55
    assert not slo.met(rec(chunks=(0.5, 1.0, 1.5), finished=2.1))
    assert not slo.met(rec(error="HTTP 500"))
    assert SLO(tpot=0.001).met(rec(chunks=(0.5,), out=1))  # one token: no TPOT to miss
    assert SLO().met(rec())


def test_stats_known_answers():
    s = stats(list(range(1, 101)))
    assert s["mean"] == 50.5 and s["min"] == 1 and s["max"] == 100
    assert s["p50"] == pytest.approx(50.5)
    assert s["p90"] == pytest.approx(90.1)
    assert s["p99"] == pytest.approx(99.01)
    assert stats([]) is None
    assert stats([3.0])["p99"] == 3.0


def test_peak_in_flight():
    a = rec(sent=0.0, chunks=(1.0,), finished=2.0)
    b = rec(sent=1.0, chunks=(2.0,), finished=3.0)
    c = rec(sent=2.0, chunks=(3.0,), finished=4.0)  # starts as a ends
    assert peak_in_flight([a, b, c]) == 2
    assert peak_in_flight([]) == 0


def test_summarize_and_goodput():
    records = [
        rec(index=0, sent=0.0, chunks=(0.5, 1.0, 1.5), prompt_tokens=10),  # ttft .5 tpot .5
        rec(index=1, sent=1.0, chunks=(3.0, 3.1, 3.2), prompt_tokens=20),  # ttft 2.0 misses
        rec(index=2, sent=2.0, chunks=(2.2, 2.3, 2.4, 2.5), prompt_tokens=30),  # ttft .2 tpot .1
        rec(index=3, sent=3.0, chunks=(), finished=3.5, error="HTTP 503"),
    ]
    s = summarize(RunResult(records=records, duration=4.0, started_at=0.0), SLO(ttft=1.0))
    assert (s["num_requests"], s["completed"], s["failed"]) == (4, 3, 1)
    assert s["total_input_tokens"] == 60 and s["total_output_tokens"] == 10
    assert s["request_throughput"] == 0.75
    assert s["output_token_throughput"] == 2.5
    assert s["total_token_throughput"] == 17.5
    assert s["slo_met"] == 2 and s["goodput"] == 0.5 and s["slo_attainment"] == 0.5
    assert s["ttft"]["mean"] == pytest.approx((0.5 + 2.0 + 0.2) / 3)
    assert s["tpot"]["max"] == pytest.approx(0.5)
    assert s["itl"]["min"] == pytest.approx(0.1)
    assert s["e2e"]["max"] == pytest.approx(2.2)
    assert s["slo"] == {"ttft": 1.0, "tpot": None, "e2e": None}


def test_summarize_without_usage_uses_harness_prompt_count():
    r = rec(prompt_tokens=None)
    r2 = RequestRecord(**{**r.__dict__, "prompt_len": 42})
    s = summarize(RunResult([r2], 1.0, 0.0), SLO())
    assert s["total_input_tokens"] == 42


def test_time_series_bins():
    records = [
        rec(index=0, sent=0.0, chunks=(0.5, 1.5), finished=1.6, out=4),  # 2 tokens per chunk
        rec(index=1, sent=0.2, chunks=(2.5,), finished=2.6, out=1),
    ]
    ts = time_series(records, duration=3.0, bin_s=1.0)
    assert ts.t.tolist() == [0.0, 1.0, 2.0]
    assert ts.output_tokens_per_s.tolist() == [2.0, 2.0, 1.0]
    assert ts.completed_per_s.tolist() == [0, 1, 1]
    assert ts.in_flight.tolist() == [1, 2, 1]  # at t=0: a; t=1: a, b; t=2: b
    assert ts.awaiting_first_token.tolist() == [1, 1, 1]  # t=0: a; t=1: b; t=2: b


def test_time_series_empty_and_bad_duration():
    ts = time_series([], duration=1.0, bin_s=0.5)
    assert np.all(ts.in_flight == 0) and len(ts.t) == 2
    with pytest.raises(ValueError):
        time_series([], duration=0.0)


def test_summarize_nan_attainment_only_without_requests():
    s = summarize(RunResult([], 1.0, 0.0), SLO())
    assert math.isnan(s["slo_attainment"]) and s["goodput"] == 0.0 and s["ttft"] is None
