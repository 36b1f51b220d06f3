r"""The entry points of the numba memory scan (Eqs. 13–18), which ``memory_scan`` calls.

:func:`numba_scan` runs the token loop (:mod:`.token`, ``chunk_size=1``) or the chunked
scan (:mod:`.chunk`, Eqs. 16–18) on one sequence, and sends the call to the differentiable
primitive of :mod:`.vjp` when an argument is an autograd box; :func:`numba_scan_batched`
runs independent sequences in parallel. They take and return the weights as lists of
arrays: :mod:`minititans.memory.scan` checks the arguments and wraps the results in a
``MemoryState``. A weight that stops being finite raises (or warns)
:class:`~minititans.MemoryDivergenceError` naming the first such token, like the reference.
"""

from __future__ import annotations

import autograd.numpy as anp
import numba
import numpy as np
from autograd.tracer import getval, isbox

from .._checks import diverged_reason, report_divergence
from ._jit import parallel_kernel
from .chunk import chunk_scan
from .layout import (
    Seq,
    aligned_zeros,
    as_kernel_array,
    make_spec,
    new_tape,
    pack_weights,
    tape_of,
    unpack_weights,
)
from .scalars import ACTIVATION_CODES, LOSS_CODES
from .token import token_loop
from .vjp import numba_scan_differentiable, numba_scan_differentiable_batched


def _spec(shapes, offsets, dtype, activation, residual_norm, read, loss, p, delta,
          max_grad_norm):
    clip = -1.0 if max_grad_norm is None else float(max_grad_norm)
    return make_spec(shapes, offsets, dtype, ACTIVATION_CODES[activation], residual_norm,
                     LOSS_CODES[loss], p, delta, clip, read == "after")


def gate_columns(name: str, gate, T: int, batch: tuple = (), chunk_size: int = 1):
    r"""A gate as the kernels take it, shape ``batch + (T, 1 or n)``: one column (a value per
    token) or several — ``theta`` a step per memory layer (Appendix B.3), ``alpha`` a rate per
    output channel (channel-wise, the NeurIPS version). A float, ``batch + (T,)`` or
    ``batch + (T, n)`` on entry (an autograd box stays one). The chunked kernels take one
    value per token only."""
    nd = np.ndim(getval(gate))
    if nd == 0:
        return gate * anp.ones(batch + (T, 1))
    if nd == len(batch) + 1:
        return anp.expand_dims(gate, -1)
    if np.shape(getval(gate))[-1] > 1 and chunk_size > 1:
        what = "per memory layer" if name == "theta" else "per output channel"
        raise ValueError(f"{name} {what} (shape (T, {np.shape(getval(gate))[-1]})) needs "
                         f"chunk_size=1 on the numba backend, got chunk_size={chunk_size}; "
                         "use backend='reference' to chunk it")
    return gate


def numba_scan(weights, momentum, keys, values, queries, alpha, eta, theta, *, activation,
               residual_norm, chunk_size=1, read="after", loss="l2", p=3.0, delta=1.0,
               max_grad_norm=None, on_nonfinite="raise", checkpoint_every=None, anchor=None):
    r"""``memory_scan(..., backend="numba")`` on lists of arrays (Eqs. 13–18).

    Arguments are those of :func:`minititans.memory_scan`, already checked there, with the
    state as ``weights``, ``momentum`` and ``anchor`` ``[W_1, ..., W_L]`` (``anchor`` None:
    Eq. 13 as printed; else forgetting towards it) and the memory's ``activation`` and
    ``residual_norm``; the gates are arrays ``(T,)`` (``alpha`` may be ``(T, C)``, a rate per
    output channel, and ``theta`` ``(T, L)``, a step per layer: :func:`gate_columns`),
    ``T >= 1``. Inputs
    may be float32 or float64, non-contiguous or read-only; they are copied to contiguous
    arrays of the common dtype. If any is an autograd box the call goes to
    :func:`.vjp.numba_scan_differentiable` (``checkpoint_every`` is its option).

    Returns:
        ``(out (T, d_out), new weights, new momentum)`` in the common dtype.
    """
    leaves = (*weights, *momentum, *(anchor or ()), keys, values, queries, alpha, eta, theta)
    boxed = any(isbox(x) for x in leaves)
    T = np.shape(getval(keys))[0]
    alpha, theta = (gate_columns(name, g, T, chunk_size=int(chunk_size))
                    for name, g in (("alpha", alpha), ("theta", theta)))
    plain = [np.asarray(getval(x)) for x in (*weights, keys, values, queries)]
    dtype = np.result_type(*plain)
    shapes, offsets = pack_weights(plain[:len(weights)], dtype)[1:]
    spec = _spec(shapes, offsets, dtype, activation, residual_norm, read, loss, p, delta,
                 max_grad_norm)
    if boxed:
        return numba_scan_differentiable(weights, momentum, spec, keys, values, queries, alpha,
                                         eta, theta, chunk_size=chunk_size,
                                         on_nonfinite=on_nonfinite,
                                         checkpoint_every=checkpoint_every, anchor=anchor)
    M, _, _ = pack_weights(weights, dtype)
    S, _, _ = pack_weights(momentum, dtype)
    seq = Seq(*(as_kernel_array(x, dtype) for x in (keys, values, queries, alpha, eta, theta)),
              _pack_anchor(anchor, dtype))
    T, b = seq.K.shape[0], int(chunk_size)
    out = np.empty((T, shapes[-1, 1]), dtype=dtype)
    tape = new_tape(shapes, T, b, dtype)
    stop = on_nonfinite == "raise"
    if b == 1:
        first_bad = token_loop(M, S, spec, seq, tape, 1, stop, out)
    else:
        M1, S1 = aligned_zeros(M.shape, dtype), aligned_zeros(M.shape, dtype)
        first_bad = chunk_scan(M, S, M1, S1, spec, seq, tape, b, 1, stop, out)
    if first_bad >= 0:
        report_divergence(first_bad, on_nonfinite, stacklevel=3,
                          reason=diverged_reason(spec.bound))
    return out, unpack_weights(M, shapes, offsets), unpack_weights(S, shapes, offsets)


def _pack_anchor(anchor, dtype, lead=()):
    """The anchor in the weights' flat layout (``lead``: the batch axis), or, for None, an
    empty one (``lead + (0,)``) of the same type: the kernels then do no anchor work."""
    if anchor is None:
        return np.zeros(lead + (0,), dtype)
    return pack_weights(anchor, dtype, batched=bool(lead))[0]


@parallel_kernel
def batch_loop(M, S, M1, S1, spec, seq, tape, b, out, first_bad):
    """:func:`.token.token_loop` (``b == 1``) or :func:`.chunk.chunk_scan` on every sequence,
    ``prange`` over them.

    ``M``, ``S``, ``M1``, ``S1`` ``(B, P_pad)``; ``seq`` of ``(B, T, d)`` rows and ``(B, T)``
    gates; ``tape`` with a batch axis; ``out`` ``(B, T, d_out)``; ``first_bad`` ``(B,)``
    int64, written. The time loop of each sequence stays serial; sequences are independent.
    """
    for s in numba.prange(M.shape[0]):
        one = Seq(seq.K[s], seq.V[s], seq.Q[s], seq.alpha[s], seq.eta[s], seq.theta[s],
                  seq.anchor[s])
        if b == 1:
            first_bad[s] = token_loop(M[s], S[s], spec, one, tape_of(tape, s), 1, False, out[s])
        else:
            first_bad[s] = chunk_scan(M[s], S[s], M1[s], S1[s], spec, one, tape_of(tape, s), b,
                                      1, False, out[s])


def numba_scan_batched(weights, momentum, keys, values, queries, alpha, eta, theta, *,
                       activation, residual_norm, chunk_size=1, read="after", loss="l2",
                       p=3.0, delta=1.0, max_grad_norm=None, on_nonfinite="raise",
                       anchor=None):
    r"""B independent scans at once, in parallel over the batch (``numba.prange``).

    As :func:`numba_scan` (arguments already checked) with a leading batch axis on
    everything: ``W_i`` (and the anchor's) ``(B, fan_in, fan_out)``, rows ``(B, T, d)``,
    gates ``(B, T)`` arrays. A divergence raises for the earliest token over all sequences
    (its message names the sequence). If any argument is an autograd box the call goes to
    :func:`.vjp.numba_scan_differentiable_batched` (one sequence after the other, in one
    autograd node).

    Returns:
        ``(out (B, T, d_out), new weights, new momentum)``, each ``W_i`` ``(B, ...)``.
    """
    leaves = (*weights, *momentum, *(anchor or ()), keys, values, queries, alpha, eta, theta)
    B, T = np.shape(getval(keys))[:2]
    alpha, theta = (gate_columns(name, g, T, (B,), chunk_size=int(chunk_size))
                    for name, g in (("alpha", alpha), ("theta", theta)))
    if any(isbox(x) for x in leaves):
        plain = [np.asarray(getval(x)) for x in (*weights, keys, values, queries)]
        dtype = np.result_type(*plain)
        shapes, offsets = pack_weights([w[0] for w in plain[:len(weights)]], dtype)[1:]
        spec = _spec(shapes, offsets, dtype, activation, residual_norm, read, loss, p, delta,
                     max_grad_norm)
        return numba_scan_differentiable_batched(
            weights, momentum, spec, keys, values, queries, alpha, eta, theta,
            chunk_size=chunk_size, on_nonfinite=on_nonfinite, anchor=anchor)
    K = np.asarray(keys)
    dtype = np.result_type(K, values, queries, *weights)
    M, shapes, offsets = pack_weights(weights, dtype, batched=True)
    S, _, _ = pack_weights(momentum, dtype, batched=True)
    seq = Seq(*(as_kernel_array(x, dtype) for x in (keys, values, queries, alpha, eta, theta)),
              _pack_anchor(anchor, dtype, (B,)))
    out = np.empty((B, T, shapes[-1, 1]), dtype=dtype)
    if T and B:
        spec = _spec(shapes, offsets, dtype, activation, residual_norm, read, loss, p, delta,
                     max_grad_norm)
        b = int(chunk_size)
        tape = new_tape(shapes, T, b, dtype, batch=B)
        M1, S1 = aligned_zeros(M.shape, dtype), aligned_zeros(M.shape, dtype)
        first_bad = np.full(B, -1, dtype=np.int64)
        batch_loop(M, S, M1, S1, spec, seq, tape, b, out, first_bad)
        if (first_bad >= 0).any():
            s = int(np.argmin(np.where(first_bad >= 0, first_bad, T)))
            report_divergence(first_bad[s], on_nonfinite, f" of sequence {s}", stacklevel=3,
                              reason=diverged_reason(spec.bound))
    return out, unpack_weights(M, shapes, offsets), unpack_weights(S, shapes, offsets)
