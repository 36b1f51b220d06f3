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

**Where the cache goes.** numba writes it to ``NUMBA_CACHE_DIR`` if that is set, else next to
the source (``__pycache__``), else to its own per-user cache; when none of these can be
written (a read-only installation whose user has no writable home cache) numba refuses to
decorate the function at all ("cannot cache function ...: no locator available"), which
would make the whole numba backend unusable. Then :func:`jit` caches the kernels in a
per-user directory of minititans (:func:`user_cache_dir`), or, when that cannot be written
either, compiles them uncached (they are then compiled again in every new process), and
says once which it did (a ``UserWarning``).
"""

from __future__ import annotations

import os
import sys
import tempfile
import warnings
from pathlib import Path

import numba

# Options shared by every kernel; change them here and nowhere else.
JIT_OPTIONS = dict(cache=True, nogil=True, error_model="numpy", fastmath=False)

_SAID = set()  # the cache fallbacks already reported in this process


def user_cache_dir() -> Path:
    """The per-user cache of minititans' kernels when numba has no writable cache of its own:
    ``$XDG_CACHE_HOME/minititans/numba`` (default ``~/.cache``), ``~/Library/Caches/...`` on
    macOS, ``%LOCALAPPDATA%\\minititans\\numba`` on Windows."""
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "minititans" / "numba"


def _writable(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
        return True
    except OSError:
        return False


def _say_once(key: str, message: str):
    if key not in _SAID:
        _SAID.add(key)
        warnings.warn(message, UserWarning, stacklevel=4)


def _no_locator(err: RuntimeError) -> bool:
    return "no locator available" in str(err)


def jit(fn, **options):
    """``numba.njit(**options)(fn)``, with a cache that works on a read-only installation.

    When numba finds nowhere to write the cache of ``fn``, the kernel is cached in
    :func:`user_cache_dir` (numba's ``CACHE_DIR`` is pointed there only while this kernel
    picks its cache, so other libraries' functions are not moved), or compiled uncached when
    that directory cannot be written either; either way a warning says so once.
    """
    try:
        return numba.njit(**options)(fn)
    except RuntimeError as err:
        if not (options.get("cache") and _no_locator(err)):
            raise
    where = user_cache_dir()
    if _writable(where):
        previous = numba.config.CACHE_DIR
        numba.config.CACHE_DIR = str(where)
        try:
            compiled = numba.njit(**options)(fn)
        except RuntimeError as err:
            if not _no_locator(err):
                raise
        else:
            _say_once("user", f"numba cannot write its cache next to minititans "
                              f"({Path(fn.__code__.co_filename).parent}) nor in its own user "
                              f"cache: the kernels are cached in {where} instead (set "
                              "NUMBA_CACHE_DIR to choose the directory)")
            return compiled
        finally:
            numba.config.CACHE_DIR = previous
    _say_once("none", f"numba has no writable cache directory (not next to minititans, not in "
                      f"its user cache, not {where}): the kernels are compiled uncached, so "
                      "again in every new process (set NUMBA_CACHE_DIR to a writable "
                      "directory to cache them)")
    return numba.njit(**{**options, "cache": False})(fn)


def kernel(fn):
    """Compile ``fn`` as a serial nopython kernel with :data:`JIT_OPTIONS`."""
    return jit(fn, **JIT_OPTIONS)


def inline_kernel(fn):
    """:func:`kernel` for a small helper that numba inlines into its callers (the per-token
    loops call some a few times a token; a call with array arguments costs tens of ns)."""
    return jit(fn, inline="always", **JIT_OPTIONS)


def parallel_kernel(fn):
    """Compile ``fn`` with ``parallel=True``: only for ``numba.prange`` over independent items."""
    return jit(fn, parallel=True, **JIT_OPTIONS)


def specialise(py_func):
    """Give the plain-Python scalar function ``py_func`` per-type kernels inside numba.

    ``@specialise(f)`` decorates an ``impl(x_type)`` that returns the implementation for
    that numba type (``numba.extending.overload``). Compiled kernels call the
    implementation inlined (and cached with them); with ``NUMBA_DISABLE_JIT=1`` the plain
    ``py_func`` runs instead.
    """
    from numba.extending import overload

    return overload(py_func)
