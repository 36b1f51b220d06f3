"""Argument checks shared by every public function.

Each check raises ``ValueError`` or ``TypeError`` with a message that names the argument and
says what was expected, so a mistake surfaces at the call that made it rather than as a NaN
or an ``IndexError`` deep inside a loop. The checks look through autograd boxes (``getval``),
so they also run while a function is being differentiated.
"""

from __future__ import annotations

import numbers
import warnings

import numpy as np
from autograd.tracer import getval

from .errors import MemoryDivergenceError

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
FEATURE_MAPS = ("identity", "elu1")  # of linear attention, in the order of the kernels' codes


def report_divergence(token: int, on_nonfinite: str, detail: str = "", stacklevel: int = 3):
    """Raise :class:`MemoryDivergenceError` for ``token`` (``on_nonfinite="raise"``) or warn
    with its message (``"warn"``). ``stacklevel`` counts from the caller of this helper."""
    err = MemoryDivergenceError(int(token), detail)
    if on_nonfinite == "raise":
        raise err
    warnings.warn(str(err), RuntimeWarning, stacklevel=stacklevel + 1)


def value_of(x):
    """The plain NumPy value behind ``x`` (unwraps an autograd box)."""
    return getval(x)


def check_array(name: str, x, *, ndim=None, last_dim=None, finite: bool = True):
    """Check that ``x`` is a float32/float64 array of the expected rank; return its value.

    ``ndim`` is an int or a tuple of allowed ranks; ``last_dim`` the required size of the
    last axis (or None). Integer, boolean, complex and float16 arrays are refused with a
    ``TypeError``: the maths here is done in float32 or float64 only.
    """
    raw = value_of(x)
    if isinstance(raw, (list, tuple)):
        raise TypeError(f"{name} must be a NumPy array, got a {type(raw).__name__}")
    arr = np.asarray(raw)
    if arr.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a float32 or float64 array, got dtype {arr.dtype}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if arr.ndim not in allowed:
            want = " or ".join(str(a) for a in allowed)
            raise ValueError(f"{name} must have {want} dimensions, got shape {arr.shape}")
    if last_dim is not None and (arr.ndim == 0 or arr.shape[-1] != last_dim):
        raise ValueError(f"{name} must have last dimension {last_dim}, got shape {arr.shape}")
    if finite and arr.size and not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or inf")
    return arr


def check_int(name: str, value, *, minimum=None) -> int:
    """Check that ``value`` is an integer (not a bool) at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_choice(name: str, value, choices) -> str:
    """Check that ``value`` is one of ``choices``."""
    if value not in choices:
        opts = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {opts}, got {value!r}")
    return value


def check_gate(name: str, gate, T: int, *, low=0.0, high=None):
    """Broadcast a per-token gate to shape ``(T,)`` and check its range.

    ``gate`` is a Python/NumPy scalar or an array of shape ``(T,)``. Returns the gate as
    given when it is an array (so autograd can still differentiate through it), or a float
    array of shape ``(T,)`` for a scalar.
    """
    raw = value_of(gate)
    if isinstance(raw, bool) or raw is None:
        raise TypeError(f"{name} must be a float or an array of shape ({T},), got {raw!r}")
    if isinstance(raw, numbers.Real):
        vals = np.full(T, float(raw))
        # a traced scalar (autograd box) stays traced: broadcast it instead of copying
        out = vals if gate is raw else gate * np.ones(T)
    else:
        arr = np.asarray(raw)
        if arr.dtype.kind not in "fiu" or arr.dtype == np.float16:
            raise TypeError(f"{name} must be a float or a float array, got dtype {arr.dtype}")
        if arr.ndim == 0:
            vals = np.full(T, float(arr))
            out = vals
        elif arr.shape != (T,):
            raise ValueError(f"{name} must be a float or have shape ({T},), got shape {arr.shape}")
        else:
            vals = arr.astype(float)
            out = gate if arr.dtype.kind == "f" else vals
    if vals.size and not np.all(np.isfinite(vals)):
        raise ValueError(f"{name} contains NaN or inf")
    if low is not None and vals.size and vals.min() < low:
        raise ValueError(f"{name} must be >= {low}, got a minimum of {vals.min():.6g}")
    if high is not None and vals.size and vals.max() > high:
        raise ValueError(f"{name} must be <= {high}, got a maximum of {vals.max():.6g}")
    return out


def check_qkv(q, k, v):
    """Queries, keys and values of (linear) attention: ``(..., T, d)``, ``(..., T, d)``,
    ``(..., T, d_v)`` float arrays. Returns their plain values ``(q, k, v)``."""
    q_ = check_array("q", q)
    k_ = check_array("k", k)
    v_ = check_array("v", v)
    if q_.ndim < 2:
        raise ValueError(f"q must have shape (..., T, d), got shape {q_.shape}")
    if k_.shape != q_.shape:
        raise ValueError(f"k must have the shape of q {q_.shape}, got {k_.shape}")
    if v_.ndim != q_.ndim or v_.shape[:-1] != q_.shape[:-1]:
        raise ValueError(f"v must have shape {q_.shape[:-1] + ('d_v',)}, got {v_.shape}")
    return q_, k_, v_


def check_qkv_rows(q, k, v):
    """Queries, keys, values of a recurrence over one sequence: ``(T, d)``, ``(T, d)``,
    ``(T, d_v)``. Returns their plain values ``(q, k, v)``."""
    q_ = check_array("q", q, ndim=2)
    k_ = check_array("k", k, ndim=2)
    v_ = check_array("v", v, ndim=2)
    if k_.shape != q_.shape:
        raise ValueError(f"k must have the shape of q {q_.shape}, got {k_.shape}")
    if v_.shape[0] != q_.shape[0]:
        raise ValueError(f"v must have {q_.shape[0]} rows like q, got shape {v_.shape}")
    return q_, k_, v_
