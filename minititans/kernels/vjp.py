r"""Gradients for the outer loop: the numba memory scan as an autograd primitive (Eqs. 13-18).

The forward is the scan of :mod:`.scan` (per token, or per chunk of ``b`` tokens whose
surprises share the chunk-start weights $\mathcal{M}_{t'}$, Eqs. 16-18):

$$u_t = \nabla_W \ell(\mathcal{M}_{t'}; k_t, v_t),\quad S_t = \eta_t S_{t-1} - \theta_t u_t,\quad
  \mathcal{M}_t = (1-\alpha_t)\mathcal{M}_{t-1} + S_t,\quad y_t = \mathcal{M}_t(q_t)\ \text{or}\
  \mathcal{M}_{t-1}(q_t).$$

Its vector-Jacobian product runs the recurrences backwards. With $\bar{\mathcal{M}}_t$,
$\bar S_t$ the cotangents of the state after token $t$ (the read of $y_t$ included):

$$\bar S_t = \eta_{t+1}\bar S_{t+1} + \bar{\mathcal{M}}_t,\quad
  \bar\alpha_t = -\langle\bar{\mathcal{M}}_t, \mathcal{M}_{t-1}\rangle,\quad
  \bar\eta_t = \langle\bar S_t, S_{t-1}\rangle,\quad
  \bar\theta_t = -\langle\bar S_t, u_t\rangle,\quad
  \bar{\mathcal{M}}_{t-1} \mathrel{+}= (1-\alpha_t)\bar{\mathcal{M}}_t ,$$

and $\bar u_t = -\theta_t\bar S_t$ goes through the surprise by a Hessian-vector product
(:mod:`.mlp_backward`) into $\bar{\mathcal{M}}_{t'}$, $\bar k_t$, $\bar v_t$. Clipping the
surprise, $u \leftarrow u\min(1, c/\lVert u\rVert)$, adds its own Jacobian. The kernels:
:mod:`.vjp_token` (``chunk_size=1``) and :mod:`.vjp_chunk` (``chunk_size > 1``, every
product a GEMM over the chunk).

**What autograd sees.** One primitive of flat arrays,
``_scan_primitive(keys, values, queries, alpha, eta, theta, W_1..W_L, S_1..S_L)``, returning
the tuple ``(out, W_1..W_L, S_1..S_L)``. Autograd boxes a tuple result as a sequence, so the
final state is differentiable too: a later call can send gradients back through it
(streaming). :func:`numba_memory_scan_differentiable` packs and unpacks the ``MemoryState``.
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
($u_t = h^\top\delta$ is taped: only Eqs. 13-14 run again) and one GEMM per chunk
otherwise. Memory $\approx 2P(T/C + C/b)$, smallest near $C = \sqrt{bT}$; the default
$C \approx \sqrt{T}$ is that for ``b = 1`` and replays nothing for ``b \ge \sqrt{T}``. The
price is one more update pass per token (``b = 1``).

The large work arrays are recycled between calls (:class:`_BufferPool`): on the benchmark
machine the page faults of fresh memory cost a third of the forward.
"""

from __future__ import annotations

import math
import threading
import warnings
from dataclasses import dataclass

import autograd.numpy as anp
import numpy as np
from autograd.core import defvjp_argnums
from autograd.extend import primitive
from autograd.tracer import getval, isbox

from .._checks import check_choice
from ..memory.loss import check_loss
from ..memory.models import spec_of
from ..memory.update import MemoryDivergenceError, MemoryState
from .mlp import ACTIVATION_CODES, LOSS_CODES, aligned_zeros, pack_weights, padded, unpack_weights
from .replay import first_bad_token
from .vjp_chunk import chunk_backward, chunk_forward
from .vjp_token import token_backward, token_forward


@dataclass(frozen=True, eq=False)
class _Config:
    """Everything about one call that is not an array."""

    dtype: np.dtype
    shapes: np.ndarray  # (L, 2) fan-in, fan-out of each layer (:mod:`.mlp` layout)
    offsets: np.ndarray  # (L + 1,)
    act_kind: int
    residual: bool
    loss_kind: int
    p: float
    delta: float
    clip: float  # <= 0: no clipping
    chunk_size: int
    read_after: bool
    checkpoint_every: int
    on_nonfinite: str


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


@primitive
def _scan_primitive(keys, values, queries, alpha, eta, theta, *memory, config, tape):
    """The scan on flat arrays: ``memory = (W_1..W_L, S_1..S_L)``; returns ``(out, W..., S...)``."""
    cf, dt = config, config.dtype
    t_ = dt.type
    L = len(cf.shapes)
    K, V, Q, a, e, th = (np.ascontiguousarray(x, dtype=dt)
                         for x in (keys, values, queries, alpha, eta, theta))
    M, _, _ = pack_weights(memory[:L], dt)
    S, _, _ = pack_weights(memory[L:], dt)
    T, P = K.shape[0], M.shape[0]
    b, seg = cf.chunk_size, cf.checkpoint_every
    n_chunks = -(-T // b)
    z_size = int(cf.shapes[:, 1].sum())  # one row's z (and δ) of every layer
    h_size = max(int(cf.shapes[:-1, 1].sum()), 1)  # one row's hidden h (and σ', ∂ℓ/∂h)

    def rows(n, width):  # n rows of `width`, each starting on a 64-byte boundary
        arr = _POOL.take((n, padded(width, dt)), dt)
        tape.pooled.append(arr)
        return arr

    A = dict(  # per chunk of b rows (b = 1: per token), in the tape layout of .mlp
        ckM=rows(-(-T // seg), P), ckS=rows(-(-T // seg), P),
        KZ=rows(n_chunks, b * z_size), KH=rows(n_chunks, b * h_size),
        KD1=rows(n_chunks, b * h_size), KD=rows(n_chunks, b * z_size),
        KDH=rows(n_chunks, b * h_size), KP=np.zeros((T, cf.shapes[-1, 1]), dt),
        kln=np.zeros((T, 2), dt), QZ=rows(n_chunks, b * z_size), QH=rows(n_chunks, b * h_size),
        QD1=rows(n_chunks, b * h_size), qln=np.zeros((T, 2), dt), unorm2=np.zeros(T, dt),
        uscale=np.empty(T, dt),
    )
    out = np.empty((T, cf.shapes[-1, 1]), dt)
    head = (M, S, cf.shapes, cf.offsets, cf.act_kind, cf.residual, cf.loss_kind, t_(cf.p),
            t_(cf.delta), K, V, Q, a, e, th, t_(cf.clip), cf.read_after)
    stop = cf.on_nonfinite == "raise"
    scratch = [rows(1, P)[0, :P] for _ in range(2)] if b > 1 else []
    if b == 1:
        bad = token_forward(*head, seg, stop, out, A["ckM"], A["ckS"], A["KZ"], A["KH"],
                            A["KD1"], A["KD"], A["KP"], A["kln"], A["QZ"], A["QH"], A["QD1"],
                            A["qln"], A["unorm2"], A["uscale"])
    else:
        bad = chunk_forward(*head, b, seg, stop, out, A["ckM"], A["ckS"], A["KZ"], A["KH"],
                            A["KD1"], A["KD"], A["KDH"], A["KP"], A["kln"], A["QZ"], A["QH"],
                            A["QD1"], A["qln"], A["unorm2"], A["uscale"], *scratch)
    if bad >= 0:  # the weights of segment `bad` stopped being finite: find the token
        s0 = bad * seg
        first = first_bad_token(A["ckM"][bad, :P].copy(), A["ckS"][bad, :P].copy(), K, a, e, th,
                                cf.shapes, cf.offsets, b, s0, min(T, s0 + seg), A["KH"],
                                A["KD"], A["uscale"])
        err = MemoryDivergenceError(int(first))
        if stop:
            raise err
        warnings.warn(str(err), RuntimeWarning, stacklevel=5)
    tape.arrays = dict(A, K=K, V=V, Q=Q, alpha=a, eta=e, theta=th)
    return (out, *unpack_weights(M, cf.shapes, cf.offsets),
            *unpack_weights(S, cf.shapes, cf.offsets))


def _scan_vjp(argnums, ans, args, kwargs):
    cf, tape = kwargs["config"], kwargs["tape"]
    L = len(cf.shapes)

    def vjp(g):
        if any(isbox(x) for x in g):
            raise NotImplementedError(
                "the VJP of memory_scan(backend='numba') is first order only; use "
                "backend='reference' for higher derivatives")
        grads = _backward(cf, tape, g[0], g[1:1 + L], g[1 + L:])
        return tuple(np.asarray(grads[i], dtype=np.asarray(args[i]).dtype) for i in argnums)

    return vjp


defvjp_argnums(_scan_primitive, _scan_vjp)


def _backward(cf, tape, g_out, g_M, g_S):
    """Cotangents of all the primitive's arguments, in their order."""
    A, dt = tape.arrays, cf.dtype
    t_ = dt.type
    Mbar, _, _ = pack_weights(g_M, dt)  # in: of the final state; out: of the initial one
    Sbar, _, _ = pack_weights(g_S, dt)
    K = A["K"]
    T = K.shape[0]
    gK, gV, gQ = np.empty_like(K), np.empty_like(A["V"]), np.empty_like(A["Q"])
    ga, ge, gth = np.empty(T, dt), np.empty(T, dt), np.empty(T, dt)
    b, seg = cf.chunk_size, cf.checkpoint_every
    buffers = [_POOL.take((seg // b + 1, padded(Mbar.shape[0], dt)), dt) for _ in range(2)]
    head = (cf.shapes, cf.offsets, cf.act_kind, cf.residual, cf.loss_kind, t_(cf.p),
            t_(cf.delta), K, A["V"], A["Q"], A["alpha"], A["eta"], A["theta"], cf.read_after)
    tail = (np.ascontiguousarray(g_out, dtype=dt), Mbar, Sbar, gK, gV, gQ, ga, ge, gth,
            *buffers)
    if b == 1:
        token_backward(*head, seg, A["ckM"], A["ckS"], A["KZ"], A["KH"], A["KD1"], A["KD"],
                       A["KP"], A["kln"], A["QZ"], A["QH"], A["QD1"], A["qln"], A["unorm2"],
                       A["uscale"], *tail)
    else:
        chunk_backward(*head, b, seg, A["ckM"], A["ckS"], A["KZ"], A["KH"], A["KD1"], A["KD"],
                       A["KDH"], A["KP"], A["kln"], A["QZ"], A["QH"], A["QD1"], A["qln"],
                       A["unorm2"], A["uscale"], *tail)
    _POOL.give(buffers)
    return [gK, gV, gQ, ga, ge, gth, *unpack_weights(Mbar, cf.shapes, cf.offsets),
            *unpack_weights(Sbar, cf.shapes, cf.offsets)]


def default_checkpoint_every(T: int, chunk_size: int) -> int:
    r"""Tokens between two stored states: the multiple of ``chunk_size`` nearest $\sqrt{T}$."""
    return chunk_size * max(1, round(math.sqrt(T) / chunk_size))


def numba_memory_scan_differentiable(state, keys, values, queries, alpha, eta, theta, *,
                                     chunk_size=1, read="after", loss="l2", p=3.0, delta=1.0,
                                     max_grad_norm=None, on_nonfinite="raise",
                                     checkpoint_every=None):
    r"""``memory_scan(..., backend="numba")`` that autograd can differentiate (Titans Eqs. 13-18).

    Same arguments and results as :func:`minititans.memory.memory_scan` (validated there);
    any of ``keys``, ``values``, ``queries``, the gates ``(T,)`` and the weights and
    momentum of ``state`` may be autograd boxes, and the returned ``out`` and final state
    are differentiable with respect to all of them (first order).

    Args:
        checkpoint_every: tokens between stored states, a multiple of ``chunk_size``; None
            picks the multiple nearest $\sqrt{T}$ (module doc: memory against recomputation).

    Returns:
        ``(out (T, d_out), MemoryState)`` in the common dtype of the arrays.
    """
    if not isinstance(state, MemoryState):
        raise TypeError(f"state must be a MemoryState, got {type(state).__name__}")
    check_choice("read", read, ("after", "before"))
    check_choice("on_nonfinite", on_nonfinite, ("raise", "warn"))
    check_loss(loss, p, delta)
    spec = spec_of(state.params)
    L = len(spec)
    weights = [state.params[i] for i in range(L)]
    momenta = [state.momentum[i] for i in range(L)]
    dtype = np.result_type(*(np.asarray(getval(x)) for x in (keys, values, queries, *weights)))
    T = np.shape(getval(keys))[0]
    if T == 0:
        return np.zeros((0, spec.d_out), dtype=dtype), state
    gates = [g if np.ndim(getval(g)) == 1 else g * anp.ones(T) for g in (alpha, eta, theta)]
    b = int(chunk_size)
    seg = default_checkpoint_every(T, b) if checkpoint_every is None else int(checkpoint_every)
    if seg < 1 or seg % b:
        raise ValueError(f"checkpoint_every must be a positive multiple of chunk_size={b}, "
                         f"got {seg}")
    _, shapes, offsets = pack_weights([getval(w) for w in weights], dtype)
    config = _Config(dtype=np.dtype(dtype), shapes=shapes, offsets=offsets,
                     act_kind=ACTIVATION_CODES[spec.activation], residual=spec.residual_norm,
                     loss_kind=LOSS_CODES[loss], p=float(p), delta=float(delta),
                     clip=-1.0 if max_grad_norm is None else float(max_grad_norm),
                     chunk_size=b, read_after=read == "after", checkpoint_every=seg,
                     on_nonfinite=on_nonfinite)
    res = _scan_primitive(keys, values, queries, *gates, *weights, *momenta, config=config,
                          tape=_Tape())
    params = spec.like([res[1 + i] for i in range(L)])
    momentum = spec.like([res[1 + L + i] for i in range(L)])
    return res[0], MemoryState(params, momentum)
