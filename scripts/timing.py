"""Timing helpers shared by the benchmarks."""

import statistics
import time


def median_time(fn, reps, warmup=3):
    """Median wall time of `reps` calls of `fn`, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def median_times(fns, reps, block=10):
    """Median time of each function, measured in alternating blocks (a×10, b×10, a×10, ...) so
    that a slow period of a shared machine hits every side alike. Each block starts with one
    untimed call: with several threads, one runtime's pool is still spinning right after its
    call (PyTorch's OpenMP, ONNX Runtime's workers) and would slow the other's next call."""
    for f in fns:
        for _ in range(3):
            f()
    ts = [[] for _ in fns]
    while len(ts[0]) < reps:
        for i, f in enumerate(fns):
            f()
            for _ in range(block):
                t = time.perf_counter()
                f()
                ts[i].append(time.perf_counter() - t)
    return [statistics.median(t) for t in ts]
