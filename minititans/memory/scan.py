r"""Running the memory over a sequence: the token loop and the chunked form (Section 3.2).

``memory_scan`` applies Eqs. 13–14 to every token and reads the memory with a query:
$y_t = \mathcal{M}_t(q_t)$ (``read="after"``, the default: a token reads after it writes,
as linear attention and the delta rule do) or $y_t = \mathcal{M}_{t-1}(q_t)$
(``read="before"``, which MAC needs for Eq. 21).

With ``chunk_size = b`` the sequence is cut into chunks of b tokens and, inside a chunk,
every gradient is taken at the weights left by the previous chunk, $\mathcal{M}_{t'}$ with
$t' = t - \mathrm{mod}(t, b)$ (Eqs. 16–18). The gradients of a chunk are then independent of
each other, so they are computed together; the momentum recurrence of Eq. 18 and the
forgetting recurrence of Eq. 13 are computed by a parallel associative scan. Every token
still reads its own $\mathcal{M}_t$. With $b = 1$ the chunked form *is* the token loop.

The state passes between calls: scanning two halves one after the other, passing the state
on, equals one call on the whole sequence (for ``chunk_size > 1`` when the cut is at a
chunk boundary).
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import autograd.numpy as anp
import numpy as np
from autograd.tracer import getval, isbox

from .._checks import (
    all_finite,
    cast_gate,
    check_array,
    check_choice,
    check_gate,
    check_int,
    check_recurrence,
    diverged_reason,
    first_diverged_token,
    report_divergence,
    weight_bound,
    weights_diverged,
)
from ..errors import MEMORY_HINT
from .loss import check_loss, per_token_surprise, surprise
from .models import forward_per_token, memory_forward, spec_of
from .parallel_scan import linear_recurrence
from .update import (
    MemoryState,
    apply_update,
    channel_rates,
    check_alpha,
    check_max_grad_norm,
    check_state,
    check_theta,
    check_weights,
    clip_by_norm,
    output_channels,
    result_dtype,
    state_in_dtype,
)

READS = ("after", "before")
BACKENDS = ("reference", "numba")


def memory_scan(state: MemoryState, keys, values, queries, *, alpha, eta, theta,
                chunk_size: int = 1, read: str = "after", backend: str = "reference",
                loss: str = "l2", p: float = 3.0, delta: float = 1.0,
                max_grad_norm=None, on_nonfinite: str = "raise", partial_chunk: str = "warn"):
    r"""Write a sequence into the memory and read it back (Titans Eqs. 13–18).

    Args:
        state: the initial MemoryState $(\mathcal{M}_0, S_0)$.
        keys: ``(T, d_in)``; values: ``(T, d_out)``; queries: ``(T, d_in)``.
        alpha, eta, theta: per-token gates, each a float or an array ``(T,)``;
            $\alpha, \eta \in [0, 1]$, $\theta \ge 0$. ``theta`` may also be ``(T, L)``,
            a step size per token and per memory layer (the per-layer data-dependent
            $\theta$ of the NeurIPS version's Appendix B.3), and ``alpha`` ``(T, C)``, a
            forgetting rate per token and per output channel of the memory's layers
            (channel-wise, the NeurIPS version; ``C`` = :func:`output_channels`, ``d_out``
            for a linear memory; column $j$ of layer $i$ keeps $1 - \alpha_{t,c}$ of itself,
            $c$ = the layers before $i$'s widths + $j$); on the numba backend either needs
            ``chunk_size=1``.
        chunk_size: tokens whose gradients share the chunk-start weights (Eqs. 16–18).
        read: "after" ($y_t = \mathcal{M}_t(q_t)$) or "before" ($\mathcal{M}_{t-1}(q_t)$).
        backend: "reference" (NumPy + autograd, this module) or "numba" (fused kernels).
        loss, p, delta: the inner loss (see :func:`associative_loss`).
        max_grad_norm: clip each token's surprise to this global norm (None: off).
        on_nonfinite: "raise" (default) or "warn" when the weights diverge (a NaN, an inf
            or a magnitude past :func:`~minititans._checks.weight_bound`, the same token on
            both backends) or an output is NaN or inf.
        partial_chunk: "warn" (default) or "ok": what to do when ``state`` comes from a call
            that ended inside a chunk (``state.open_chunk``, below).

    Returns:
        ``(out, state)``: ``out`` ``(T, d_out)`` and the final MemoryState.

    Dtypes: one rule on both backends. ``out`` and the returned weights and momentum have
    the dtype ``np.result_type`` of the state (weights, momentum, anchor) and of ``keys``,
    ``values`` and ``queries``: float32 only when all of them are float32, float64 as soon
    as one is. The gates (floats, arrays of either dtype, or lists of numbers) are cast to
    that dtype and never change it. ``memory_step`` follows the same rule.

    Streaming in pieces: a call ends with the weights after its last token, and the next
    call starts its first chunk at its first token. When ``chunk_size > 1`` and a call ends
    inside a chunk (``T % chunk_size != 0``), continuing from its state therefore cuts the
    chunks differently from one call on the whole sequence (the outputs differ by far more
    than rounding, e.g. 1e-2 for 253-token pieces with ``chunk_size=16``, d = 8, θ = 0.01).
    This function cannot know whether a caller will continue, so the returned state records
    it (``state.open_chunk = (T % chunk_size, chunk_size)``) and a later call that continues
    from it warns once (``UserWarning``, naming the chunk size and the remainder) unless
    ``partial_chunk="ok"`` says the new chunking is meant. To stream exactly, cut the pieces
    at multiples of ``chunk_size`` or replay the open chunk from its start state, as the
    models' ``stream`` does (:mod:`minititans.models.streaming`).
    """
    spec = check_state(state)
    check_choice("read", read, READS)
    check_choice("backend", backend, BACKENDS)
    check_choice("on_nonfinite", on_nonfinite, ("raise", "warn"))
    check_choice("partial_chunk", partial_chunk, ("warn", "ok"))
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
    dtype = result_dtype(state, K, V, Q)
    gates = [cast_gate(check_alpha(alpha, T, output_channels(spec)), dtype),
             cast_gate(check_gate("eta", eta, T, low=0.0, high=1.0), dtype),
             cast_gate(check_theta(theta, T, len(spec)), dtype)]
    # the dtype rule: everything is computed in the result dtype, on both backends
    state = state_in_dtype(state, dtype)
    keys, values, queries = (_to_dtype(x, dtype) for x in (keys, values, queries))
    if T == 0:
        return np.zeros((0, spec.d_out), dtype=dtype), state
    if state.open_chunk is not None and partial_chunk == "warn":
        r, b0 = state.open_chunk
        warnings.warn(
            f"memory_scan continues from a state that ended {r} tokens into a chunk of "
            f"chunk_size={b0}: this call starts a new chunk at its first token, so the result "
            "differs from one call on the whole sequence (Eqs. 16–18); cut the pieces at "
            "multiples of chunk_size, or pass partial_chunk='ok' if this chunking is meant",
            UserWarning, stacklevel=2)
    if backend == "numba":
        out, new = numba_memory_scan(state, keys, values, queries, *gates, chunk_size=b,
                                     read=read, loss=loss, p=p, delta=delta,
                                     max_grad_norm=max_grad_norm, on_nonfinite=on_nonfinite)
    else:
        options = dict(loss=loss, p=p, delta=delta, max_grad_norm=max_grad_norm,
                       on_nonfinite=on_nonfinite, read=read)
        # overflow is caught by the explicit finiteness check after every update, which
        # names the token; NumPy's own overflow warnings would only say less, earlier
        with np.errstate(over="ignore", invalid="ignore"):
            if b == 1:
                out, new = _token_loop(state, keys, values, queries, *gates, **options)
            else:
                out, new = _chunked(state, keys, values, queries, *gates, b, **options)
    _check_outputs(out, new, on_nonfinite)
    # the state remembers a chunk left open, so that continuing from it can say so
    open_chunk = (T % b, b) if T % b else None
    return out, replace(new, open_chunk=open_chunk)


def _check_outputs(out, new, on_nonfinite):
    """The outputs obey the divergence rule too: finite weights can still read inf.

    (A huge query overflows the read of weights that are within their bound.) Diverged
    weights have already raised, or warned once; this names the first token whose output
    row is not finite when the weights never went bad.
    """
    bound = weight_bound(getval(new.params[0]).dtype, len(new.params))
    if all_finite(*new.momentum) and not weights_diverged(new.params, bound):
        check_recurrence(out, on_nonfinite, what="the memory's outputs", hint=MEMORY_HINT,
                         stacklevel=4)


def _to_dtype(x, dtype):
    """``x`` (an array or an autograd box) in ``dtype``; differentiable."""
    return x if getval(x).dtype == dtype else x.astype(dtype)


def _token_loop(state, K, V, Q, alpha, eta, theta, *, loss, p, delta, max_grad_norm,
                on_nonfinite, read):
    """Eqs. 13–14 one token at a time: the definition the chunked form must match."""
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
            finite = check_weights(M, t, on_nonfinite)
        if read == "after":
            outs.append(memory_forward(M, Q[t]))  # y_t = M_t(q_t)
    return anp.stack(outs), MemoryState(M, S, A)


def _chunked(state, K, V, Q, alpha, eta, theta, b, *, loss, p, delta, max_grad_norm,
             on_nonfinite, read):
    """Eqs. 16–18: gradients at the chunk-start weights, recurrences by parallel scan."""
    spec = spec_of(state.params)
    M, S, A = state.params, state.momentum, state.anchor
    outs = []
    finite = True
    for start in range(0, K.shape[0], b):
        c = slice(start, start + b)
        # u_i = ∇ℓ(M_{t'}; x_i) for every token of the chunk, all at the same weights
        u = per_token_surprise(M, K[c], V[c], loss, p=p, delta=delta)  # each (n, *W.shape)
        u = _clip_per_token(u, max_grad_norm)
        th = theta[c]  # (n,), or (n, L): a column per layer
        th = [th[:, i] for i in range(len(S))] if anp.ndim(th) == 2 else [th] * len(S)
        # Eq. 18: S_i = η_i S_{i-1} - θ_i u_i, a linear recurrence in S
        S_all = [linear_recurrence(eta[c], -anp.reshape(th_i, (-1, 1, 1)) * g, s)
                 for g, s, th_i in zip(u, S, th)]
        # Eq. 13: M_i = (1 - α_i) M_{i-1} + S_i, the same recurrence with a = 1 - α
        # (with an anchor M̄, for M_i - M̄: M_i = M̄ + (1 - α_i)(M_{i-1} - M̄) + S_i)
        keep = channel_rates(1.0 - alpha[c], M, tokens=True)  # (n,) or (n, 1, d_out_i)
        if A is None:
            M_all = [linear_recurrence(k, s_all, w) for k, s_all, w in zip(keep, S_all, M)]
        else:
            M_all = [a + linear_recurrence(k, s_all, w - a)
                     for k, s_all, w, a in zip(keep, S_all, M, A)]
        if finite:
            finite = _check_chunk(M_all, start, on_nonfinite)
        if read == "after":
            outs.append(forward_per_token(spec.like(M_all), Q[c]))
        else:
            M_before = [anp.concatenate([w[None], w_all[:-1]]) for w, w_all in zip(M, M_all)]
            outs.append(forward_per_token(spec.like(M_before), Q[c]))
        M = spec.like(w_all[-1] for w_all in M_all)
        S = spec.like(s_all[-1] for s_all in S_all)
    return anp.concatenate(outs), MemoryState(M, S, A)


def _clip_per_token(u, max_norm):
    if max_norm is None:
        return u
    sq = sum(anp.sum(g**2, axis=(1, 2)) for g in u)  # (n,)
    scale = anp.minimum(1.0, max_norm / anp.maximum(anp.sqrt(sq), 1e-30))
    return spec_of(u).like(anp.reshape(scale, (-1, 1, 1)) * g for g in u)


def _check_chunk(M_all, start, on_nonfinite):
    """The weights of every token of a chunk (``M_all``: per layer ``(n, *W.shape)``) under
    the rule of :func:`check_weights`: raise or warn naming the first bad token."""
    bound = weight_bound(getval(M_all[0]).dtype, len(M_all))
    bad = [first_diverged_token(w, bound) for w in M_all]
    bad = [t for t in bad if t >= 0]
    if not bad:
        return True
    report_divergence(start + min(bad), on_nonfinite, reason=diverged_reason(bound))
    return False


def numba_memory_scan(state, keys, values, queries, alpha, eta, theta, *, chunk_size=1,
                      read="after", loss="l2", p=3.0, delta=1.0, max_grad_norm=None,
                      on_nonfinite="raise", checkpoint_every=None):
    r"""``memory_scan(..., backend="numba")``: Eqs. 13–18 by the kernels of
    :mod:`minititans.kernels`, on a MemoryState (with or without an anchor).

    Arguments are those of :func:`memory_scan`, checked there (the state, the chunk size,
    ``read`` and the inner loss are checked here too, for direct calls); the gates are
    arrays ``(T,)``. Any argument may be an autograd box: the scan is then the kernels'
    differentiable primitive, whose ``checkpoint_every`` (tokens between stored states, a
    multiple of ``chunk_size``; None: about $\sqrt{T}$) trades memory for recomputation.

    Returns:
        ``(out (T, d_out), MemoryState)`` in the common dtype, like the reference.
    """
    spec = check_state(state)
    check_choice("read", read, READS)
    check_choice("on_nonfinite", on_nonfinite, ("raise", "warn"))
    check_loss(loss, p, delta)
    dtype = result_dtype(state, *(np.asarray(getval(x)) for x in (keys, values, queries)))
    if np.shape(getval(keys))[0] == 0:
        return np.zeros((0, spec.d_out), dtype=dtype), state
    from ..kernels.scan import numba_scan  # imports numba: only when the backend is used

    # the kernels take the dtype of the weights and rows: the keys carry the momentum's
    keys = _to_dtype(np.asarray(keys) if not isbox(keys) else keys, dtype)
    out, M, S = numba_scan(
        list(state.params), list(state.momentum), keys, values, queries, alpha, eta, theta,
        activation=spec.activation, residual_norm=spec.residual_norm, chunk_size=chunk_size,
        read=read, loss=loss, p=p, delta=delta, max_grad_norm=max_grad_norm,
        on_nonfinite=on_nonfinite, checkpoint_every=checkpoint_every,
        anchor=None if state.anchor is None else list(state.anchor))
    return out, MemoryState(spec.like(M), spec.like(S), state.anchor)


def numba_memory_scan_batched(state, keys, values, queries, alpha, eta, theta, *,
                              chunk_size=1, read="after", loss="l2", p=3.0, delta=1.0,
                              max_grad_norm=None, on_nonfinite="raise"):
    r"""B independent memory scans at once, in parallel over the batch (``numba.prange``).

    Sequence $s$ is exactly ``memory_scan(..., backend="numba")`` on ``keys[s]``, ... from
    its own initial state; the time loop inside each stays serial. When an argument is an
    autograd box the batch is differentiable (first order): the sequences then run one
    after the other in one autograd node, and differentiated gates must be ``(B, T)``. The
    number of threads is numba's (``numba.set_num_threads``); keep BLAS single-threaded
    (``OPENBLAS_NUM_THREADS=1``) when ``chunk_size > 1`` so the threads do not oversubscribe
    the cores.

    Args:
        state: MemoryState whose weights and momentum (and anchor, if any) have a leading
            batch axis, ``W_i`` ``(B, fan_in, fan_out)``.
        keys ``(B, T, d_in)``, values ``(B, T, d_out)``, queries ``(B, T, d_in)``.
        alpha, eta, theta: ``(B, T)`` arrays (or floats); ``theta`` may be ``(B, T, L)``,
            a step per memory layer, and ``alpha`` ``(B, T, C)``, a rate per output channel
            (:func:`output_channels`; either with ``chunk_size=1``).
        chunk_size, read, loss, p, delta, max_grad_norm, on_nonfinite: as ``memory_scan``.

    Returns:
        ``(out (B, T, d_out), MemoryState)`` with final weights and momentum ``(B, ...)``.
        A divergence raises :class:`MemoryDivergenceError` for the earliest token over all
        sequences (its message names the sequence).
    """
    if not isinstance(state, MemoryState):
        raise TypeError(f"state must be a MemoryState, got {type(state).__name__}")
    leaves = (*state.params, *state.momentum, *(state.anchor or ()), keys, values, queries,
              alpha, eta, theta)
    boxed = any(isbox(x) for x in leaves)
    spec = spec_of(state.params)
    weights = [np.asarray(getval(w)) for w in spec]
    momentum = [np.asarray(getval(w)) for w in state.momentum]
    anchor = None if state.anchor is None else [np.asarray(getval(w)) for w in state.anchor]
    K, V, Q = (np.asarray(getval(x)) for x in (keys, values, queries))
    if K.ndim != 3 or V.ndim != 3 or Q.ndim != 3:
        raise ValueError("keys, values and queries must have shape (B, T, d), got "
                         f"{K.shape}, {V.shape} and {Q.shape}")
    B, T = K.shape[:2]
    if any(w.ndim != 3 or w.shape[0] != B for w in weights + momentum + (anchor or [])):
        raise ValueError(f"state weights, momentum and anchor must have a leading batch axis "
                         f"of {B}, got {[w.shape for w in weights]}")
    d_in, d_out = weights[0].shape[1], weights[-1].shape[2]
    if (V.shape[:2] != (B, T) or Q.shape[:2] != (B, T) or K.shape[2] != d_in
            or Q.shape[2] != d_in or V.shape[2] != d_out):
        raise ValueError(f"need keys/queries (B, T, {d_in}) and values (B, T, {d_out}), got "
                         f"{K.shape}, {Q.shape} and {V.shape}")
    chunk_size = check_int("chunk_size", chunk_size, minimum=1)
    check_choice("read", read, READS)
    check_choice("on_nonfinite", on_nonfinite, ("raise", "warn"))
    check_loss(loss, p, delta)
    check_max_grad_norm(max_grad_norm)
    dtype = np.result_type(K, V, Q, *weights, *momentum)  # the rule of memory_scan
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"inputs must be float32 or float64, got {dtype}")
    for name, x in (("keys", K), ("values", V), ("queries", Q)):
        if not np.all(np.isfinite(x)):
            raise ValueError(f"{name} contains NaN or inf")
    gates = []
    # theta may have a column per memory layer (Appendix B.3), alpha one per output channel
    columns = {"alpha": output_channels(weights), "theta": len(weights)}
    for name, g, high in (("alpha", alpha, 1.0), ("eta", eta, 1.0), ("theta", theta, None)):
        n = columns.get(name)
        shape = (B, T, n) if n and np.ndim(getval(g)) == 3 else (B, T)
        if isbox(g) and np.shape(getval(g)) != shape:
            raise ValueError(f"{name} must have shape {shape} when differentiated, got "
                             f"shape {np.shape(getval(g))}")
        try:
            g = np.broadcast_to(np.asarray(getval(g), dtype=dtype), shape)
        except ValueError:
            more = f" or ({B}, {T}, {n})" if n else ""
            raise ValueError(f"{name} must be a float or have shape ({B}, {T}){more}, got "
                             f"shape {np.shape(getval(g))}") from None
        if not np.all(np.isfinite(g)):
            raise ValueError(f"{name} contains NaN or inf")
        if g.size and (g.min() < 0 or (high is not None and g.max() > high)):
            bounds = "[0, 1]" if high is not None else ">= 0"
            raise ValueError(f"{name} must be in {bounds}")
        gates.append(g)
    from ..kernels.scan import numba_scan_batched

    if boxed:  # the differentiable batch: the arguments as given, in the common dtype
        weights, momentum = list(state.params), list(state.momentum)
        anchor = None if state.anchor is None else list(state.anchor)
        K, V, Q = (_to_dtype(x, dtype) for x in (keys, values, queries))
        gates = [_to_dtype(g, dtype) if isbox(g) else plain
                 for g, plain in zip((alpha, eta, theta), gates)]
    out, M, S = numba_scan_batched(
        weights, momentum, K if boxed else K.astype(dtype, copy=False), V, Q, *gates,
        activation=spec.activation, residual_norm=spec.residual_norm, chunk_size=chunk_size,
        read=read, loss=loss, p=p, delta=delta, max_grad_norm=max_grad_norm,
        on_nonfinite=on_nonfinite, anchor=anchor)
    new = MemoryState(spec.like(M), spec.like(S), state.anchor)
    _check_outputs(out, new, on_nonfinite)
    return out, new
