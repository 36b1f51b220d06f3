r"""The token loop (``chunk_size=1``, Eqs. 13–14) with an optional tape, and its VJP.

The twin of ``_token_loop`` in :mod:`minititans.memory.scan`. Per token $t$ (Eqs. 8, 13,
14), with the surprise clipped to a global norm when asked,

$$u_t = \nabla_W \ell(\mathcal{M}_{t-1}; k_t, v_t),\quad
  S_t = \eta_t S_{t-1} - \theta_t u_t,\quad
  \mathcal{M}_t = (1 - \alpha_t)\mathcal{M}_{t-1} + S_t,\quad
  y_t = \mathcal{M}_t(q_t)\ \text{or}\ \mathcal{M}_{t-1}(q_t).$$

With an anchor $\bar{\mathcal{M}}$ (``seq.anchor`` not empty) Eq. 13 acts on
$\mathcal{M} - \bar{\mathcal{M}}$: $\mathcal{M}_t = (1-\alpha_t)\mathcal{M}_{t-1} +
\alpha_t\bar{\mathcal{M}} + S_t$ (:func:`forget_towards`, a second pass per matrix that
only anchored scans make); backwards, $\bar\alpha_t$ gains
$\langle\bar{\mathcal{M}}_t, \bar{\mathcal{M}}\rangle$ and the anchor's cotangent is
$\sum_t \alpha_t\bar{\mathcal{M}}_t$.

**Forward** (:func:`token_loop`). One pass over each weight matrix per token does everything
that needs it: Eq. 14, Eq. 13, and the forward pass of the *next* two rows through the new
weights (the query read and the next key), so $W$, $S$ are read and written once per token.
The loops run over the contiguous output axis and vectorise without fastmath; the one
reduction, $\delta_{i+1} W_{i+1}^\top$, is a BLAS ``gemv``. With a full tape it also keeps
the per-token rows and a checkpoint every ``seg`` tokens, for the VJP.

**Backward** (:func:`token_vjp`), one segment at a time, last first:

1. *replay* the segment from its checkpoint into a buffer of states (no matrix product:
   $u_t = h^\top\delta$ is taped), and while $\mathcal{M}$ is in cache, back-propagate each
   read: $\bar z$ of the query rows (taped) and $\bar q_t$;
2. *reverse*, token by token: one pass over each weight matrix does Eqs. 13–14 backwards,

   $$\bar{\mathcal{M}}_t = (1-\alpha_{t+1})\bar{\mathcal{M}} + \textstyle\sum_k l_k^\top r_k,
     \qquad \bar S_t = \eta_{t+1}\bar S + \bar{\mathcal{M}}_t ,$$

   and, with the matrices in cache, BLAS gives
   $\bar\alpha_t = -\langle\bar{\mathcal{M}}_t, \mathcal{M}_{t-1}\rangle$,
   $\bar\eta_t = \langle\bar S_t, S_{t-1}\rangle$ and the products $h_{i-1}\bar S_{t,i}$,
   $\delta_i\bar S_{t,i}^\top$: all that the Hessian-vector product of
   $\bar u_t = -\theta_t c_t \bar S_t$ needs (:mod:`.hvp`). The rank-one terms
   $l_k^\top r_k$ are cotangents of $\mathcal{M}_t$ left pending by the read and by the
   Hessian-vector product of token $t+1$ (rank two per layer), so no pass of their own adds
   them; likewise $\bar{\mathcal{M}}$ waits for the next pass to be multiplied by $1-\alpha$.

Divergence (a weight NaN, inf or past ``spec.bound``, :func:`minititans._checks.weight_bound`)
is found without a pass over the weights at every token: running upper bounds of each
layer's largest weight, from the norms of the rows the update multiplies, trigger an exact
scan of the layer only when they reach half the bound (see :func:`token_loop`).
"""

from __future__ import annotations

import math

import numpy as np

from ._jit import kernel
from .hvp import hvp_rows, hvp_work_size, scale_products, scale_products_per_layer
from .layout import add_scaled, copy, key_rows, layer, tape_view
from .rows import (
    apply_update,
    backprop_rows,
    clip_scales,
    forget_rows,
    matmul_t,
    max_abs,
    memory_forward_rows,
    output_rows,
    surprise_rows,
)
from .scalars import hidden

N_PENDING = 3  # rank-one cotangents of a state: a read, and the two of a Hessian-vector product


@kernel
def update_and_read(W, S, d, kin, e, decay, g_scale, xa, xb, za, zb):
    r"""Eqs. 14 and 13 on one weight matrix, fused with reading two rows through the result.

    $S \leftarrow \eta S + g\,k^\top d$, $W \leftarrow (1-\alpha) W + S$ with
    $g = -\theta c$ (the surprise $u = k^\top d$ is never formed) and ``decay`` $= 1-\alpha$
    on each output channel (column), then ``za = xa W``,
    ``zb = xb W`` with the new $W$. The inner loop runs over the contiguous output axis with
    no reduction, so it vectorises in strict IEEE arithmetic.
    """
    za[:] = 0
    zb[:] = 0
    n = W.shape[1]
    for a in range(W.shape[0]):
        g = g_scale * kin[a]
        qa = xa[a]
        kb = xb[a]
        Wa = W[a]
        Sa = S[a]
        for j in range(n):
            s = e * Sa[j] + g * d[j]  # Eq. 14
            Sa[j] = s
            m = decay[j] * Wa[j] + s  # Eq. 13
            Wa[j] = m
            za[j] += qa * m
            zb[j] += kb * m


@kernel
def forget_towards(W, A, alpha, xa, xb, za, zb):
    r"""Eq. 13 around an anchor, after :func:`update_and_read`: $W \leftarrow W + \alpha\bar W$
    with ``alpha`` a rate per output channel (so $W = \bar W + (1-\alpha)(W_{t-1} - \bar W)
    + S$), and the two rows read again through the result, ``za = xa W``, ``zb = xb W``,
    summed in the order of every other read (so a stream cut into calls gives the same bits
    as one call). Only anchored scans call it."""
    za[:] = 0
    zb[:] = 0
    for a in range(W.shape[0]):
        qa, kb = xa[a], xb[a]
        Wa, Aa = W[a], A[a]
        for j in range(W.shape[1]):
            m = Wa[j] + alpha[j] * Aa[j]
            Wa[j] = m
            za[j] += qa * m
            zb[j] += kb * m


@kernel
def _read_row(M, spec, x, Z, H, HD1, ln, y, want_d1):
    """One row ``x`` ``(1, d)`` through the memory ``M`` into the tape rows; ``y = M(x)``."""
    L = spec.shapes.shape[0]
    memory_forward_rows(M, spec, x, Z, H, HD1, want_d1)
    output_rows(tape_view(Z, spec.zoff[L - 1], 1, spec.shapes[L - 1, 1]), x, spec.residual,
                ln, y)


@kernel
def token_loop(M, S, spec, seq, tape, seg, stop, out):
    r"""Eqs. 13–14 token by token, in place on ``M``, ``S`` (flat ``(P,)``); writes ``out``.

    Args:
        M, S: flat weights $\mathcal{M}_0$ and momentum $S_0$ (64-byte aligned), updated in
            place to $\mathcal{M}_T$, $S_T$.
        spec: :class:`.layout.Spec`; seq: :class:`.layout.Seq` (``K``, ``V``, ``Q`` ``(T, d)``,
            ``eta`` ``(T,)``, ``alpha`` ``(T, 1 or C)``, ``theta`` ``(T, 1 or L)``).
        tape: :class:`.layout.Tape` from :func:`.layout.new_tape` (``b = 1``): a full one is
            filled for the VJP (every ``seg`` tokens a checkpoint), a workspace one is only
            used.
        stop: return at the first token whose weights have diverged.
        out: ``(T, d_out)``, written.

    Returns:
        The first token whose update made the weights diverge (NaN, inf or past
        ``spec.bound``), or -1.

    The bound is checked without a pass over the weights at every token: per layer, running
    upper bounds $U_S \ge \max|S|$ and $U_W \ge \max|W|$ follow from the update itself,
    $U_S \leftarrow \eta_t U_S + \theta_t c \lVert k\rVert\lVert\delta\rVert$ and
    $U_W \leftarrow (1-\alpha_t) U_W + U_S\ (+\,\alpha_t \max|\bar W|)$, in $O(d)$ a token;
    only when $U_W$ reaches half the bound are the layer's weights scanned, which gives the
    exact maxima back (and the exact first token past the bound).
    """
    K, Q = seq.K, seq.Q
    T = K.shape[0]
    L = spec.shapes.shape[0]
    zoff, hoff = spec.zoff, spec.hoff
    nz = zoff[L]
    n_k, n_q = tape.KZ.shape[0], tape.QZ.shape[0]  # T + 1 each, or 2 and 1 (workspace)
    keep = tape.ckM.shape[0] > 0
    anchored = seq.anchor.shape[0] > 0
    zero_row = np.zeros((1, K.shape[1]), M.dtype)
    # upper bounds of max|W_i|, max|S_i| (exact at the start) and max|anchor_i|, per layer
    UW, US, UA = np.zeros(L), np.zeros(L), np.zeros(L)
    for i in range(L):
        UW[i] = max_abs(layer(M, spec.shapes, spec.offsets, i).ravel())
        US[i] = max_abs(layer(S, spec.shapes, spec.offsets, i).ravel())
        if anchored:
            UA[i] = max_abs(layer(seq.anchor, spec.shapes, spec.offsets, i).ravel())
    half_bound = 0.5 * float(spec.bound)
    per_layer = seq.theta.shape[1] > 1  # θ (T, L): a step size per memory layer
    # 1 - α_t and α_t on each output channel (α (T, 1): the same on all; (T, C): channel-wise)
    keep_c, rate_c = np.empty(nz, M.dtype), np.empty(nz, M.dtype)
    # the first key (and query) through M_0; later rows are read inside the update pass
    _read_row(M, spec, K[0:1], tape.KZ[0], tape.KH[0], tape.KD1[0], tape.kln[0:1],
              tape.KP[0:1], True)
    if not spec.read_after:
        _read_row(M, spec, Q[0:1], tape.QZ[0], tape.QH[0], tape.QD1[0], tape.qln[0:1],
                  out[0:1], keep)
    first_bad = -1
    for t in range(T):
        kt, kn = t % n_k, (t + 1) % n_k
        if keep and t % seg == 0:
            copy(M, tape.ckM[t // seg])
            copy(S, tape.ckS[t // seg])
        # Eq. 8: δ of k_t at M_{t-1}; the surprise u_{t,i} = h_{i-1}ᵀ δ_i is never formed
        key = key_rows(seq, tape, t, 1, kt, kt)
        surprise_rows(M, spec, key)
        clip_scales(spec, key.X, key.H, key.D, tape.unorm2[kt:kt + 1], tape.uscale[kt:kt + 1])
        c = tape.uscale[kt]
        # the rows read through M_t: A = q_t (after) or q_{t+1} (before), B = k_{t+1}
        ta = t if spec.read_after else t + 1
        qa = ta % n_q
        xa = Q[ta:ta + 1] if ta < T else zero_row
        xb = K[t + 1:t + 2] if t + 1 < T else zero_row
        za, ha, hda = tape.QZ[qa], tape.QH[qa], tape.QD1[qa]
        zb, hb, hdb = tape.KZ[kn], tape.KH[kn], tape.KD1[kn]
        bad = False
        a_lo, a_hi = forget_rows(seq.alpha, t, keep_c, rate_c)
        for i in range(L):
            lo, hi = zoff[i], zoff[i + 1]
            W = layer(M, spec.shapes, spec.offsets, i)
            h0, h1 = hoff[i - 1], hoff[i]
            ra, rb = (xa[0], xb[0]) if i == 0 else (ha[h0:h1], hb[h0:h1])
            th = seq.theta[t, i if per_layer else 0]  # θ_t, or layer i's (Appendix B.3)
            update_and_read(W, layer(S, spec.shapes, spec.offsets, i), key.D[lo:hi],
                            K[t] if i == 0 else key.H[h0:h1], seq.eta[t],
                            keep_c[lo:hi], -th * c, ra, rb, za[lo:hi], zb[lo:hi])
            if anchored:
                forget_towards(W, layer(seq.anchor, spec.shapes, spec.offsets, i),
                               rate_c[lo:hi], ra, rb, za[lo:hi], zb[lo:hi])
            if first_bad < 0:
                kin = K[t] if i == 0 else key.H[h0:h1]
                dl = key.D[lo:hi]  # |k_a δ_j| <= ‖k‖ ‖δ‖ (NaN stays NaN: the scan runs)
                US[i] = seq.eta[t] * US[i] + abs(th * c) * math.sqrt(
                    np.dot(kin, kin) * np.dot(dl, dl))
                UW[i] = (1.0 - a_lo) * UW[i] + US[i] + a_hi * UA[i]
                if not (UW[i] <= half_bound):  # scan the layer: the exact maxima
                    UW[i] = max_abs(W.ravel())
                    US[i] = max_abs(layer(S, spec.shapes, spec.offsets, i).ravel())
                    bad |= not (UW[i] <= spec.bound)
            if i < L - 1:
                hidden(za[lo:hi], ha[h1:hoff[i + 1]], hda[h1:hoff[i + 1]], spec.act_kind, keep)
                hidden(zb[lo:hi], hb[h1:hoff[i + 1]], hdb[h1:hoff[i + 1]], spec.act_kind, True)
        # the weights diverged: a NaN, an inf or a magnitude past spec.bound (_checks)
        if bad and first_bad < 0:
            first_bad = t
            if stop:
                return t
        if ta < T:
            output_rows(tape_view(za, zoff[L - 1], 1, nz - zoff[L - 1]), xa, spec.residual,
                        tape.qln[qa:qa + 1], out[ta:ta + 1])
        # B (the next key at M_t) becomes the key row
        output_rows(tape_view(zb, zoff[L - 1], 1, nz - zoff[L - 1]), xb, spec.residual,
                    tape.kln[kn:kn + 1], tape.KP[kn:kn + 1])
    return first_bad


@kernel
def token_vjp(spec, seq, tape, seg, gout, Mbar, Sbar, grads, Mbuf, Sbuf):
    """The VJP of :func:`token_loop` with a full tape (module doc). ``Mbar``, ``Sbar`` enter
    as the cotangents of the final state and leave as those of the initial state; ``grads``
    (:class:`.layout.Seq` of arrays like ``seq``) is written. ``Mbuf``, ``Sbuf``
    ``(seg + 1, >= P)`` (64-byte aligned rows) hold the replayed states of one segment."""
    t_ = Mbar.dtype.type
    K, Q = seq.K, seq.Q
    T = K.shape[0]
    shapes, offsets = spec.shapes, spec.offsets
    L = shapes.shape[0]
    P = offsets[L]
    zoff, hoff, boff = spec.zoff, spec.hoff, spec.boff
    nz, nin = zoff[L], boff[L]
    ZQ = np.empty((seg, nz), Mbar.dtype)  # z̄ of the reads of the segment
    DHQ = np.empty(max(hoff[L - 1], 1), Mbar.dtype)
    # pending rank-one cotangents of the next state to visit: 0 a read, 1-2 the HVP
    PL = np.zeros((N_PENDING, nin), Mbar.dtype)
    PR = np.zeros((N_PENDING, nz), Mbar.dtype)
    A = np.empty(nz, Mbar.dtype)  # h_{i-1} ū_i
    B = np.empty(nin, Mbar.dtype)  # δ_i ū_iᵀ
    work = np.empty(hvp_work_size(shapes, 1), Mbar.dtype)
    corr, coef = np.empty(1, Mbar.dtype), np.empty(1, Mbar.dtype)
    anchored = seq.anchor.shape[0] > 0  # grads.anchor accumulates (zero on entry)
    per_layer = seq.theta.shape[1] > 1  # θ (T, L): grads.theta too
    channels = seq.alpha.shape[1] > 1  # α (T, C): a rate per output channel, grads.alpha too
    eta_next = t_(1.0)  # η_{t+1}: S̄_t = η_{t+1} S̄_{t+1} + M̄_t
    # 1 - α_{t+1} on each output channel: M̄ waits for the next pass to be multiplied by it
    keep = np.ones(nz, Mbar.dtype)
    keep_r, rate = np.empty(nz, Mbar.dtype), np.empty(nz, Mbar.dtype)
    for k in range((T - 1) // seg, -1, -1):
        s0, s1 = k * seg, min(T, k * seg + seg)
        # 1. replay the segment: Mbuf[j] = M_{s0+j-1}; back-propagate each read meanwhile
        copy(tape.ckM[k][:P], Mbuf[0][:P])
        copy(tape.ckS[k][:P], Sbuf[0][:P])
        for t in range(s0, s1):
            j = t - s0
            read = Mbuf[j + 1] if spec.read_after else Mbuf[j]
            if not spec.read_after:
                _read_back(read, spec, seq, tape, t, gout[t], ZQ[j], DHQ, grads.Q[t:t + 1])
            apply_update(Mbuf[j], Sbuf[j], Mbuf[j + 1], Sbuf[j + 1], spec, seq,
                         key_rows(seq, tape, t, 1, t, t), 0, t, tape.uscale[t], keep_r, rate)
            if spec.read_after:
                _read_back(read, spec, seq, tape, t, gout[t], ZQ[j], DHQ, grads.Q[t:t + 1])
        # 2. reverse
        for t in range(s1 - 1, s0 - 1, -1):
            j = t - s0
            key = key_rows(seq, tape, t, 1, t, t)
            if spec.read_after:  # y_t = M_t(q_t): a cotangent of M_t
                _set_pending(PL[0], PR[0], spec, Q[t], tape.QH[t], ZQ[j])
            dot_m, dot_s = _pass(Mbar, Sbar, Mbuf[j], Sbuf[j], spec, PL, PR, keep, eta_next,
                                 t_(1.0), key, A)
            # keep = 1 - α_t from here on: what the next pass (token t - 1) multiplies by
            forget_rows(seq.alpha, t, keep, rate)
            if channels:  # ᾱ_{t,c} from column c only
                _alpha_channels_vjp(Mbar, Mbuf[j], spec, seq, t, rate, grads)
            else:
                grads.alpha[t, 0] = -dot_m  # Eq. 13
                if anchored:  # M_t = (1 - α_t) M_{t-1} + α_t M̄ + S_t
                    grads.alpha[t, 0] += np.dot(Mbar[:P], seq.anchor[:P])
                    add_scaled(Mbar[:P], seq.alpha[t, 0], grads.anchor)
            grads.eta[t] = dot_s  # Eq. 14
            c = tape.uscale[t]
            if not per_layer:
                dot_u = t_(0.0)  # ⟨S̄_t, u_t⟩
                for i in range(L):
                    d = key.D[zoff[i]:zoff[i + 1]]
                    np.dot(layer(Sbar, shapes, offsets, i), d, B[boff[i]:boff[i + 1]])
                    dot_u += np.dot(A[zoff[i]:zoff[i + 1]], d)
                grads.theta[t, 0] = -c * dot_u
                # ū_t = -θ_t c_t S̄_t, minus its component along u_t when the clip is active
                corr[0] = dot_u / tape.unorm2[t] if c < t_(1.0) else t_(0.0)
                coef[0] = -seq.theta[t, 0] * c
                scale_products(A, B, spec, key, corr, coef)
            else:  # θ per layer: θ̄_{t,i} = -c ⟨S̄_i, u_i⟩, ū_i = c (κ u_i - θ_{t,i} S̄_i)
                weighted = t_(0.0)  # Σ_i θ_{t,i} ⟨S̄_i, u_i⟩
                for i in range(L):
                    d = key.D[zoff[i]:zoff[i + 1]]
                    np.dot(layer(Sbar, shapes, offsets, i), d, B[boff[i]:boff[i + 1]])
                    dot_i = np.dot(A[zoff[i]:zoff[i + 1]], d)
                    grads.theta[t, i] = -c * dot_i
                    weighted += seq.theta[t, i] * dot_i
                kappa = weighted / tape.unorm2[t] if c < t_(1.0) else t_(0.0)
                scale_products_per_layer(A, B, spec, key, kappa, c, seq.theta[t])
            # the weight cotangent of the HVP stays pending: PL[1] = ḣ, PR[1] = δ,
            # PL[2] = h, PR[2] = z̄
            hvp_rows(Mbuf[j], spec, key, A, B, PL[1], PR[2], grads.K[t:t + 1],
                     grads.V[t:t + 1], work)
            _set_pending(PL[2], PR[1], spec, K[t], key.H, key.D)
            if spec.read_after:
                PL[0, :] = 0
                PR[0, :] = 0
            else:  # y_t = M_{t-1}(q_t): a cotangent of M_{t-1}
                _set_pending(PL[0], PR[0], spec, Q[t], tape.QH[t], ZQ[j])
            eta_next = seq.eta[t]
    # the initial state: M̄_0 = (1 - α_0) M̄ + pending, S̄_0 = η_0 S̄
    _pass(Mbar, Sbar, Mbar, Sbar, spec, PL, PR, keep, eta_next, t_(0.0),
          key_rows(seq, tape, 0, 1, 0, 0), A)


@kernel
def _read_back(W, spec, seq, tape, t, ybar, zbar, dh, qbar):
    r"""Back-propagate ``ybar`` through the read $y_t = \mathcal{M}(q_t)$ at ``W`` (taped
    query rows): $\bar z$ of every layer into ``zbar`` (tape layout), $\bar q$ into ``qbar``
    ``(1, d_in)``; ``dh`` is scratch."""
    L = spec.shapes.shape[0]
    copy(ybar, zbar[spec.zoff[L - 1]:spec.zoff[L]])
    backprop_rows(W, spec, tape.QZ[t], tape.qln[t:t + 1], tape.QD1[t], zbar, dh)
    matmul_t(zbar[:spec.zoff[1]].reshape((1, spec.zoff[1])),
             layer(W, spec.shapes, spec.offsets, 0), qbar)
    if spec.residual:
        for a in range(qbar.shape[1]):
            qbar[0, a] += ybar[a]


@kernel
def _set_pending(pl, pr, spec, x, H, R):
    """A pending term: for layer i, ``l_i`` = the row entering it (``x``, then the ``H``
    tape) and ``r_i`` = ``R`` (tape layout)."""
    hoff, boff = spec.hoff, spec.boff
    for i in range(spec.shapes.shape[0]):
        copy(x if i == 0 else H[hoff[i - 1]:hoff[i]], pl[boff[i]:boff[i + 1]])
    copy(R[:pr.shape[0]], pr)


@kernel
def _pass(Mbar, Sbar, Mp, Sp, spec, PL, PR, keep, eta_next, add_m, key, A):
    r"""Eqs. 13–14 backwards on every weight matrix (module doc, step 2).

    One pass per matrix turns the stored $\bar{\mathcal{M}}$ into
    $\bar{\mathcal{M}}_t = (1-\alpha_{t+1})\bar{\mathcal{M}} + \sum_k l_k^\top r_k$ (``keep``
    $= 1-\alpha_{t+1}$ on each output channel) and $\bar S$ into
    $\bar S_t = \eta_{t+1}\bar S + \bar{\mathcal{M}}_t$ (``add_m`` = 1; 0 for the initial
    state, whose $\bar S_0 = \eta_0 \bar S$).
    Its inner loop touches only these two and runs along the contiguous axis, so it
    vectorises. Then, with the matrices in cache, BLAS gives ``A`` (tape layout)
    $= h_{i-1}\bar S_{t,i}$ for the key rows, and the returned
    $(\langle\bar{\mathcal{M}}_t, \mathcal{M}_{t-1}\rangle, \langle\bar S_t, S_{t-1}\rangle)$.
    """
    t_ = Mbar.dtype.type
    shapes, offsets, zoff, boff, hoff = spec.shapes, spec.offsets, spec.zoff, spec.boff, spec.hoff
    dot_m = t_(0.0)
    dot_s = t_(0.0)
    for i in range(shapes.shape[0]):
        lo, hi, blo, bhi = zoff[i], zoff[i + 1], boff[i], boff[i + 1]
        Mb, Sb = layer(Mbar, shapes, offsets, i), layer(Sbar, shapes, offsets, i)
        r0, r1, r2 = PR[0, lo:hi], PR[1, lo:hi], PR[2, lo:hi]
        l0, l1, l2 = PL[0, blo:bhi], PL[1, blo:bhi], PL[2, blo:bhi]
        kp = keep[lo:hi]
        for a in range(shapes[i, 0]):
            c0, c1, c2 = l0[a], l1[a], l2[a]
            mrow, srow = Mb[a], Sb[a]
            for j in range(shapes[i, 1]):
                mb = kp[j] * mrow[j] + c0 * r0[j] + c1 * r1[j] + c2 * r2[j]
                mrow[j] = mb
                srow[j] = eta_next * srow[j] + add_m * mb
        o0, o1 = offsets[i], offsets[i + 1]
        dot_m += np.dot(Mbar[o0:o1], Mp[o0:o1])
        dot_s += np.dot(Sbar[o0:o1], Sp[o0:o1])
        np.dot(key.X[0] if i == 0 else key.H[hoff[i - 1]:hoff[i]], Sb, A[lo:hi])
    return dot_m, dot_s


@kernel
def _alpha_channels_vjp(Mbar, Mp, spec, seq, t, rate, grads):
    r"""Eq. 13 backwards with a rate per output channel $c$ (``rate`` $= \alpha_{t,c}$):
    $\bar\alpha_{t,c} = -\sum_a \bar{\mathcal{M}}_t[a, c]\,\mathcal{M}_{t-1}[a, c]$ (``Mp``
    $= \mathcal{M}_{t-1}$), plus $\sum_a \bar{\mathcal{M}}_t[a, c]\,\bar{\mathcal{M}}[a, c]$
    and the anchor's cotangent $\alpha_{t,c}\bar{\mathcal{M}}_t[a, c]$ when there is an
    anchor: the per-token gradient, one column at a time."""
    shapes, offsets, zoff = spec.shapes, spec.offsets, spec.zoff
    anchored = seq.anchor.shape[0] > 0
    g = grads.alpha[t]
    for i in range(shapes.shape[0]):
        lo, n = zoff[i], shapes[i, 1]
        Mb, Mq = layer(Mbar, shapes, offsets, i), layer(Mp, shapes, offsets, i)
        for j in range(n):
            g[lo + j] = 0.0
        for a in range(shapes[i, 0]):
            for j in range(n):
                g[lo + j] -= Mb[a, j] * Mq[a, j]
        if anchored:
            An, Ga = layer(seq.anchor, shapes, offsets, i), layer(grads.anchor, shapes, offsets, i)
            for a in range(shapes[i, 0]):
                for j in range(n):
                    g[lo + j] += Mb[a, j] * An[a, j]
                    Ga[a, j] += rate[lo + j] * Mb[a, j]
