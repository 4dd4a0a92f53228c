import math

import numpy as np
import pytest

from loom.bench.synthetic import LengthSpec, arrival_times, sample_lengths, synthetic, with_arrivals
from loom.bench.workload import TraceRequest


def test_infinite_rate_sends_all_at_once():
    assert arrival_times(4, math.inf) == [0.0, 0.0, 0.0, 0.0]


def test_arrivals_are_seeded_increasing_and_start_at_zero():
    a = arrival_times(50, 3.0, seed=7)
    assert a == arrival_times(50, 3.0, seed=7)
    assert a != arrival_times(50, 3.0, seed=8)
    assert a[0] == 0.0 and all(x < y for x, y in zip(a, a[1:]))


@pytest.mark.parametrize("burstiness", [0.25, 1.0, 4.0])
def test_gamma_gaps_have_the_asked_rate_and_cv(burstiness):
    gaps = np.diff(arrival_times(40_000, 5.0, burstiness, seed=1))
    assert gaps.mean() == pytest.approx(1 / 5.0, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.05)


def test_arrival_errors():
    with pytest.raises(ValueError):
        arrival_times(0, 1.0)
    with pytest.raises(ValueError, match="rate"):
        arrival_times(3, 0.0)
    with pytest.raises(ValueError, match="burstiness"):
        arrival_times(3, 1.0, burstiness=0.0)


def test_fixed_and_uniform_lengths():
    assert sample_lengths(LengthSpec("fixed", 10, 20), 3) == [(10, 20)] * 3
    pairs = sample_lengths(LengthSpec("uniform", 100, 10, range_ratio=0.5), 2000, seed=3)
    ins = [i for i, _ in pairs]
    outs = [o for _, o in pairs]
    assert min(ins) >= 50 and max(ins) <= 150 and min(ins) < 55 and max(ins) > 145
    assert min(outs) >= 5 and max(outs) <= 15


def test_trace_lengths_keep_pairs():
    spec = LengthSpec("trace", pairs=((1, 2), (30, 40)))
    pairs = sample_lengths(spec, 200, seed=0)
    assert set(pairs) == {(1, 2), (30, 40)}


def test_length_spec_errors():
    with pytest.raises(ValueError, match="fixed, uniform or trace"):
        LengthSpec("normal")
    with pytest.raises(ValueError, match="pairs"):
        LengthSpec("trace")
    with pytest.raises(ValueError, match="range ratio"):
        LengthSpec("uniform", range_ratio=1.0)


def test_synthetic_and_with_arrivals():
    w = synthetic(3, math.inf, LengthSpec("fixed", 5, 6))
    assert [(r.arrival, r.input_len, r.output_len) for r in w] == [(0.0, 5, 6)] * 3
    moved = with_arrivals(w, [0.0, 1.5, 2.5])
    assert [r.arrival for r in moved] == [0.0, 1.5, 2.5]
    with pytest.raises(ValueError, match="2 arrival times for 1"):
        with_arrivals([TraceRequest(0, 1, 1)], [0, 1])
