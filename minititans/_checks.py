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


ON_NONFINITE = ("raise", "warn")
# what the divergence error of the matrix recurrences says (the same on both backends)
LINEAR_WHAT = "linear attention's output or state"
LINEAR_HINT = ("the sums overflowed or the normaliser is 0 (normalize=True with "
               "feature_map='identity'): scale q, k, v down or normalise with 'elu1'")
DELTA_WHAT = "the delta rule's weights or outputs"
DELTA_HINT = ("lower beta (a step with beta |k_t|^2 > 2 grows the weights), raise alpha, "
              "or normalise the keys")


def report_divergence(token: int, on_nonfinite: str, detail: str = "", stacklevel: int = 3,
                      **message):
    """Raise :class:`MemoryDivergenceError` for ``token`` (``on_nonfinite="raise"``) or warn
    with its message (``"warn"``). ``stacklevel`` counts from the caller of this helper;
    ``message`` (``what``, ``hint``, ``reason``) is passed to the error."""
    err = MemoryDivergenceError(int(token), detail, **message)
    if on_nonfinite == "raise":
        raise err
    warnings.warn(str(err), RuntimeWarning, stacklevel=stacklevel + 1)


def weight_bound(dtype, depth: int) -> float:
    r"""The largest weight magnitude a learned recurrent memory may reach before it counts as
    diverged: $B = \mathrm{finfo}(\text{dtype}).\max^{1/(2L + 2)}$ for depth $L$.

    Why a bound and not only "NaN or inf": a depth-$L$ read multiplies $L$ weights and the
    surprise of its first layer $2L - 1$, so weights far below the float range already
    overflow inside the forward or the gradient. Two correct implementations then round
    the overflow differently (one gets NaN from inf·0 where the other gets a saturated 0),
    and the token at which the weights finally turn NaN differs between them. Below $B$ a
    product of $2L + 2$ weights stays within the float range (the sums over the layers'
    widths take a factor of the width per layer, far below the margin for unit-scale keys),
    so every backend computes the same weights up to rounding, and the first token past
    $B$ is the same on all of them. $B$: float64
    1.2e77 (L = 1), 2.4e51 (2), 3.4e38 (3); float32 4.3e9, 2.6e6, 6.6e4.
    """
    return float(np.finfo(dtype).max) ** (1.0 / (2 * int(depth) + 2))


def weights_diverged(arrays, bound: float) -> bool:
    """Any NaN, inf or magnitude above ``bound`` in ``arrays`` (autograd boxes looked through)."""
    # not (|w| <= B) is also True for NaN
    return any(not np.all(np.abs(np.asarray(getval(w))) <= bound) for w in arrays)


def first_diverged_token(x, bound: float, axis: int = -3) -> int:
    """The first index along ``axis`` (the tokens) of a stack of weights ``x`` at which any
    entry is NaN, inf or above ``bound`` in magnitude, or -1 when none is."""
    x = np.asarray(value_of(x))
    bad = ~(np.abs(x) <= bound)
    if x.size == 0 or not bad.any():
        return -1
    return int(np.argmax(np.moveaxis(bad, axis, 0).reshape(x.shape[axis], -1).any(axis=1)))


def diverged_reason(bound: float) -> str:
    """The ``reason`` of a :class:`MemoryDivergenceError` raised by the weight bound."""
    return f"diverged (a NaN, an inf or a magnitude above {bound:.2g})"


def first_nonfinite_token(x, axis: int = -2) -> int:
    """The first index along ``axis`` (the tokens) at which ``x`` has a NaN or inf anywhere
    (over every other axis), or -1 when ``x`` is finite."""
    x = np.asarray(value_of(x))
    if x.size == 0 or np.all(np.isfinite(x)):
        return -1
    bad = np.moveaxis(~np.isfinite(x), axis, 0).reshape(x.shape[axis], -1).any(axis=1)
    return int(np.argmax(bad))


def check_recurrence(y, on_nonfinite: str, *, what: str, hint: str, state_token: int = -1,
                     stacklevel: int = 3, state_reason: str = "became non-finite") -> None:
    """The divergence rule of every recurrence: raise (or warn) naming the first bad token.

    The first bad token is the first whose output row of ``y`` ``(..., T, d_v)`` (token axis
    -2) is not finite, or ``state_token``, the first at which the carried state is not
    (-1: it stays finite; for learned weights, past :func:`weight_bound`, which
    ``state_reason`` then says), whichever comes first.
    """
    bad = first_nonfinite_token(y)
    reason = "became non-finite"
    if state_token >= 0 and (bad < 0 or state_token <= bad):
        bad, reason = state_token, state_reason
    if bad >= 0:
        report_divergence(bad, on_nonfinite, stacklevel=stacklevel + 1, what=what, hint=hint,
                          reason=reason)


def check_rng(rng) -> None:
    """Every initialiser and sampler takes an explicit ``np.random.Generator``."""
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")


def check_float_dtype(dtype) -> np.dtype:
    """A ``dtype`` argument: float32 or float64 (the two every kernel runs in)."""
    dtype = np.dtype(dtype)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
    return dtype


def cast_gate(gate, dtype):
    """A checked gate (a float or an array ``(T,)``) in ``dtype``: Python floats stay floats
    (they never change a result's dtype), arrays are cast."""
    return gate.astype(dtype) if isinstance(gate, np.ndarray) else gate


def all_finite(*arrays) -> bool:
    """Whether every array is free of NaN and inf."""
    return all(np.all(np.isfinite(value_of(a))) for a in arrays)


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


def check_bool(name: str, value) -> bool:
    """Check that ``value`` is True or False (a NumPy bool too; not a string or a number)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_choice(name: str, value, choices) -> str:
    """Check that ``value`` is one of ``choices``."""
    if value not in choices:
        opts = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {opts}, got {value!r}")
    return value


def check_gate(name: str, gate, T: int, *, low=0.0, high=None):
    """Broadcast a per-token gate to shape ``(T,)`` and check its range.

    ``gate`` is a Python/NumPy scalar, an array of shape ``(T,)`` or a list of ``T``
    numbers. Returns the gate as given when it is an array (so autograd can still
    differentiate through it), or a float array of shape ``(T,)`` for a scalar or a list.
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
            # a float array (or its autograd box) as given; a list or an int array as floats
            out = gate if arr.dtype.kind == "f" and not isinstance(raw, (list, tuple)) else vals
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
