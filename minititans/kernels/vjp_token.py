r"""The token loop (``chunk_size=1``, Titans Eqs. 13-14) with tapes, and its VJP.

Forward, per token: $u_t = \nabla\ell(\mathcal{M}_{t-1}; k_t, v_t)$, $S_t = \eta_t S_{t-1} -
\theta_t u_t$, $\mathcal{M}_t = (1-\alpha_t)\mathcal{M}_{t-1} + S_t$, $y_t = \mathcal{M}_t(q_t)$
(or $\mathcal{M}_{t-1}(q_t)$). :func:`token_forward` is :func:`.scan.token_loop` (the same
fused pass per weight matrix: Eqs. 14, 13 and the next two rows read through the new
weights) that also keeps the per-token vectors and a checkpoint every ``seg`` tokens.

Backward (:func:`token_backward`), one segment at a time, last first:

1. *replay* the segment from its checkpoint into a buffer of states (no matrix product:
   $u_t = h^\top\delta$ is taped), and while $\mathcal{M}$ is in cache, back-propagate each
   read: $\bar z$ of the query rows (taped) and $\bar q_t$;
2. *reverse*, token by token: one pass over each weight matrix does Eqs. 13-14 backwards,

   $$\bar{\mathcal{M}}_t = (1-\alpha_{t+1})\bar{\mathcal{M}} + \textstyle\sum_k l_k^\top r_k,
     \qquad \bar S_t = \eta_{t+1}\bar S + \bar{\mathcal{M}}_t ,$$

   and, with the matrices in cache, BLAS gives
   $\bar\alpha_t = -\langle\bar{\mathcal{M}}_t, \mathcal{M}_{t-1}\rangle$,
   $\bar\eta_t = \langle\bar S_t, S_{t-1}\rangle$ and the products $h_{i-1}\bar S_{t,i}$,
   $\delta_i\bar S_{t,i}^\top$: all that the Hessian-vector product of
   $\bar u_t = -\theta_t c_t \bar S_t$ needs (:mod:`.mlp_backward`). The rank-one terms
   $l_k^\top r_k$ are cotangents of $\mathcal{M}_t$ left pending by the read and by the
   Hessian-vector product of token $t+1$ (rank two per layer), so no pass of their own adds
   them; likewise $\bar{\mathcal{M}}$ waits for the next pass to be multiplied by
   $1-\alpha$.

The row helpers of the forward are those of :mod:`.scan` (``_row_forward``, ``_row_deltas``,
``_update_rows``, ``_hidden``), so both compute the same numbers.
"""

from __future__ import annotations

import math

import numpy as np

from ._jit import kernel
from .mlp import (
    _tape_offsets,
    act_d2,
    layer,
    layer_norm_backward_rows,
    loss_curv,
    loss_grad,
)
from .mlp_backward import in_offsets, layer_norm_curvature_rows, output_rows
from .replay import all_finite, copy, surprise_norm2, update
from .scan import _hidden, _row_deltas, _row_forward, _update_rows

N_PENDING = 3  # rank-one cotangents of a state: a read, and the two of a Hessian-vector product


@kernel
def token_forward(M, S, shapes, offsets, act_kind, residual, loss_kind, p, delta, K, V, Q,
                  alpha, eta, theta, clip, read_after, seg, stop_on_bad, out, ckM, ckS, KZ, KH,
                  KD1, KD, KP, kln, QZ, QH, QD1, qln, unorm2, uscale):
    """The token loop in place on ``M``, ``S``; writes ``out`` and keeps, per token t, the
    key's ``KZ`` (z), ``KH`` (h), ``KD1`` (σ'(z)), ``KD`` (δ), ``KP`` (M(k)), ``kln``; the
    query's ``QZ``, ``QH``, ``QD1``, ``qln``; ``unorm2`` (‖u‖², when clipping) and ``uscale``
    (clip scale); and ``(M, S)`` before every ``seg``-th token in ``ckM``, ``ckS``.

    Returns the first segment at whose end the weights are not finite, or -1.
    """
    t_ = M.dtype.type
    T = K.shape[0]
    L = shapes.shape[0]
    zoff, hoff = _tape_offsets(shapes, 1)
    nz = zoff[L]
    spare_z, spare_h = np.empty(KZ.shape[1], M.dtype), np.empty(KH.shape[1], M.dtype)
    spare_d, spare_y = np.empty(KH.shape[1], M.dtype), np.empty(shapes[L - 1, 1], M.dtype)
    spare_ln = np.empty(2, M.dtype)
    zero_row = np.zeros(shapes[0, 0], M.dtype)
    # the first key (and query) through M_0; later rows are read inside the update pass
    _row_forward(M, shapes, offsets, zoff, hoff, act_kind, K[0], KZ[0], KH[0], KD1[0])
    _output_row(KZ[0][zoff[L - 1]:nz], K[0], residual, kln[0], KP[0])
    if not read_after:
        _row_forward(M, shapes, offsets, zoff, hoff, act_kind, Q[0], QZ[0], QH[0], QD1[0])
        _output_row(QZ[0][zoff[L - 1]:nz], Q[0], residual, qln[0], out[0])
    bad_segment = -1
    for t in range(T):
        if t % seg == 0:
            if t > 0 and bad_segment < 0 and not all_finite(M):
                bad_segment = t // seg - 1
                if stop_on_bad:
                    return bad_segment
            copy(M, ckM[t // seg])
            copy(S, ckS[t // seg])
        # Eq. 8: δ of k_t at M_{t-1}; the surprise is u_{t,i} = h_{i-1}ᵀ δ_i
        _row_deltas(M, shapes, offsets, zoff, hoff, residual, loss_kind, p, delta, V[t], KZ[t],
                    KD1[t], kln[t], KP[t], KD[t])
        c = t_(1.0)
        if clip > 0:
            unorm2[t] = surprise_norm2(shapes, K[t], KH[t], KD[t], 1, 0)
            c = min(t_(1.0), clip / max(math.sqrt(unorm2[t]), t_(1e-30)))
        uscale[t] = c
        # the rows read through M_t: a = q_t (after) or q_{t+1} (before); b = k_{t+1}
        ta = t if read_after else t + 1
        xa, za, ha, hda = zero_row, spare_z, spare_h, spare_d
        if ta < T:
            xa, za, ha, hda = Q[ta], QZ[ta], QH[ta], QD1[ta]
        xb, zb, hb, hdb = zero_row, spare_z, spare_h, spare_d
        if t + 1 < T:
            xb, zb, hb, hdb = K[t + 1], KZ[t + 1], KH[t + 1], KD1[t + 1]
        for i in range(L):
            lo, hi = zoff[i], zoff[i + 1]
            # Eqs. 14, 13 on W_i, fused with z = x W_i of the two rows
            _update_rows(layer(M, shapes, offsets, i), layer(S, shapes, offsets, i),
                         KD[t][lo:hi], K[t] if i == 0 else KH[t][hoff[i - 1]:hoff[i]],
                         eta[t], t_(1.0) - alpha[t], -theta[t] * c,
                         xa if i == 0 else ha[hoff[i - 1]:hoff[i]],
                         xb if i == 0 else hb[hoff[i - 1]:hoff[i]], za[lo:hi], zb[lo:hi])
            if i < L - 1:
                _hidden(za[lo:hi], ha[hoff[i]:hoff[i + 1]], hda[hoff[i]:hoff[i + 1]], act_kind,
                        True)
                _hidden(zb[lo:hi], hb[hoff[i]:hoff[i + 1]], hdb[hoff[i]:hoff[i + 1]], act_kind,
                        True)
        if ta < T:
            _output_row(za[zoff[L - 1]:nz], xa, residual, qln[ta], out[ta])
        if t + 1 < T:
            _output_row(zb[zoff[L - 1]:nz], xb, residual, kln[t + 1], KP[t + 1])
        else:
            _output_row(zb[zoff[L - 1]:nz], xb, residual, spare_ln, spare_y)
    if bad_segment < 0 and not all_finite(M):
        bad_segment = (T - 1) // seg
    return bad_segment


@kernel
def token_backward(shapes, offsets, act_kind, residual, loss_kind, p, delta, K, V, Q, alpha,
                   eta, theta, read_after, seg, ckM, ckS, KZ, KH, KD1, KD, KP, kln, QZ, QH, QD1,
                   qln, unorm2, uscale, gout, Mbar, Sbar, gK, gV, gQ, galpha, geta, gtheta, Mbuf,
                   Sbuf):
    """The VJP of :func:`token_forward` (module doc). ``Mbar``, ``Sbar`` enter as the
    cotangents of the final state and leave as those of the initial state; ``gK``, ``gV``,
    ``gQ`` and the gate cotangents are written. ``Mbuf``, ``Sbuf`` ``(seg + 1, >= P)``
    (64-byte aligned rows) hold the replayed states of one segment."""
    t_ = Mbar.dtype.type
    T = K.shape[0]
    L = shapes.shape[0]
    P = offsets[L]
    zoff, hoff = _tape_offsets(shapes, 1)
    boff = in_offsets(shapes, 1)
    nz, nin = KZ.shape[1], boff[L]
    wmax = 0
    for i in range(L):
        wmax = max(wmax, shapes[i, 0], shapes[i, 1])
    ZQ = np.empty((seg, nz), Mbar.dtype)  # z̄ of the reads of the segment
    # pending rank-one cotangents of the next state to visit: 0 a read, 1-2 the HVP
    PL = np.zeros((N_PENDING, nin), Mbar.dtype)
    PR = np.zeros((N_PENDING, nz), Mbar.dtype)
    A = np.empty(nz, Mbar.dtype)  # h_{i-1} ū_i
    B = np.empty(nin, Mbar.dtype)  # δ_i ū_iᵀ
    work = np.empty(nz + 8 * wmax, Mbar.dtype)
    eta_next = t_(1.0)  # η_{t+1}: S̄_t = η_{t+1} S̄_{t+1} + M̄_t
    keep = t_(1.0)  # 1 - α_{t+1}: M̄ waits for the next pass to be multiplied by it
    for k in range((T - 1) // seg, -1, -1):
        s0, s1 = k * seg, min(T, k * seg + seg)
        # 1. replay the segment: Mbuf[j] = M_{s0+j-1}; back-propagate each read meanwhile
        copy(ckM[k][:P], Mbuf[0][:P])
        copy(ckS[k][:P], Sbuf[0][:P])
        for t in range(s0, s1):
            j = t - s0
            if not read_after:
                _read_back(Mbuf[j], shapes, offsets, residual, Q[t], QZ[t], QD1[t], qln[t],
                           gout[t], ZQ[j], gQ[t])
            update(Mbuf[j], Sbuf[j], Mbuf[j + 1], Sbuf[j + 1], shapes, offsets, K[t], KH[t],
                   KD[t], 1, 0, theta[t] * uscale[t], t_(1.0) - alpha[t], eta[t])
            if read_after:
                _read_back(Mbuf[j + 1], shapes, offsets, residual, Q[t], QZ[t], QD1[t], qln[t],
                           gout[t], ZQ[j], gQ[t])
        # 2. reverse
        for t in range(s1 - 1, s0 - 1, -1):
            j = t - s0
            if read_after:  # y_t = M_t(q_t): a cotangent of M_t
                _set_pending(PL, PR, 0, shapes, hoff, boff, Q[t], QH[t], ZQ[j])
            dot_m, dot_s = _pass(Mbar, Sbar, Mbuf[j], Sbuf[j], shapes, offsets, zoff, boff, PL,
                                 PR, keep, eta_next, K[t], KH[t], hoff, A)
            galpha[t] = -dot_m  # Eq. 13
            geta[t] = dot_s  # Eq. 14
            dot_u = t_(0.0)  # ⟨S̄_t, u_t⟩
            for i in range(L):
                d = KD[t][zoff[i]:zoff[i + 1]]
                np.dot(layer(Sbar, shapes, offsets, i), d, B[boff[i]:boff[i + 1]])
                dot_u += np.dot(A[zoff[i]:zoff[i + 1]], d)
            c = uscale[t]
            gtheta[t] = -c * dot_u
            # ū_t = -θ_t c_t S̄_t, minus its component along u_t when the clip is active
            corr = dot_u / unorm2[t] if c < t_(1.0) else t_(0.0)
            _scale_products(A, B, shapes, zoff, hoff, boff, K[t], KH[t], KD[t], corr,
                            -theta[t] * c)
            _hvp_row(Mbuf[j], shapes, offsets, zoff, hoff, boff, act_kind, residual, loss_kind,
                     p, delta, K[t], V[t], KZ[t], KH[t], KD1[t], KD[t], KP[t], kln[t], A, B,
                     PL, PR, gK[t], gV[t], work)
            if read_after:
                _clear(PL[0])
                _clear(PR[0])
            else:  # y_t = M_{t-1}(q_t): a cotangent of M_{t-1}
                _set_pending(PL, PR, 0, shapes, hoff, boff, Q[t], QH[t], ZQ[j])
            eta_next = eta[t]
            keep = t_(1.0) - alpha[t]
    _add_pending(Mbar, shapes, offsets, zoff, boff, PL, PR, keep)
    for idx in range(P):
        Sbar[idx] *= eta_next


@kernel
def _read_back(W, shapes, offsets, residual, q, z, d1, ln, ybar, zbar, qbar):
    r"""Back-propagate ``ybar`` through the read $y = \mathcal{M}(q)$ at ``W`` (taped ``z``,
    σ'(z) ``d1``, ``ln``): $\bar z$ of every layer into ``zbar`` (tape layout), $\bar q$ into
    ``qbar``."""
    L = shapes.shape[0]
    zoff, hoff = _tape_offsets(shapes, 1)
    lo, hi = zoff[L - 1], zoff[L]
    if residual:
        layer_norm_backward_rows(z[lo:hi].reshape((1, hi - lo)), ln.reshape((1, 2)),
                                 ybar.reshape((1, hi - lo)), zbar[lo:hi].reshape((1, hi - lo)))
    else:
        copy(ybar, zbar[lo:hi])
    for i in range(L - 1, 0, -1):
        below = zbar[zoff[i - 1]:zoff[i]]
        np.dot(layer(W, shapes, offsets, i), zbar[zoff[i]:zoff[i + 1]], below)
        d1i = d1[hoff[i - 1]:hoff[i]]
        for a in range(below.shape[0]):
            below[a] *= d1i[a]
    np.dot(layer(W, shapes, offsets, 0), zbar[zoff[0]:zoff[1]], qbar)
    if residual:
        for a in range(qbar.shape[0]):
            qbar[a] += ybar[a]


@kernel
def _set_pending(PL, PR, k, shapes, hoff, boff, x, H, R):
    """Pending term ``k``: for layer i, ``l_i`` = the row entering it (``x``, then the ``H``
    tape) and ``r_i`` = ``R`` (tape layout)."""
    for i in range(shapes.shape[0]):
        copy(x if i == 0 else H[hoff[i - 1]:hoff[i]], PL[k, boff[i]:boff[i + 1]])
    copy(R, PR[k])


@kernel
def _pass(Mbar, Sbar, Mp, Sp, shapes, offsets, zoff, boff, PL, PR, keep, eta_next, x, H, hoff,
          A):
    r"""Eqs. 13-14 backwards on every weight matrix (module doc, step 2).

    One pass per matrix turns the stored $\bar{\mathcal{M}}$ into
    $\bar{\mathcal{M}}_t = (1-\alpha_{t+1})\bar{\mathcal{M}} + \sum_k l_k^\top r_k$ (``keep``
    $= 1-\alpha_{t+1}$) and $\bar S$ into $\bar S_t = \eta_{t+1}\bar S + \bar{\mathcal{M}}_t$.
    Its inner loop touches only these two and runs along the contiguous axis, so it
    vectorises. Then, with the matrices in cache, BLAS gives ``A`` (tape layout)
    $= h_{i-1}\bar S_{t,i}$ for the key rows ``x``, ``H``, and the returned
    $(\langle\bar{\mathcal{M}}_t, \mathcal{M}_{t-1}\rangle, \langle\bar S_t, S_{t-1}\rangle)$.
    """
    t_ = Mbar.dtype.type
    dot_m = t_(0.0)
    dot_s = t_(0.0)
    for i in range(shapes.shape[0]):
        lo, hi, blo, bhi = zoff[i], zoff[i + 1], boff[i], boff[i + 1]
        Mb, Sb = layer(Mbar, shapes, offsets, i), layer(Sbar, shapes, offsets, i)
        r0, r1, r2 = PR[0, lo:hi], PR[1, lo:hi], PR[2, lo:hi]
        l0, l1, l2 = PL[0, blo:bhi], PL[1, blo:bhi], PL[2, blo:bhi]
        for a in range(shapes[i, 0]):
            c0, c1, c2 = l0[a], l1[a], l2[a]
            mrow, srow = Mb[a], Sb[a]
            for j in range(shapes[i, 1]):
                mb = keep * mrow[j] + c0 * r0[j] + c1 * r1[j] + c2 * r2[j]
                mrow[j] = mb
                srow[j] = eta_next * srow[j] + mb
        o0, o1 = offsets[i], offsets[i + 1]
        dot_m += np.dot(Mbar[o0:o1], Mp[o0:o1])
        dot_s += np.dot(Sbar[o0:o1], Sp[o0:o1])
        np.dot(x if i == 0 else H[hoff[i - 1]:hoff[i]], Sb, A[lo:hi])
    return dot_m, dot_s


@kernel
def _add_pending(Mbar, shapes, offsets, zoff, boff, PL, PR, keep):
    """``Mbar = keep Mbar + Σ_k l_kᵀ r_k`` on every layer."""
    for i in range(shapes.shape[0]):
        Mb = layer(Mbar, shapes, offsets, i)
        lo, hi, blo, bhi = zoff[i], zoff[i + 1], boff[i], boff[i + 1]
        r0, r1, r2 = PR[0, lo:hi], PR[1, lo:hi], PR[2, lo:hi]
        l0, l1, l2 = PL[0, blo:bhi], PL[1, blo:bhi], PL[2, blo:bhi]
        for a in range(shapes[i, 0]):
            c0, c1, c2 = l0[a], l1[a], l2[a]
            row = Mb[a]
            for j in range(shapes[i, 1]):
                row[j] = keep * row[j] + c0 * r0[j] + c1 * r1[j] + c2 * r2[j]


@kernel
def _scale_products(A, B, shapes, zoff, hoff, boff, x, H, D, corr, coef):
    r"""$A_i \leftarrow c\,(A_i - \kappa\lVert h_{i-1}\rVert^2\delta_i)$,
    $B_i \leftarrow c\,(B_i - \kappa\lVert\delta_i\rVert^2 h_{i-1})$: the products of
    $\bar u = c\,(\bar S - \kappa u)$ from those of $\bar S$ ($\kappa$ = ``corr``,
    $c$ = ``coef``; $u_i = h_{i-1}^\top\delta_i$)."""
    for i in range(shapes.shape[0]):
        h = x if i == 0 else H[hoff[i - 1]:hoff[i]]
        d = D[zoff[i]:zoff[i + 1]]
        a_i, b_i = A[zoff[i]:zoff[i + 1]], B[boff[i]:boff[i + 1]]
        hh = corr * np.dot(h, h)
        dd = corr * np.dot(d, d)
        for m in range(d.shape[0]):
            a_i[m] = coef * (a_i[m] - hh * d[m])
        for m in range(h.shape[0]):
            b_i[m] = coef * (b_i[m] - dd * h[m])


@kernel
def _hvp_row(W, shapes, offsets, zoff, hoff, boff, act_kind, residual, loss_kind, p, delta,
             k, v, z, H, d1, D, pred, ln, A, B, PL, PR, gk, gv, work):
    r"""The Hessian-vector product of one key at ``W`` (:func:`.mlp_backward.mlp_hvp_rows`
    for one row, same notation): writes $\bar k$ into ``gk``, $\bar v$ into ``gv``, and
    leaves the weight cotangent $\dot h_{i-1}^\top\delta_i + h_{i-1}^\top\bar z_i$ as the
    pending terms 1 (``PL[1]`` = ḣ, ``PR[1]`` = δ) and 2 (``PL[2]`` = h, ``PR[2]`` = z̄)."""
    L = shapes.shape[0]
    d_out = shapes[L - 1, 1]
    nz = zoff[L]
    zd = work[:nz]  # ż
    tmp = work[nz:]
    hd, zbar = PL[1], PR[2]
    # tangent: ż_1 = k ū_1, ḣ_i = σ'(z_i) ż_i, ż_{i+1} = ḣ_i W_{i+1} + h_i ū_{i+1}
    for a in range(boff[1]):
        hd[a] = 0
    for i in range(L):
        lo, hi = zoff[i], zoff[i + 1]
        if i == 0:
            copy(A[lo:hi], zd[lo:hi])
        else:
            np.dot(hd[boff[i]:boff[i + 1]], layer(W, shapes, offsets, i), zd[lo:hi])
            for j in range(lo, hi):
                zd[j] += A[j]
        if i < L - 1:
            for j in range(hi - lo):
                hd[boff[i + 1] + j] = d1[hoff[i] + j] * zd[lo + j]
    lo, hi = zoff[L - 1], nz
    zL, zdL = z[lo:hi].reshape((1, d_out)), zd[lo:hi].reshape((1, d_out))
    zbL = zbar[lo:hi].reshape((1, d_out))
    ln2 = ln.reshape((1, 2))
    od, obar = tmp[:d_out].reshape((1, d_out)), tmp[d_out:2 * d_out].reshape((1, d_out))
    if residual:  # ȯ = J ż_L
        layer_norm_backward_rows(zL, ln2, zdL, od)
    else:
        copy(zd[lo:hi], od[0])
    for j in range(d_out):  # ∂/∂o ⟨∂ℓ/∂o, ȯ⟩ = ℓ''(o) ȯ; ∂/∂v = -ℓ''(o) ȯ, or -ȯ for dot
        obar[0, j] = loss_curv(pred[j], v[j], loss_kind, p, delta) * od[0, j]
        gv[j] = -od[0, j] if loss_kind == 1 else -obar[0, j]
    if residual:
        g = tmp[2 * d_out:3 * d_out].reshape((1, d_out))
        for j in range(d_out):
            g[0, j] = loss_grad(pred[j], v[j], loss_kind, p, delta)
        layer_norm_backward_rows(zL, ln2, obar, zbL)
        layer_norm_curvature_rows(zL, ln2, g, zdL, od, D[lo:hi].reshape((1, d_out)), zbL)
        copy(obar[0], gk)  # o = k + LN(z_L)
    else:
        copy(obar[0], zbL[0])
        for a in range(gk.shape[0]):
            gk[a] = 0
    # reverse: z̄_{i-1} = σ'(z_{i-1}) (δ_i ū_iᵀ + z̄_i W_iᵀ) + σ''(z_{i-1}) ż_{i-1} (δ_i W_iᵀ)
    for i in range(L - 1, 0, -1):
        lo, hi, plo, phi = zoff[i], zoff[i + 1], zoff[i - 1], zoff[i]
        f, o = shapes[i, 0], shapes[i, 1]
        two = tmp[:2 * o].reshape((2, o))
        hh = tmp[2 * o:2 * o + 2 * f].reshape((2, f))
        d2 = tmp[2 * o + 2 * f:2 * o + 3 * f]
        copy(zbar[lo:hi], two[0])
        copy(D[lo:hi], two[1])
        np.dot(two, layer(W, shapes, offsets, i).T, hh)  # z̄_i W_iᵀ and δ_i W_iᵀ
        for a in range(f):
            d2[a] = act_d2(z[plo + a], act_kind)
        zb, zdp = zbar[plo:phi], zd[plo:phi]
        d1p, bp = d1[hoff[i - 1]:hoff[i]], B[boff[i]:boff[i + 1]]
        for a in range(f):
            zb[a] = d1p[a] * (hh[0, a] + bp[a]) + d2[a] * zdp[a] * hh[1, a]
    qb = tmp[:shapes[0, 0]]
    np.dot(layer(W, shapes, offsets, 0), zbar[zoff[0]:zoff[1]], qb)
    for a in range(gk.shape[0]):
        gk[a] += qb[a] + B[boff[0] + a]
    copy(D, PR[1])
    for i in range(L):
        copy(k if i == 0 else H[hoff[i - 1]:hoff[i]], PL[2, boff[i]:boff[i + 1]])


@kernel
def _clear(x):
    for i in range(x.shape[0]):
        x[i] = 0


@kernel
def _output_row(zL, x, residual, ln, y):
    """One row of :func:`.mlp_backward.output_rows`."""
    d = zL.shape[0]
    output_rows(zL.reshape((1, d)), x.reshape((1, x.shape[0])), residual, ln.reshape((1, 2)),
                y.reshape((1, d)))
