"""Pure statistics for the benchmark (no I/O; unit-tested in tests/test_bench_stats.py)."""
import statistics


def percentile(sorted_values, q):
    """The value at rank round(q * (n - 1)) of an already sorted list (q in [0, 1]); as the report always did."""
    if not sorted_values:
        raise ValueError("percentile of nothing")
    index = min(len(sorted_values) - 1, max(0, int(round(q * (len(sorted_values) - 1)))))
    return sorted_values[index]


def summarize(samples):
    """mean/median/p95/p99/min/max in ms of durations given in seconds."""
    ms = sorted(s * 1000 for s in samples)
    return {"n": len(ms), "mean_ms": statistics.fmean(ms), "median_ms": statistics.median(ms),
            "p95_ms": percentile(ms, 0.95), "p99_ms": percentile(ms, 0.99), "min_ms": ms[0], "max_ms": ms[-1]}


def slope(points):
    """Least-squares slope of y over x for [(x, y), ...] (at least two distinct x)."""
    xs = [x for x, _ in points]
    ys = [y for _, y in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        raise ValueError("slope needs two distinct x values")
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx


def ratio(a, b):
    """a / b, or None when either is missing or b is zero."""
    if a is None or b is None or b == 0:
        return None
    return a / b

