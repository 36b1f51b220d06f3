r"""Running the memory over a sequence: the token loop and the chunked form (Section 3.2).

``memory_scan`` applies Eqs. (13)-(14) to every token and reads the memory with a query:
$y_t = \mathcal{M}_t(q_t)$ (``read="after"``, the default: a token reads after it writes,
as linear attention and the delta rule do) or $y_t = \mathcal{M}_{t-1}(q_t)$
(``read="before"``, which MAC needs for Eq. 21).

With ``chunk_size = b`` the sequence is cut into chunks of b tokens and, inside a chunk,
every gradient is taken at the weights left by the previous chunk, $\mathcal{M}_{t'}$ with
$t' = t - \mathrm{mod}(t, b)$ (Eqs. 16-18). The gradients of a chunk are then independent of
each other, so they are computed together; the momentum recurrence of Eq. (18) and the
forgetting recurrence of Eq. (13) are computed by a parallel associative scan. Every token
still reads its own $\mathcal{M}_t$. With $b = 1$ the chunked form *is* the token loop.

The state passes between calls: scanning two halves one after the other, passing the state
on, equals one call on the whole sequence (for ``chunk_size > 1`` when the cut is at a
chunk boundary).
"""

from __future__ import annotations

import warnings

import autograd.numpy as np
import numpy as onp
from autograd.tracer import getval

from .._checks import check_array, check_choice, check_gate, check_int
from .loss import check_loss, per_token_surprise, surprise
from .models import forward_per_token, memory_forward, spec_of
from .parallel_scan import linear_recurrence
from .update import (
    MemoryDivergenceError,
    MemoryState,
    apply_update,
    check_finite,
    check_max_grad_norm,
    check_state,
    clip_by_norm,
)

READS = ("after", "before")
BACKENDS = ("reference", "numba")


def memory_scan(state: MemoryState, keys, values, queries, *, alpha, eta, theta,
                chunk_size: int = 1, read: str = "after", backend: str = "reference",
                loss: str = "l2", p: float = 3.0, delta: float = 1.0,
                max_grad_norm=None, on_nonfinite: str = "raise"):
    r"""Write a sequence into the memory and read it back (Titans Eqs. 13-18).

    Args:
        state: the initial MemoryState $(\mathcal{M}_0, S_0)$.
        keys: ``(T, d_in)``; values: ``(T, d_out)``; queries: ``(T, d_in)``.
        alpha, eta, theta: per-token gates, each a float or an array ``(T,)``;
            $\alpha, \eta \in [0, 1]$, $\theta \ge 0$.
        chunk_size: tokens whose gradients share the chunk-start weights (Eqs. 16-18).
        read: "after" ($y_t = \mathcal{M}_t(q_t)$) or "before" ($\mathcal{M}_{t-1}(q_t)$).
        backend: "reference" (NumPy + autograd, this module) or "numba" (fused kernels).
        loss, p, delta: the inner loss (see :func:`associative_loss`).
        max_grad_norm: clip each token's surprise to this global norm (None: off).
        on_nonfinite: "raise" (default) or "warn" if the weights stop being finite.

    Returns:
        ``(out, state)``: ``out`` ``(T, d_out)`` and the final MemoryState.
    """
    spec = check_state(state)
    check_choice("read", read, READS)
    check_choice("backend", backend, BACKENDS)
    check_choice("on_nonfinite", on_nonfinite, ("raise", "warn"))
    check_loss(loss, p, delta)
    b = check_int("chunk_size", chunk_size, minimum=1)
    check_max_grad_norm(max_grad_norm)
    K = check_array("keys", keys, ndim=2, last_dim=spec.d_in)
    V = check_array("values", values, ndim=2, last_dim=spec.d_out)
    Q = check_array("queries", queries, ndim=2, last_dim=spec.d_in)
    T = K.shape[0]
    if V.shape[0] != T or Q.shape[0] != T:
        raise ValueError(
            "keys, values and queries must have the same length, got "
            f"{K.shape[0]}, {V.shape[0]} and {Q.shape[0]} tokens"
        )
    dtype = onp.result_type(K, V, Q, *(getval(w) for w in spec))
    gates = [_as_dtype(check_gate("alpha", alpha, T, low=0.0, high=1.0), dtype),
             _as_dtype(check_gate("eta", eta, T, low=0.0, high=1.0), dtype),
             _as_dtype(check_gate("theta", theta, T, low=0.0), dtype)]
    if T == 0:
        return onp.zeros((0, spec.d_out), dtype=dtype), state
    if backend == "numba":
        if state.anchor is not None:
            raise ValueError("backend='numba' does not support an anchored MemoryState yet "
                             "(forgetting towards the anchor); use backend='reference'")
        from ..kernels.scan import numba_memory_scan

        return numba_memory_scan(state, keys, values, queries, *gates, chunk_size=b, read=read,
                                 loss=loss, p=p, delta=delta, max_grad_norm=max_grad_norm,
                                 on_nonfinite=on_nonfinite)
    options = dict(loss=loss, p=p, delta=delta, max_grad_norm=max_grad_norm,
                   on_nonfinite=on_nonfinite, read=read)
    # overflow is caught by the explicit finiteness check after every update, which names
    # the token; NumPy's own overflow warnings would only say less, earlier
    with onp.errstate(over="ignore", invalid="ignore"):
        if b == 1:
            return _token_loop(state, keys, values, queries, *gates, **options)
        return _chunked(state, keys, values, queries, *gates, b, **options)


def _as_dtype(gate, dtype):
    return gate.astype(dtype) if isinstance(gate, onp.ndarray) else gate


def _token_loop(state, K, V, Q, alpha, eta, theta, *, loss, p, delta, max_grad_norm,
                on_nonfinite, read):
    """Eqs. (13)-(14) one token at a time: the definition the chunked form must match."""
    M, S, A = state.params, state.momentum, state.anchor
    outs = []
    finite = True
    for t in range(K.shape[0]):
        if read == "before":
            outs.append(memory_forward(M, Q[t]))  # y_t = M_{t-1}(q_t)
        # Eq. 8: the momentary surprise at the current weights M_{t-1}
        u = clip_by_norm(surprise(M, K[t:t + 1], V[t:t + 1], loss, p=p, delta=delta),
                         max_grad_norm)
        M, S = apply_update(M, S, u, alpha[t], eta[t], theta[t], A)
        if finite:
            finite = check_finite(M, t, on_nonfinite)
        if read == "after":
            outs.append(memory_forward(M, Q[t]))  # y_t = M_t(q_t)
    return np.stack(outs), MemoryState(M, S, A)


def _chunked(state, K, V, Q, alpha, eta, theta, b, *, loss, p, delta, max_grad_norm,
             on_nonfinite, read):
    """Eqs. (16)-(18): gradients at the chunk-start weights, recurrences by parallel scan."""
    spec = spec_of(state.params)
    M, S, A = state.params, state.momentum, state.anchor
    outs = []
    finite = True
    for start in range(0, K.shape[0], b):
        c = slice(start, start + b)
        # u_i = ∇ℓ(M_{t'}; x_i) for every token of the chunk, all at the same weights
        u = per_token_surprise(M, K[c], V[c], loss, p=p, delta=delta)  # each (n, *W.shape)
        u = _clip_per_token(u, max_grad_norm)
        th = theta[c]
        # Eq. 18: S_i = η_i S_{i-1} - θ_i u_i, a linear recurrence in S
        S_all = [linear_recurrence(eta[c], -np.reshape(th, (-1, 1, 1)) * g, s)
                 for g, s in zip(u, S)]
        # Eq. 13: M_i = (1 - α_i) M_{i-1} + S_i, the same recurrence with a = 1 - α
        # (with an anchor M̄, for M_i - M̄: M_i = M̄ + (1 - α_i)(M_{i-1} - M̄) + S_i)
        if A is None:
            M_all = [linear_recurrence(1.0 - alpha[c], s_all, w) for s_all, w in zip(S_all, M)]
        else:
            M_all = [a + linear_recurrence(1.0 - alpha[c], s_all, w - a)
                     for s_all, w, a in zip(S_all, M, A)]
        if finite:
            finite = _check_chunk(M_all, start, on_nonfinite)
        if read == "after":
            outs.append(forward_per_token(spec.like(M_all), Q[c]))
        else:
            M_before = [np.concatenate([w[None], w_all[:-1]]) for w, w_all in zip(M, M_all)]
            outs.append(forward_per_token(spec.like(M_before), Q[c]))
        M = spec.like(w_all[-1] for w_all in M_all)
        S = spec.like(s_all[-1] for s_all in S_all)
    return np.concatenate(outs), MemoryState(M, S, A)


def _clip_per_token(u, max_norm):
    if max_norm is None:
        return u
    sq = sum(np.sum(g**2, axis=(1, 2)) for g in u)  # (n,)
    scale = np.minimum(1.0, max_norm / np.maximum(np.sqrt(sq), 1e-30))
    return spec_of(u).like(np.reshape(scale, (-1, 1, 1)) * g for g in u)


def _check_chunk(M_all, start, on_nonfinite):
    ok = onp.ones(getval(M_all[0]).shape[0], dtype=bool)
    for w in M_all:
        ok &= onp.all(onp.isfinite(getval(w)), axis=(1, 2))
    if ok.all():
        return True
    first = start + int(onp.argmin(ok))
    if on_nonfinite == "raise":
        raise MemoryDivergenceError(first)
    warnings.warn(str(MemoryDivergenceError(first)), RuntimeWarning, stacklevel=3)
    return False
