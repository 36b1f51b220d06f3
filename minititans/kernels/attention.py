r"""Numba twins of the other hot loops: sliding-window attention, linear attention, the delta rule.

Twins of :func:`minititans.attention.causal_attention` (Eq. 2 with ``window`` and
``prefix``), :func:`minititans.linear_attention.linear_attention_recurrent` (Eqs. 4–5) and
:func:`minititans.linear_attention.delta_rule` /
:func:`~minititans.linear_attention.gated_delta_rule` (Appendix C), with the same names,
arguments and results, and a parity test each.

* :func:`causal_attention` never builds the $T \times T$ mask. Queries go in blocks of 64;
  a block sees the prefix $[0, p)$ and one contiguous run of keys $(i_0 - w, i_1)$, so its
  scores are two GEMMs, its softmax a row loop, its output two more GEMMs. Cost
  $O(T (w + p) d)$ instead of $O(T^2 d)$; leading axes (batch, heads) run in parallel.
* :func:`linear_attention_recurrent` and :func:`delta_rule` carry the matrix state through
  time in one fused pass per token (update row $a$ of $W$, then add $q_a W_a$ to the read),
  the loops over the contiguous output axis, so they vectorise without fastmath.

**Why there is no numba VJP of attention.** Training differentiates the NumPy reference with
autograd. Its backward is four dense GEMMs on $T \times T$ matrices plus elementwise work,
all inside BLAS; at the lengths the models here train on ($T \le 2048$) a numba backward
could only skip the masked-out part of those GEMMs, and ``minititans bench`` measures how
much that would be worth (the "attention fwd+bwd (autograd)" row against the forward twin):
the window saves at most a factor $T / (w + p)$ of BLAS time, while the memory scan, whose
time loop NumPy cannot batch, is where numba pays (see docs/performance.md).
"""

from __future__ import annotations

import math

import numba
import numpy as np
from autograd.tracer import getval

from .._checks import (
    DELTA_HINT,
    DELTA_WHAT,
    FEATURE_MAPS,
    LINEAR_HINT,
    LINEAR_WHAT,
    ON_NONFINITE,
    all_finite,
    check_array,
    check_bool,
    check_choice,
    check_gate,
    check_int,
    check_qkv,
    check_qkv_rows,
    check_recurrence,
    diverged_reason,
    first_nonfinite_token,
    weight_bound,
)
from ._jit import kernel, parallel_kernel
from .layout import as_kernel_array
from .rows import exceeds
from .scalars import fast_exp

_BLOCK = 64  # queries per block of the windowed attention


# --- sliding-window softmax attention (Eq. 2) ---------------------------------------------


@kernel
def _window_attention_one(q, k, v, window, prefix, out):
    """Eq. 2 for one head: ``q``, ``k`` ``(T, d)``, ``v`` ``(T, d_v)``; ``window <= 0`` is None."""
    T, d = q.shape
    dv = v.shape[1]
    t_ = q.dtype.type
    sqrt_d = t_(math.sqrt(d))
    p = min(prefix, T)
    sp = np.empty(_BLOCK * max(p, 1), q.dtype)
    width = (T if window <= 0 else min(T, window + _BLOCK)) + 1
    sw = np.empty(_BLOCK * width, q.dtype)
    tmp = np.empty((_BLOCK, dv), q.dtype)
    for i0 in range(0, T, _BLOCK):
        i1 = min(T, i0 + _BLOCK)
        nb = i1 - i0
        qb = q[i0:i1]
        # keys of the block: the prefix [0, p) and one run [lo, i1) (j > i - w, j >= p)
        lo = p if window <= 0 else max(p, i0 - window + 1)
        nw = max(i1 - lo, 0)
        spb = sp[:nb * p].reshape((nb, p))
        if p > 0:
            np.dot(qb, k[:p].T, spb)  # (nb, p)
        swb = sw[:nb * nw].reshape((nb, nw))
        if nw > 0:
            np.dot(qb, k[lo:i1].T, swb)  # (nb, nw)
        for r in range(nb):
            i = i0 + r
            # visible run of row i: lo <= j <= i and j > i - w
            c0 = 0 if window <= 0 else max(0, i - window + 1 - lo)
            c1 = i - lo + 1  # exclusive
            m = -np.inf
            for c in range(p):
                spb[r, c] = spb[r, c] / sqrt_d
                m = max(m, spb[r, c])
            for c in range(max(c0, 0), max(c1, 0)):
                swb[r, c] = swb[r, c] / sqrt_d
                m = max(m, swb[r, c])
            # softmax: shift by the row maximum so exp() <= 1
            total = t_(0.0)
            for c in range(p):
                spb[r, c] = fast_exp(spb[r, c] - m)
                total += spb[r, c]
            for c in range(nw):
                if c0 <= c < c1:
                    swb[r, c] = fast_exp(swb[r, c] - m)
                    total += swb[r, c]
                else:
                    swb[r, c] = t_(0.0)
            for c in range(p):
                spb[r, c] /= total
            for c in range(nw):
                swb[r, c] /= total
        ob = out[i0:i1]
        if nw > 0:
            np.dot(swb, v[lo:i1], ob)  # (nb, d_v)
        else:
            ob[:, :] = 0
        if p > 0:
            tb = tmp[:nb]
            np.dot(spb, v[:p], tb)
            for r in range(nb):
                for j in range(dv):
                    ob[r, j] += tb[r, j]


@parallel_kernel
def _window_attention(q, k, v, window, prefix, out):
    for n in numba.prange(q.shape[0]):
        _window_attention_one(q[n], k[n], v[n], window, prefix, out[n])


def causal_attention(q, k, v, window=None, prefix: int = 0):
    r"""Eq. 2, windowed, with a visible prefix: the twin of
    :func:`minititans.attention.causal_attention` (same arguments, same result).

    $$y_i = \sum_{j \in \mathcal{V}(i)} \mathrm{softmax}_j(q_i k_j^\top / \sqrt d)\, v_j,\quad
      \mathcal{V}(i) = \{j < p\} \cup \{i - w < j \le i\}$$

    Args:
        q, k: ``(..., T, d)``; v: ``(..., T, d_v)``; leading axes run in parallel.
        window: None (full causal) or $w \ge 1$. prefix: $p \ge 0$, at most T.

    Returns:
        ``(..., T, d_v)`` in the common dtype. Not differentiable (see the module docstring).
    """
    q_, k_, v_ = check_qkv(q, k, v)
    *lead, T, d = q_.shape
    prefix = check_int("prefix", prefix, minimum=0)
    if prefix > T:
        raise ValueError(f"prefix must be <= the sequence length {T}, got {prefix}")
    w = 0 if window is None else check_int("window", window, minimum=1)
    dtype = np.result_type(q_, k_, v_)
    dv = v_.shape[-1]
    n = math.prod(lead)  # not -1: a reshape cannot infer it when T = 0
    Q, K, V = (as_kernel_array(x.reshape((n,) + x.shape[-2:]), dtype)
               for x in (q_, k_, v_))
    out = np.empty(Q.shape[:2] + (dv,), dtype=dtype)
    if out.size:
        _window_attention(Q, K, V, w, prefix, out)
    return out.reshape(tuple(lead) + (T, dv))


# --- linear attention, recurrent form (Eqs. 4–5) -------------------------------------------


@kernel
def _phi(x, feature_map, out):
    """The feature map into ``out``: identity (0) or elu(x) + 1 (1)."""
    t_ = x.dtype.type
    for a in range(x.shape[0]):
        if feature_map == 0 or x[a] > 0:
            out[a] = x[a] + (t_(0.0) if feature_map == 0 else t_(1.0))
        else:
            out[a] = fast_exp(x[a])


@kernel
def _linear_recurrent_one(q, k, v, feature_map, normalize, M, z, y):
    """Eqs. 4–5 for one head, in place on ``M`` ``(d, d_v)`` and ``z`` ``(d,)``; writes ``y``."""
    T, d = q.shape
    dv = v.shape[1]
    t_ = q.dtype.type
    fq = np.empty(d, q.dtype)
    fk = np.empty(d, q.dtype)
    for t in range(T):
        _phi(q[t], feature_map, fq)
        _phi(k[t], feature_map, fk)
        y[t, :] = 0
        for a in range(d):
            ka = fk[a]
            qa = fq[a]
            z[a] += ka
            Ma = M[a]
            for j in range(dv):
                Ma[j] += ka * v[t, j]  # Eq. 4: M_t = M_{t-1} + φ(k_t)ᵀ v_t
                y[t, j] += qa * Ma[j]  # Eq. 5: y_t = φ(q_t) M_t
        if normalize:
            den = t_(0.0)
            for a in range(d):
                den += fq[a] * z[a]
            for j in range(dv):
                y[t, j] /= den


@parallel_kernel
def _linear_recurrent(q, k, v, feature_map, normalize, M, z, y):
    for n in numba.prange(q.shape[0]):
        _linear_recurrent_one(q[n], k[n], v[n], feature_map, normalize, M[n], z[n], y[n])


def _phi_numpy(x, feature_map):
    """:func:`_phi` on whole arrays (for naming the token where the normaliser overflows)."""
    if feature_map == "identity":
        return x
    return np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0)))


def linear_attention_recurrent(q, k, v, feature_map: str = "identity", normalize: bool = False,
                               state=None, *, on_nonfinite: str = "raise"):
    r"""Eqs. 4–5 as a recurrence: the twin of
    :func:`minititans.linear_attention.linear_attention_recurrent`.

    $$M_t = M_{t-1} + \phi(k_t)^\top v_t,\quad z_t = z_{t-1} + \phi(k_t),\quad
      y_t = \phi(q_t) M_t\ \big/\ \phi(q_t) z_t^\top\ \text{(iff normalize)}$$

    Args:
        q, k: ``(..., T, d)``; v: ``(..., T, d_v)``; leading axes run in parallel.
        feature_map: "identity" or "elu1". normalize: divide by the kernel sum (Eq. 3).
        state: None or ``(M (..., d, d_v), z (..., d))`` from a previous call.
        on_nonfinite: "raise" or "warn" when an output or the state is NaN or inf, naming
            the first such token as the reference does.

    Returns:
        ``(y (..., T, d_v), (M_T, z_T))``.
    """
    check_choice("feature_map", feature_map, FEATURE_MAPS)
    normalize = check_bool("normalize", normalize)
    check_choice("on_nonfinite", on_nonfinite, ON_NONFINITE)
    q_, k_, v_ = check_qkv(q, k, v)
    *lead, T, d = q_.shape
    dv = v_.shape[-1]
    lead = tuple(lead)
    dtype = np.result_type(q_, v_)
    if state is None:
        M = np.zeros(lead + (d, dv), dtype)
        z = np.zeros(lead + (d,), dtype)
    else:
        if not isinstance(getval(state), tuple) or len(state) != 2:
            raise TypeError("state must be None or the (M, z) tuple of a previous call")
        M = check_array("state[0] (M)", state[0], ndim=len(lead) + 2)
        z = check_array("state[1] (z)", state[1], ndim=len(lead) + 1)
        if M.shape != lead + (d, dv) or z.shape != lead + (d,):
            raise ValueError(f"state must be (M, z) of shapes {lead + (d, dv)} and "
                             f"{lead + (d,)}, got {M.shape} and {z.shape}")
        dtype = np.result_type(dtype, M, z)
    n = math.prod(lead)  # not -1: a reshape cannot infer it when T = 0
    Q, K, V = (as_kernel_array(x.reshape((n,) + x.shape[-2:]), dtype)
               for x in (q_, k_, v_))
    Ms = np.array(M, dtype=dtype).reshape((n, d, dv))  # copies: the state is not mutated
    zs = np.array(z, dtype=dtype).reshape((n, d))
    y = np.zeros(Q.shape[:2] + (dv,), dtype=dtype)
    if T and Q.shape[0]:
        _linear_recurrent(Q, K, V, FEATURE_MAPS.index(feature_map), normalize, Ms, zs, y)
    # the divergence rule of the reference: a non-finite M_t shows in y_t, z_t may overflow alone
    state_token = -1
    if not all_finite(zs):
        with np.errstate(over="ignore", invalid="ignore"):
            z_all = (np.asarray(z, dtype).reshape((n, 1, d))
                     + np.cumsum(_phi_numpy(K, feature_map), axis=1))
        state_token = first_nonfinite_token(z_all)
    check_recurrence(y, on_nonfinite, what=LINEAR_WHAT, hint=LINEAR_HINT,
                     state_token=state_token)
    return y.reshape(lead + (T, dv)), (Ms.reshape(lead + (d, dv)), zs.reshape(lead + (d,)))


# --- the delta rule (Appendix C) ------------------------------------------------------------


@kernel
def _delta_loop(q, k, v, beta, alpha, gated, bound, W, y):
    r"""The delta rule in place on ``W`` ``(d, d_v)``; writes ``y`` ``(T, d_v)``.

    Titans: $e = k W_{t-1} - v$, $W_t = (1-\alpha) W_{t-1} - \beta k^\top e$.
    Gated DeltaNet: $e = (1-\alpha) k W_{t-1} - v$, the same $W_t$ formula with this $e$.

    Returns:
        The first token whose $W_t$ has diverged (NaN, inf or above ``bound``), or -1.
    """
    T, d = q.shape
    dv = v.shape[1]
    t_ = q.dtype.type
    e = np.empty(dv, q.dtype)
    first_bad = -1
    for t in range(T):
        decay = t_(1.0) - alpha[t]
        # e = k_t W_{t-1}, rows of W scaled by k_t[a] (no reduction across j)
        e[:] = 0
        for a in range(d):
            ka = k[t, a]
            for j in range(dv):
                e[j] += ka * W[a, j]
        for j in range(dv):
            e[j] = (decay * e[j] if gated else e[j]) - v[t, j]
        y[t, :] = 0
        for a in range(d):
            g = -beta[t] * k[t, a]
            qa = q[t, a]
            Wa = W[a]
            for j in range(dv):
                Wa[j] = decay * Wa[j] + g * e[j]
                y[t, j] += qa * Wa[j]  # y_t = q_t W_t
        if first_bad < 0 and exceeds(W.ravel(), bound):
            first_bad = t
    return first_bad


def _delta(q, k, v, beta, alpha, state, return_state, gated, on_nonfinite):
    check_choice("on_nonfinite", on_nonfinite, ON_NONFINITE)
    q_, k_, v_ = check_qkv_rows(q, k, v)
    T, d = q_.shape
    dv = v_.shape[1]
    dtype = np.result_type(q_, k_, v_)
    b = as_kernel_array(getval(check_gate("beta", beta, T, low=0.0)), dtype)
    a = as_kernel_array(getval(check_gate("alpha", 0.0 if alpha is None else alpha, T,
                                          low=0.0, high=1.0)), dtype)
    if state is None:
        W = np.zeros((d, dv), dtype)
    else:
        W_ = check_array("state", state, ndim=2)
        if W_.shape != (d, dv):
            raise ValueError(f"state must have shape {(d, dv)}, got {W_.shape}")
        W = np.array(W_, dtype=dtype)  # a copy: the state is not mutated
    Q, K, V = (as_kernel_array(x, dtype) for x in (q_, k_, v_))
    y = np.zeros((T, dv), dtype)
    bound = weight_bound(dtype, 1)
    first_bad = _delta_loop(Q, K, V, b, a, gated, dtype.type(bound), W, y) if T else -1
    # the weights' rule (_checks.weight_bound, as for a depth-1 memory) or the outputs
    check_recurrence(y, on_nonfinite, what=DELTA_WHAT, hint=DELTA_HINT, state_token=first_bad,
                     state_reason=diverged_reason(bound))
    return (y, W) if return_state else y


def delta_rule(q, k, v, beta, alpha=None, *, state=None, return_state: bool = False,
               on_nonfinite: str = "raise"):
    r"""The delta rule with Titans' forgetting gate: the twin of
    :func:`minititans.linear_attention.delta_rule`.

    $$W_t = (1 - \alpha_t) W_{t-1} - \beta_t\, k_t^\top (k_t W_{t-1} - v_t), \qquad y_t = q_t W_t$$

    Args:
        q, k: ``(T, d)``; v: ``(T, d_v)``; beta: float or ``(T,)``; alpha: None, float or
        ``(T,)``; state: initial ``W_0`` ``(d, d_v)`` (None: zeros); on_nonfinite: "raise"
        (default) or "warn" when an output becomes NaN or inf or the weights diverge (past
        ``_checks.weight_bound``), naming the first such token as the reference does.

    Returns:
        ``y`` ``(T, d_v)``, or ``(y, W_T)`` if ``return_state``.
    """
    return _delta(q, k, v, beta, alpha, state, return_state, False, on_nonfinite)


def gated_delta_rule(q, k, v, beta, alpha, *, state=None, return_state: bool = False,
                     on_nonfinite: str = "raise"):
    r"""Gated DeltaNet (gate before the error): the twin of
    :func:`minititans.linear_attention.gated_delta_rule`.

    $$W_t = (1-\alpha_t) W_{t-1} - \beta_t\, k_t^\top\big(k_t (1-\alpha_t) W_{t-1} - v_t\big)$$
    """
    return _delta(q, k, v, beta, alpha, state, return_state, True, on_nonfinite)
