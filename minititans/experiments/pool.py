"""The one process pool every experiment runs its jobs through.

A job is one model trained with one seed; each is deterministic given its arguments, so the
results do not depend on how many workers run them.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed

from tqdm.auto import tqdm

from ..training import numba_available

# workers are forked where the platform allows it, so a script calling an experiment needs
# no ``if __name__ == "__main__"`` guard (which "spawn" and "forkserver" would require)
_CONTEXT = multiprocessing.get_context(
    "fork" if "fork" in multiprocessing.get_all_start_methods() else None)


def single_thread_blas():
    """BLAS limited to one thread in this process (a context manager; a no-op context when
    threadpoolctl is missing). Every job is small matrices on one core: with a thread pool
    per worker the workers oversubscribe the cores, and a training step took 1.6x the
    process time (measured on the demo's MAG run: 21-23 s against 13.5 s, same results)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - a dependency; kept optional for old installs
        return contextlib.nullcontext()
    return threadpool_limits(1)


def _init_worker():
    single_thread_blas()  # for the life of the worker process
    # and one numba thread: evaluation scans a batch with a prange kernel, which would
    # otherwise start a thread per core in every worker (the numbers do not change)
    try:
        import numba
    except ImportError:  # pragma: no cover - numba is a dependency
        return
    numba.set_num_threads(1)


def default_workers(n_jobs: int) -> int:
    """As many workers as cores, at most one per job."""
    return max(1, min(n_jobs, os.cpu_count() or 1))


def run_jobs(fn, jobs: list, *, desc: str, progress: bool = True,
             workers: int | None = None, cost=None, on_result=None) -> list:
    """``[fn(job) for job in jobs]``, in ``workers`` processes (default: one per core).

    ``fn`` must be a module-level function (it is pickled by name). Results come back in
    the order of ``jobs``; a progress bar counts finished jobs. BLAS runs on one thread in
    every job (:func:`single_thread_blas`). ``cost`` (job -> a number,
    optional): the jobs start in decreasing cost, so that a long job does not start last
    while the other workers idle (the results do not depend on the order). ``on_result``
    (optional) is called in this process as ``on_result(i, result)`` as soon as job ``i``
    is done, so a caller can save each result before the others finish.
    """
    workers = workers or default_workers(len(jobs))
    order = list(range(len(jobs)))
    if cost is not None:
        order.sort(key=lambda i: -cost(jobs[i]))
    results = [None] * len(jobs)

    def finished(i, result):
        results[i] = result
        if on_result is not None:
            on_result(i, result)

    bar = tqdm(total=len(jobs), desc=desc, disable=not progress, leave=False)
    with bar:
        if workers > 1 and len(jobs) > 1:
            with ProcessPoolExecutor(max_workers=workers, mp_context=_CONTEXT,
                                     initializer=_init_worker) as pool:
                # submitted in cost order, started first come first served
                futures = {pool.submit(fn, jobs[i]): i for i in order}
                try:
                    for future in as_completed(futures):
                        finished(futures[future], future.result())
                        bar.update()
                except BaseException:  # a failed job or Ctrl-C: start no further job
                    for future in futures:
                        future.cancel()
                    raise
        else:
            with single_thread_blas():
                for i in order:
                    finished(i, fn(jobs[i]))
                    bar.update()
    return results


def resolve_backend(backend: str) -> str:
    """``"auto"`` -> ``"numba"`` when its gradient works here, else ``"reference"``."""
    if backend == "auto":
        return "numba" if numba_available() else "reference"
    return backend
