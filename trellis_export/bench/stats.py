"""Latency statistics and the timing loop (warm-up and duration controls like trtexec's)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .parse import Amount

PERCENTILES: tuple[int, ...] = (50, 90, 99)


def latency_stats(seconds: Sequence[float]) -> dict[str, float | int]:
    """Statistics of per-call latencies given in seconds; latencies are reported in milliseconds.

    Percentiles use linear interpolation between order statistics (numpy's default); ``cv`` is the
    coefficient of variation, population standard deviation / mean.
    """
    x = np.asarray(seconds, dtype=np.float64) * 1e3
    if x.ndim != 1 or x.size == 0:
        raise ValueError("latency_stats needs at least one timing")
    if not np.isfinite(x).all() or (x < 0).any():
        raise ValueError("latency_stats: timings must be finite and >= 0")
    mean = float(x.mean())
    std = float(x.std())
    out: dict[str, float | int] = {"n": int(x.size), "mean_ms": mean, "std_ms": std,
                                   "cv": std / mean if mean > 0 else 0.0,
                                   "min_ms": float(x.min()), "max_ms": float(x.max())}
    for p, v in zip(PERCENTILES, np.percentile(x, PERCENTILES)):
        out[f"p{p}_ms"] = float(v)
    return out


def time_calls(fn: Callable[[], Any], *, warmup: Amount, duration: float, iterations: int,
               sync: Callable[[], None] | None = None,
               clock: Callable[[], float] = time.perf_counter) -> tuple[list[float], dict[str, Any]]:
    """Warm up, then time ``fn()`` call by call until at least ``iterations`` calls AND at least
    ``duration`` seconds of measurement (trtexec's rule). ``sync`` (e.g. ``torch.cuda.synchronize``)
    runs after every call, inside the timed region. Returns the per-call seconds and a summary of the
    warm-up and measurement phases.
    """
    if iterations < 1:
        raise ValueError("iterations must be >= 1")
    t0 = clock()
    n_warm = 0
    while True:
        if warmup.iterations is not None:
            if n_warm >= warmup.iterations:
                break
        elif clock() - t0 >= (warmup.seconds or 0.0):
            break
        fn()
        if sync is not None:
            sync()
        n_warm += 1
    warm_s = clock() - t0
    times: list[float] = []
    start = clock()
    while len(times) < iterations or clock() - start < duration:
        a = clock()
        fn()
        if sync is not None:
            sync()
        times.append(clock() - a)
    return times, {"warmup_iterations": n_warm, "warmup_s": warm_s, "measure_s": clock() - start}


def time_interleaved(fns: Sequence[Callable[[], Any]], *, warmup_calls: int, duration: float,
                     iterations: int, sync: Callable[[], None] | None = None,
                     clock: Callable[[], float] = time.perf_counter) -> list[list[float]]:
    """Time several calls alternately (a, b, a, b, ...) in one loop, so that whatever the machine does
    meanwhile (other processes, frequency, caches) weighs on each alike: the way to measure a ratio.
    Runs until every call has ``iterations`` timings and ``duration`` seconds have passed."""
    if iterations < 1:
        raise ValueError("iterations must be >= 1")
    for fn in fns:
        for _ in range(warmup_calls):
            fn()
            if sync is not None:
                sync()
    times: list[list[float]] = [[] for _ in fns]
    start = clock()
    while len(times[0]) < iterations or clock() - start < duration:
        for fn, out in zip(fns, times):
            a = clock()
            fn()
            if sync is not None:
                sync()
            out.append(clock() - a)
    return times
