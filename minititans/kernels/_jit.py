"""The one place that decides how every numba kernel of minititans is compiled.

All kernels are compiled with :func:`kernel`, so the options below hold everywhere:

* ``cache=True``: the machine code is written next to the module (``__pycache__``) and a new
  process loads it instead of compiling again.
* ``nogil=True``: a kernel releases the GIL, so threads can run kernels side by side.
* ``error_model="numpy"``: a division by zero gives ``inf``/``nan`` as in NumPy instead of
  raising; it also removes a branch from every division.
* **no fastmath**. ``fastmath=True`` would let LLVM assume there are no NaNs or infinities
  (``nnan``/``ninf``), which silently turns ``isfinite`` checks into ``True`` and breaks the
  divergence check of the memory scan, and it lets LLVM reorder sums. Every loop that has to
  be vectorised is instead written so that it needs no reassociation: the innermost loop runs
  over the contiguous output axis and does ``y[j] += a * W[i, j]`` (no reduction across
  ``j``). Reductions that LLVM cannot vectorise in strict IEEE order are few and short, or
  are done by BLAS (``np.dot``, single calls on whole chunks).
* small helpers that the per-token loops call a few times a token are inlined by numba
  (:func:`inline_kernel`): a call with array arguments costs tens of nanoseconds.
* the time loop of every scan is serial; only independent sequences run in parallel
  (:func:`parallel_kernel`, ``numba.prange`` over the batch axis).

``NUMBA_DISABLE_JIT=1`` turns every kernel back into plain Python (the test suite runs a
small subset that way, so the kernels are checked as ordinary NumPy code too).
"""

from __future__ import annotations

import numba

# Options shared by every kernel; change them here and nowhere else.
JIT_OPTIONS = dict(cache=True, nogil=True, error_model="numpy", fastmath=False)


def kernel(fn):
    """Compile ``fn`` as a serial nopython kernel with :data:`JIT_OPTIONS`."""
    return numba.njit(**JIT_OPTIONS)(fn)


def inline_kernel(fn):
    """:func:`kernel` for a small helper that numba inlines into its callers (the per-token
    loops call some a few times a token; a call with array arguments costs tens of ns)."""
    return numba.njit(inline="always", **JIT_OPTIONS)(fn)


def parallel_kernel(fn):
    """Compile ``fn`` with ``parallel=True``: only for ``numba.prange`` over independent items."""
    return numba.njit(parallel=True, **JIT_OPTIONS)(fn)


def specialise(py_func):
    """Give the plain-Python scalar function ``py_func`` per-type kernels inside numba.

    ``@specialise(f)`` decorates an ``impl(x_type)`` that returns the implementation for
    that numba type (``numba.extending.overload``). Compiled kernels call the
    implementation inlined (and cached with them); with ``NUMBA_DISABLE_JIT=1`` the plain
    ``py_func`` runs instead.
    """
    from numba.extending import overload

    return overload(py_func)
