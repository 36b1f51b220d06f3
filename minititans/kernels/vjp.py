r"""Gradients for the outer loop: the numba memory scan as an autograd primitive (Eqs. 13–18).

The forward is the scan of :mod:`.token` or :mod:`.chunk` with a full tape (per token, or
per chunk of ``b`` tokens whose surprises share the chunk-start weights $\mathcal{M}_{t'}$,
Eqs. 16–18):

$$u_t = \nabla_W \ell(\mathcal{M}_{t'}; k_t, v_t),\quad S_t = \eta_t S_{t-1} - \theta_t u_t,\quad
  \mathcal{M}_t = (1-\alpha_t)\mathcal{M}_{t-1} + S_t,\quad y_t = \mathcal{M}_t(q_t)\ \text{or}\
  \mathcal{M}_{t-1}(q_t),$$

or, with an anchor $\bar{\mathcal{M}}$, $\mathcal{M}_t = \bar{\mathcal{M}} + (1-\alpha_t)
(\mathcal{M}_{t-1} - \bar{\mathcal{M}}) + S_t$.

Its vector-Jacobian product runs the recurrences backwards. With $\bar{\mathcal{M}}_t$,
$\bar S_t$ the cotangents of the state after token $t$ (the read of $y_t$ included):

$$\bar S_t = \eta_{t+1}\bar S_{t+1} + \bar{\mathcal{M}}_t,\quad
  \bar\alpha_t = -\langle\bar{\mathcal{M}}_t, \mathcal{M}_{t-1}\rangle,\quad
  \bar\eta_t = \langle\bar S_t, S_{t-1}\rangle,\quad
  \bar\theta_t = -\langle\bar S_t, u_t\rangle,\quad
  \bar{\mathcal{M}}_{t-1} \mathrel{+}= (1-\alpha_t)\bar{\mathcal{M}}_t ,$$

and $\bar u_t = -\theta_t\bar S_t$ goes through the surprise by a Hessian-vector product
(:mod:`.hvp`) into $\bar{\mathcal{M}}_{t'}$, $\bar k_t$, $\bar v_t$. Clipping the
surprise, $u \leftarrow u\min(1, c/\lVert u\rVert)$, adds its own Jacobian. With an anchor,
$\bar\alpha_t = -\langle\bar{\mathcal{M}}_t, \mathcal{M}_{t-1} - \bar{\mathcal{M}}\rangle$ and
the anchor's own cotangent is $\sum_t \alpha_t\bar{\mathcal{M}}_t$ (in a model the anchor is
$\mathcal{M}_0$ too, and autograd adds the two cotangents). The kernels:
:func:`.token.token_vjp` (``chunk_size=1``) and :func:`.chunk.chunk_backward`
(``chunk_size > 1``, every product a GEMM over the chunk).

**What autograd sees.** One primitive of flat arrays,
``_scan_primitive(keys, values, queries, alpha, eta, theta, W_1..W_L, S_1..S_L[, A_1..A_L])``
(the anchor only when there is one), returning
the tuple ``(out, W_1..W_L, S_1..S_L)``. Autograd boxes a tuple result as a sequence, so the
final state is differentiable too: a later call can send gradients back through it
(streaming). :func:`numba_scan_differentiable` takes and returns the weights as lists.
One backward pass gives the cotangents of all arguments. What the forward keeps for the
backward travels in a ``_Tape`` passed by keyword (autograd hands the keyword arguments of
a primitive to its VJP). The VJP is first order only.

**Memory: checkpoints and recomputation.** Storing every state $(\mathcal{M}_t, S_t)$ would
take $2TP$ numbers ($P$ weights: 1 GB for $T = 4096$, $P = 32768$ in float32). The forward
keeps instead, per token, only vectors — the key's activations and deltas, the query's
activations, the clip scale: $O(T L h)$ numbers — and the state every ``C`` tokens
(``checkpoint_every``, a multiple of ``b``, by default about $\sqrt{T}$): $2PT/C$ numbers.
The backward recomputes the states of one segment of ``C`` tokens at a time from its
checkpoint, into a buffer of $2P(C/b + 1)$ numbers, with no matrix product for ``b = 1``
($u_t = h^\top\delta$ is taped: only Eqs. 13–14 run again) and one GEMM per chunk
otherwise. Memory $\approx 2P(T/C + C/b)$, smallest near $C = \sqrt{bT}$; the default
$C \approx \sqrt{T}$ is that for ``b = 1`` and replays nothing for ``b \ge \sqrt{T}``. The
price is one more update pass per token (``b = 1``).

The large work arrays are recycled between calls (:class:`_BufferPool`): on the benchmark
machine the page faults of fresh memory cost a third of the forward.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import autograd.numpy as anp
import numpy as np
from autograd.core import defvjp_argnums
from autograd.extend import primitive
from autograd.tracer import getval, isbox

from .._checks import diverged_reason, report_divergence
from .chunk import chunk_backward, chunk_scan
from .layout import Seq, Spec, aligned_zeros, new_tape, pack_weights, padded, unpack_weights
from .token import token_loop, token_vjp


@dataclass(frozen=True, eq=False)
class _Config:
    """Everything about one call that is not an array."""

    spec: Spec  # the memory, its inner loss, the read
    dtype: np.dtype
    chunk_size: int
    checkpoint_every: int
    on_nonfinite: str
    anchored: bool  # memory holds an anchor M̄ after the momentum (Eq. 13 around M̄)


class _BufferPool:
    """Recycles the large work arrays (tapes, checkpoints, replay buffers) between calls.

    Fresh memory costs a page fault per page at its first write, which on the benchmark
    machine was a third of the forward's time. Arrays come back here when the tape that
    holds them is garbage-collected (or when the backward is done with its buffers) and are
    handed out again, uninitialised, for the same shape and dtype. At most ``max_bytes``
    are kept.
    """

    def __init__(self, max_bytes=512 << 20):
        self.max_bytes = max_bytes
        self._free = {}
        self._bytes = 0
        self._lock = threading.Lock()

    def take(self, shape, dtype):
        """A 64-byte aligned C array of ``shape`` and ``dtype`` (contents arbitrary)."""
        key = (tuple(shape), np.dtype(dtype).str)
        with self._lock:
            free = self._free.get(key)
            if free:
                arr = free.pop()
                self._bytes -= arr.nbytes
                return arr
        return aligned_zeros(shape, dtype)

    def give(self, arrays):
        with self._lock:
            for arr in arrays:
                if self._bytes + arr.nbytes <= self.max_bytes:
                    self._free.setdefault((arr.shape, arr.dtype.str), []).append(arr)
                    self._bytes += arr.nbytes


_POOL = _BufferPool()


class _Tape:
    """What one forward call keeps for its VJP: ``arrays``, filled by the forward; the
    ``pooled`` ones go back to the buffer pool when the tape is freed."""

    def __init__(self):
        self.arrays = {}
        self.pooled = []

    def __del__(self):
        _POOL.give(self.pooled)


def _forward_one(cf, tape, keys, values, queries, alpha, eta, theta, memory):
    """One sequence's scan with a full tape (kept in ``tape``): ``(out, M, S, first_bad)``,
    ``M`` and ``S`` the final state's flat arrays, ``first_bad`` the first diverged token
    (-1: none; with ``on_nonfinite="raise"`` the scan stopped there)."""
    dt, spec = cf.dtype, cf.spec
    L = len(spec.shapes)
    anchor = pack_weights(memory[2 * L:], dt)[0] if cf.anchored else np.zeros(0, dt)
    seq = Seq(*(np.ascontiguousarray(x, dtype=dt)
                for x in (keys, values, queries, alpha, eta, theta)), anchor)
    M, _, _ = pack_weights(memory[:L], dt)
    S, _, _ = pack_weights(memory[L:2 * L], dt)
    T, P = seq.K.shape[0], M.shape[0]
    b, seg = cf.chunk_size, cf.checkpoint_every

    def take(shape, dtype):  # from the pool, back to it when the tape is freed
        arr = _POOL.take(shape, dtype)
        tape.pooled.append(arr)
        return arr

    tp = new_tape(spec.shapes, T, b, dt, seg, take)
    out = np.empty((T, spec.shapes[-1, 1]), dt)
    stop = cf.on_nonfinite == "raise"
    if b == 1:
        first_bad = token_loop(M, S, spec, seq, tp, seg, stop, out)
    else:
        M1, S1 = (take((1, padded(P, dt)), dt)[0, :P] for _ in range(2))
        first_bad = chunk_scan(M, S, M1, S1, spec, seq, tp, b, seg, stop, out)
    tape.arrays = dict(tape=tp, seq=seq)
    return out, M, S, int(first_bad)


@primitive
def _scan_primitive(keys, values, queries, alpha, eta, theta, *memory, config, tape):
    """The scan on flat arrays: ``memory = (W_1..W_L, S_1..S_L)``, then the anchor
    ``(A_1..A_L)`` when ``config.anchored``; returns ``(out, W..., S...)``."""
    spec = config.spec
    out, M, S, first_bad = _forward_one(config, tape, keys, values, queries, alpha, eta,
                                        theta, memory)
    if first_bad >= 0:
        report_divergence(first_bad, config.on_nonfinite, stacklevel=4,
                          reason=diverged_reason(spec.bound))
    return (out, *unpack_weights(M, spec.shapes, spec.offsets),
            *unpack_weights(S, spec.shapes, spec.offsets))


def _first_order_only(g):
    """The kernels' VJPs take plain cotangents: a boxed one means a higher derivative."""
    if any(isbox(x) for x in g):
        raise NotImplementedError(
            "the VJP of memory_scan(backend='numba') is first order only; use "
            "backend='reference' for higher derivatives")


def _scan_vjp(argnums, ans, args, kwargs):
    cf, tape = kwargs["config"], kwargs["tape"]
    L = len(cf.spec.shapes)

    def vjp(g):
        _first_order_only(g)
        grads = _backward(cf, tape, g[0], g[1:1 + L], g[1 + L:])
        return tuple(np.asarray(grads[i], dtype=np.asarray(args[i]).dtype) for i in argnums)

    return vjp


defvjp_argnums(_scan_primitive, _scan_vjp)


@primitive
def _batch_primitive(keys, values, queries, alpha, eta, theta, *memory, config, tapes):
    """:func:`_scan_primitive` on a batch: every argument has a leading batch axis of
    ``len(tapes)``, sequence ``s`` is scanned on its own with tape ``tapes[s]``; returns
    ``(out (B, T, d_out), W_1..W_L, S_1..S_L)``, each ``(B, ...)``."""
    spec = config.spec
    outs, Ms, Ss, bad = [], [], [], []
    for s, tape in enumerate(tapes):
        out, M, S, first_bad = _forward_one(
            config, tape, keys[s], values[s], queries[s], alpha[s], eta[s], theta[s],
            [m[s] for m in memory])
        outs.append(out)
        Ms.append(unpack_weights(M, spec.shapes, spec.offsets))
        Ss.append(unpack_weights(S, spec.shapes, spec.offsets))
        bad.append(first_bad)
    bad = np.array(bad)
    if (bad >= 0).any():  # the earliest token over all sequences, as numba_scan_batched
        s = int(np.argmin(np.where(bad >= 0, bad, np.iinfo(np.int64).max)))
        report_divergence(int(bad[s]), config.on_nonfinite, f" of sequence {s}",
                          stacklevel=4, reason=diverged_reason(spec.bound))
    L = len(spec.shapes)
    return (np.stack(outs), *(np.stack([W[i] for W in Ms]) for i in range(L)),
            *(np.stack([S[i] for S in Ss]) for i in range(L)))


def _batch_vjp(argnums, ans, args, kwargs):
    cf, tapes = kwargs["config"], kwargs["tapes"]
    L = len(cf.spec.shapes)

    def vjp(g):
        _first_order_only(g)
        per_seq = [_backward(cf, tape, g[0][s], [x[s] for x in g[1:1 + L]],
                             [x[s] for x in g[1 + L:]]) for s, tape in enumerate(tapes)]
        return tuple(np.stack([grads[i] for grads in per_seq]).astype(
            np.asarray(args[i]).dtype, copy=False) for i in argnums)

    return vjp


defvjp_argnums(_batch_primitive, _batch_vjp)


def _backward(cf, tape, g_out, g_M, g_S):
    """Cotangents of all the primitive's arguments, in their order."""
    tp, seq, dt, spec = tape.arrays["tape"], tape.arrays["seq"], cf.dtype, cf.spec
    Mbar, _, _ = pack_weights(g_M, dt)  # in: of the final state; out: of the initial one
    Sbar, _, _ = pack_weights(g_S, dt)
    grads = Seq(*(np.empty_like(x) for x in seq[:-1]), np.zeros_like(seq.anchor))
    b, seg = cf.chunk_size, cf.checkpoint_every
    buffers = [_POOL.take((seg // b + 1, padded(Mbar.shape[0], dt)), dt) for _ in range(2)]
    gout = np.ascontiguousarray(g_out, dtype=dt)
    if b == 1:
        token_vjp(spec, seq, tp, seg, gout, Mbar, Sbar, grads, *buffers)
    else:
        chunk_backward(spec, seq, tp, b, seg, gout, Mbar, Sbar, grads, *buffers)
    _POOL.give(buffers)
    anchor = unpack_weights(grads.anchor, spec.shapes, spec.offsets) if cf.anchored else []
    return [*grads[:-1], *unpack_weights(Mbar, spec.shapes, spec.offsets),
            *unpack_weights(Sbar, spec.shapes, spec.offsets), *anchor]


def default_checkpoint_every(T: int, chunk_size: int) -> int:
    r"""Tokens between two stored states: the multiple of ``chunk_size`` nearest $\sqrt{T}$."""
    return chunk_size * max(1, round(math.sqrt(T) / chunk_size))


def _make_config(spec, T, chunk_size, checkpoint_every, on_nonfinite, anchor) -> _Config:
    """The non-array part of a differentiable call, ``checkpoint_every`` checked."""
    b = int(chunk_size)
    seg = default_checkpoint_every(T, b) if checkpoint_every is None else int(checkpoint_every)
    if seg < 1 or seg % b:
        raise ValueError(f"checkpoint_every must be a positive multiple of chunk_size={b}, "
                         f"got {seg}")
    return _Config(spec=spec, dtype=np.dtype(type(spec.p)), chunk_size=b,
                   checkpoint_every=seg, on_nonfinite=on_nonfinite,
                   anchored=anchor is not None)


def numba_scan_differentiable(weights, momentum, spec, keys, values, queries, alpha, eta,
                              theta, *, chunk_size=1, on_nonfinite="raise",
                              checkpoint_every=None, anchor=None):
    r"""The numba scan that autograd can differentiate (Eqs. 13–18), on lists of arrays.

    ``weights`` and ``momentum`` ``[W_1, ..., W_L]``, the sequence ``(T, d)``, the gates
    ``(T,)`` (``T >= 1``) and the ``anchor`` (None, or weights like ``weights`` that Eq. 13
    forgets towards) may be autograd boxes; ``spec`` is a :class:`.layout.Spec` of the
    common dtype. The returned ``out`` and final state are differentiable with respect to all
    of them (first order).

    Args:
        checkpoint_every: tokens between stored states, a multiple of ``chunk_size``; None
            picks the multiple nearest $\sqrt{T}$ (module doc: memory against recomputation).

    Returns:
        ``(out (T, d_out), new weights (list), new momentum (list))``.
    """
    L = len(weights)
    T = np.shape(getval(keys))[0]
    gates = [g if np.ndim(getval(g)) >= 1 else g * anp.ones(T) for g in (alpha, eta, theta)]
    config = _make_config(spec, T, chunk_size, checkpoint_every, on_nonfinite, anchor)
    res = _scan_primitive(keys, values, queries, *gates, *weights, *momentum, *(anchor or ()),
                          config=config, tape=_Tape())
    return res[0], [res[1 + i] for i in range(L)], [res[1 + L + i] for i in range(L)]


def numba_scan_differentiable_batched(weights, momentum, spec, keys, values, queries, alpha,
                                      eta, theta, *, chunk_size=1, on_nonfinite="raise",
                                      checkpoint_every=None, anchor=None):
    r""":func:`numba_scan_differentiable` on B independent sequences, one autograd node.

    Every argument has a leading batch axis: ``W_i`` (and the momentum's and anchor's)
    ``(B, fan_in, fan_out)``, rows ``(B, T, d)``, gates ``(B, T)``. Sequence ``s`` is
    computed exactly as ``numba_scan_differentiable`` on its slice (the same kernels, one
    sequence after the other); its gradients too. A model's batch costs one primitive
    instead of one per sequence plus the slicing (whose gradients scatter into the whole
    batch): that overhead, not the kernels, was most of a small model's training step.
    A divergence raises for the earliest token over all sequences.

    Returns:
        ``(out (B, T, d_out), new weights (list of (B, ...)), new momentum (list))``.
    """
    L = len(weights)
    B, T = np.shape(getval(keys))[:2]
    config = _make_config(spec, T, chunk_size, checkpoint_every, on_nonfinite, anchor)
    res = _batch_primitive(keys, values, queries, alpha, eta, theta, *weights, *momentum,
                           *(anchor or ()), config=config, tapes=[_Tape() for _ in range(B)])
    return res[0], [res[1 + i] for i in range(L)], [res[1 + L + i] for i in range(L)]
