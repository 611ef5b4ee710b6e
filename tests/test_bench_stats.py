"""The benchmark's pure statistics (tools/benchkit/stats.py): what its percentiles and slopes mean."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))

from benchkit.stats import percentile, ratio, slope, summarize  # noqa: E402


def test_percentile_is_the_value_at_the_rounded_rank():
    values = list(range(101))  # rank q * 100 is the value itself
    assert percentile(values, 0.5) == 50
    assert percentile(values, 0.99) == 99
    assert percentile(values, 1.0) == 100
    assert percentile([7], 0.99) == 7
    with pytest.raises(ValueError):
        percentile([], 0.5)


def test_summarize_reports_milliseconds_of_seconds():
    s = summarize([0.003, 0.001, 0.002, 0.010])
    assert s["n"] == 4
    assert s["min_ms"] == pytest.approx(1.0) and s["max_ms"] == pytest.approx(10.0)
    assert s["median_ms"] == pytest.approx(2.5)
    assert s["mean_ms"] == pytest.approx(4.0)
    assert s["p99_ms"] == pytest.approx(10.0)


def test_slope_is_the_least_squares_growth():
    # 8 MiB idle, 0.25 MiB per kernel, with noise that cancels out
    points = [(0, 8.0), (1, 8.3), (2, 8.45), (4, 9.0), (8, 10.0)]
    assert slope(points) == pytest.approx(0.2493, abs=1e-3)
    assert slope([(0, 1.0), (2, 5.0)]) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        slope([(3, 1.0), (3, 2.0)])


def test_ratio_is_none_when_it_means_nothing():
    assert ratio(1.0, 4.0) == 0.25
    assert ratio(None, 4.0) is None and ratio(1.0, None) is None and ratio(1.0, 0) is None
