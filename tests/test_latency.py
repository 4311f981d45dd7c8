"""hub/latency.py: bounded histograms over a sliding window."""

from __future__ import annotations

import pytest

from hub.latency import BUCKETS, Latencies, LatencyWindow, bucket_of, merge, percentile_ms


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_buckets_are_within_9_percent_of_the_span() -> None:
    for ms in (0.05, 0.3, 1.0, 7.0, 42.0, 250.0, 999.0, 12_345.0):
        value = percentile_ms({bucket_of(ms / 1000): 1}, 0.5)
        assert value is not None
        assert abs(value - ms) / ms < 0.09, (ms, value)


def test_bucket_of_clamps_tiny_and_huge_spans() -> None:
    assert bucket_of(0.0) == 0
    assert bucket_of(-1.0) == 0
    assert bucket_of(1e9) == BUCKETS - 1


def test_percentiles_of_a_histogram() -> None:
    counts: dict[int, int] = {}
    merge(counts, [(bucket_of(0.010), 98), (bucket_of(0.500), 2)])
    assert percentile_ms(counts, 0.5) == pytest.approx(10, rel=0.09)
    assert percentile_ms(counts, 0.98) == pytest.approx(10, rel=0.09)
    assert percentile_ms(counts, 0.99) == pytest.approx(500, rel=0.09)
    assert percentile_ms({}, 0.5) is None


def test_merge_ignores_buckets_and_counts_out_of_range() -> None:
    counts = {3: 1}
    merge(counts, [(3, 2), (-1, 5), (BUCKETS, 5), (4, 0), (5, -2)])
    assert counts == {3: 3}


def test_window_forgets_spans_older_than_it() -> None:
    clock = Clock()
    window = LatencyWindow(60.0, slots=6, clock=clock)
    window.record(0.010)
    clock.now += 30
    window.record(0.020)
    assert sum(window.counts().values()) == 2
    clock.now += 35  # the first span is 65 s old
    assert sum(window.counts().values()) == 1
    clock.now += 30
    assert window.counts() == {}
    # A slot used again starts empty.
    window.record(0.030)
    assert window.counts() == {bucket_of(0.030): 1}


def test_latencies_count_the_first_accepted_and_the_result() -> None:
    clock = Clock()
    latencies = Latencies(300.0, clock=clock)
    started = {"j1": clock.now, "j2": clock.now}
    clock.now += 0.005
    latencies.sent(started, "j1", ended=False)  # accepted
    clock.now += 0.100
    latencies.sent(started, "j1", ended=False)  # re-dispatched: not counted again
    latencies.sent(started, "j1", ended=True)
    latencies.sent(started, "j2", ended=True)  # ended in its queue: end to end only
    latencies.sent(started, "j3", ended=True)  # submitted elsewhere: nothing
    assert started == {}
    assert latencies.accepted.counts() == {bucket_of(0.005): 1}
    assert latencies.ended.counts() == {bucket_of(0.105): 2}
