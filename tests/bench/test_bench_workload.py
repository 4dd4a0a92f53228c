import pytest

from loom.bench.workload import (
    Shaping,
    TraceRequest,
    cap_lengths,
    mean_rate,
    rescale_rate,
    scale_lengths,
    scale_time,
    shape,
    sort_and_rebase,
    take,
    window,
)


def reqs(*arrivals: float, input_len: int = 100, output_len: int = 10) -> list[TraceRequest]:
    return [TraceRequest(arrival=a, input_len=input_len, output_len=output_len) for a in arrivals]


def arrivals(w) -> list[float]:
    return [r.arrival for r in w]


def test_request_rejects_bad_values():
    with pytest.raises(ValueError, match="input_len"):
        TraceRequest(arrival=0, input_len=0, output_len=1)
    with pytest.raises(ValueError, match="output_len"):
        TraceRequest(arrival=0, input_len=1, output_len=0)
    with pytest.raises(ValueError, match="arrival"):
        TraceRequest(arrival=-1, input_len=1, output_len=1)
    with pytest.raises(ValueError, match="arrival"):
        TraceRequest(arrival=float("nan"), input_len=1, output_len=1)


def test_sort_and_rebase():
    assert arrivals(sort_and_rebase(reqs(12.0, 10.0, 11.5))) == [0.0, 1.5, 2.0]
    assert sort_and_rebase([]) == []


def test_window_keeps_half_open_interval_and_rebases():
    w = window(reqs(0, 1, 2, 3, 4, 5), start=2, duration=2)
    assert arrivals(w) == [0.0, 1.0]  # 2 and 3 kept; 4 is the open end
    assert arrivals(window(reqs(0, 1, 2), start=1)) == [0.0, 1.0]
    with pytest.raises(ValueError):
        window(reqs(0), start=0, duration=0)


def test_take():
    assert arrivals(take(reqs(0, 1, 2), 2)) == [0, 1]
    with pytest.raises(ValueError):
        take(reqs(0), 0)


def test_scale_time_stretches_and_compresses():
    assert arrivals(scale_time(reqs(0, 1, 3), 2.0)) == [0, 2, 6]
    assert arrivals(scale_time(reqs(0, 1, 3), 0.5)) == [0, 0.5, 1.5]
    with pytest.raises(ValueError):
        scale_time(reqs(0), 0)


def test_mean_rate_and_rescale():
    w = reqs(0, 1, 2, 3, 4)  # 4 gaps over 4 s
    assert mean_rate(w) == 1.0
    fast = rescale_rate(w, 4.0)
    assert arrivals(fast) == [0, 0.25, 0.5, 0.75, 1.0]
    assert mean_rate(fast) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="two requests"):
        mean_rate(reqs(0))
    with pytest.raises(ValueError, match="same instant"):
        mean_rate(reqs(1, 1))


def test_scale_lengths_scales_blocks_with_prompt():
    r = TraceRequest(arrival=0, input_len=1000, output_len=7, hash_ids=(1, 2), block_tokens=512)
    (s,) = scale_lengths([r], 0.25)
    assert (s.input_len, s.output_len, s.block_tokens, s.hash_ids) == (250, 2, 128, (1, 2))
    (tiny,) = scale_lengths(reqs(0, input_len=1, output_len=1), 0.1)
    assert (tiny.input_len, tiny.output_len) == (1, 1)  # never below one token


def test_scale_lengths_keeps_real_text():
    r = TraceRequest(arrival=0, input_len=5, output_len=40, prompt="a real prompt here now")
    (s,) = scale_lengths([r], 0.5)
    assert (s.prompt, s.input_len, s.output_len) == ("a real prompt here now", 5, 20)


def test_cap_lengths_trims_blocks_and_drops_long_text():
    r = TraceRequest(arrival=0, input_len=1500, output_len=300, hash_ids=(7, 8, 9), block_tokens=512)
    (c,) = cap_lengths([r], max_input_len=600, max_output_len=100)
    assert (c.input_len, c.output_len, c.hash_ids) == (600, 100, (7, 8))  # 600 tokens span 2 blocks
    text = TraceRequest(arrival=0, input_len=50, output_len=5, prompt="x")
    assert cap_lengths([text], max_input_len=49) == []
    assert cap_lengths([text], max_input_len=50) == [text]


def test_shape_applies_in_documented_order():
    w = reqs(100, 101, 102, 103, 104, 105, input_len=1000, output_len=100)
    s = Shaping(start=1, duration=4, num_requests=3, time_scale=2.0, length_scale=0.5, max_input_len=400, max_output_len=30)
    out = shape(w, s)
    # rebase -> 0..5; window [1, 5) -> 1,2,3,4 rebased to 0..3; first 3; x2 in time
    assert arrivals(out) == [0, 2, 4]
    assert {(r.input_len, r.output_len) for r in out} == {(400, 30)}


def test_shape_rate_after_window():
    out = shape(reqs(0, 10, 20, 30), Shaping(rate=1.0))
    assert arrivals(out) == [0, 1, 2, 3]


def test_shape_empty_is_an_error():
    with pytest.raises(ValueError, match="empty"):
        shape(reqs(0, 1), Shaping(start=5))
