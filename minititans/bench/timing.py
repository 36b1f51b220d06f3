"""Timing on a shared machine: best-of-N, interleaved runs, the matmul peak, the load."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import numpy as np

SINGLE_THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def best_time(fn, *, repeat=3, min_time=0.0):
    """Best wall time of ``fn()`` over ``repeat`` runs (more if a run is shorter than min_time)."""
    best = float("inf")
    runs = 0
    start = time.perf_counter()
    while runs < repeat or (time.perf_counter() - start < min_time and runs < 50):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        runs += 1
    return best


def matmul_peak(dtype, n=512, min_time=0.5):
    """Single-thread GEMM GFLOP/s of NumPy (``n x n`` times ``n x n``), best of many."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n)).astype(dtype)
    b = rng.standard_normal((n, n)).astype(dtype)
    c = np.empty((n, n), dtype)
    np.dot(a, b, out=c)
    t = best_time(lambda: np.dot(a, b, out=c), repeat=20, min_time=min_time)
    return 2.0 * n**3 / t / 1e9


def interleaved_best(runs, repeats):
    """Best time of each function, their runs interleaved (``repeats[i]`` runs of ``runs[i]``).

    On a shared machine the load changes from second to second; alternating the runs gives
    every function the same chance of a quiet moment, so their ratio means something.
    """
    best = [float("inf")] * len(runs)
    for r in range(max(repeats)):
        for i, fn in enumerate(runs):
            if r < repeats[i]:
                t0 = time.perf_counter()
                fn()
                best[i] = min(best[i], time.perf_counter() - t0)
    return best


def machine_info():
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import numba

    return dict(cpu=cpu, cores=os.cpu_count(), python=platform.python_version(),
                numpy=np.__version__, numba=numba.__version__, platform=platform.platform(),
                blas_threads_env={k: os.environ.get(k) for k in SINGLE_THREAD_ENV})


def load_average():
    """The 1-minute load average (other processes compete for the cores), or None."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def single_threaded_blas():
    """True if BLAS is (or was just made) single-threaded in this process."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return all(os.environ.get(k) == "1" for k in SINGLE_THREAD_ENV)
    threadpool_limits(1)
    return True
