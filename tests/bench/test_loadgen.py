"""bench/loadgen.py's figures: a phase's percentiles are the latencies' nearest-rank percentiles
(the smallest latency that at least that share of the calls did not exceed)."""

from __future__ import annotations

from array import array

from tests.bench.test_plans import load

loadgen = load("loadgen")


def phase(latencies: list[float]) -> object:
    return loadgen.PhaseResult("verify", 1.0, array("d", latencies))


def test_p99_of_a_hundred_calls_is_the_99th_not_the_slowest() -> None:
    result = phase([float(ms) for ms in range(100, 0, -1)])  # 1..100 ms, in any order
    assert result.percentile(0.99) == 99.0  # 99 of the 100 calls took at most 99 ms
    assert result.percentile(0.5) == 50.0  # half of them took at most 50 ms
    assert result.percentile(1.0) == 100.0


def test_a_percentile_between_two_ranks_takes_the_higher_one() -> None:
    result = phase([1.0, 2.0, 3.0])
    assert result.percentile(0.5) == 2.0
    assert result.percentile(0.99) == 3.0
    assert phase([5.0]).percentile(0.99) == 5.0
    # 0.07 * 100 is 7.000000000000001 in floating point: still the 7th latency.
    assert phase([float(ms) for ms in range(1, 101)]).percentile(0.07) == 7.0
