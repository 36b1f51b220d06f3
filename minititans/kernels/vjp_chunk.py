r"""The chunked scan (``chunk_size=b``, Titans Eqs. 16-18) with tapes, and its VJP.

Inside a chunk every surprise is taken at the chunk-start state $(\mathcal{M}_0, S_0)$, so
the state after token $r$ of the chunk is (:func:`.scan._chunk_coefficients`)

$$S_r = P_r S_0 - \sum_{l \le r} E_{rl}\,u_l,\qquad
  \mathcal{M}_r = A_r \mathcal{M}_0 + C_r S_0 - \sum_{l\le r} G_{rl}\,u_l ,$$

with $u_l = h_{l}^\top\delta_l$ (per layer) and scalars from the gates. :func:`chunk_forward`
is :func:`.scan.chunk_loop` (reads and the next state by GEMMs) keeping its tapes.

**The VJP in the same form.** Run backwards, Eqs. 13-14 give for every token $r$ of the chunk

$$\bar{\mathcal{M}}_r = \sum_j a_{rj} R_j + a_r \bar{\mathcal{M}}_{in},\qquad
  \bar S_r = \sum_j c_{rj} R_j + c_r \bar{\mathcal{M}}_{in} + c'_r \bar S_{in},$$

($R_j = x_j^\top \bar z_j$ the cotangent of the state read by token $j$, rank one per layer;
$\bar{\mathcal{M}}_{in}, \bar S_{in}$ the cotangent of the chunk-end state; $a, c, c'$
products of the gates, :func:`_backward_coefficients`). So every quantity of the VJP is a
small matrix product:

* $\bar\alpha_r = -\langle\bar{\mathcal{M}}_r, \mathcal{M}_{r-1}\rangle$,
  $\bar\eta_r = \langle\bar S_r, S_{r-1}\rangle$ from the inner products of the two bases,
  $\langle R_j, \mathcal{M}_0\rangle = \langle x_j \mathcal{M}_0, \bar z_j\rangle$,
  $\langle R_j, u_l\rangle = (x_j\cdot h_l)(\bar z_j\cdot\delta_l)$, ...;
* the products of $\bar u_r = -\theta_r c_r \bar S_r$ with the key rows that the
  Hessian-vector product needs (:mod:`.mlp_backward`), e.g.
  $h_r \bar S_r = \sum_j c_{rj}(h_r\cdot x_j)\bar z_j + c_r\,h_r\bar{\mathcal{M}}_{in} + \ldots$;
* the reads: $\bar z\,\mathcal{M}_r^\top = A_r\,\bar z\mathcal{M}_0^\top + C_r\,\bar z S_0^\top
  - \sum_l G_{rl}(\bar z\cdot\delta_l)\,h_l$;
* the cotangent of the chunk start, $\bar{\mathcal{M}}_0 = (1-\alpha_0)\bar{\mathcal{M}}_0' +
  \bar W_{HVP}$, $\bar S_0 = \eta_0 \bar S_0'$: one GEMM per layer each.

The chunk costs a few GEMMs of its $b$ rows against the weights, like the forward.
Chunk-start states are recomputed from a checkpoint every ``seg`` tokens (one GEMM per chunk).
"""

from __future__ import annotations

import math

import numpy as np

from ._jit import kernel
from .mlp import (
    _tape_offsets,
    layer,
    layer_norm_backward_rows,
    loss_grad_rows,
    tape_view,
)
from .mlp_backward import (
    add_rows,
    copy_rows,
    in_offsets,
    mlp_deltas,
    mlp_hvp_rows,
    mul_rows,
    output_rows,
)
from .replay import all_finite, copy, surprise_norm2
from .scan import _chunk_coefficients, _hidden


@kernel
def _rows_forward(W, shapes, offsets, act_kind, X, Z, H, HD1):
    """``n`` rows through the memory at ``W``, keeping the tapes ``Z``, ``H``, ``HD1`` (σ')."""
    n = X.shape[0]
    L = shapes.shape[0]
    zoff, hoff = _tape_offsets(shapes, n)
    for i in range(L):
        o = shapes[i, 1]
        xin = X if i == 0 else tape_view(H, hoff[i - 1], n, shapes[i - 1, 1])
        np.dot(xin, layer(W, shapes, offsets, i), tape_view(Z, zoff[i], n, o))
        if i < L - 1:
            _hidden(Z[zoff[i]:zoff[i] + n * o], H[hoff[i]:hoff[i] + n * o],
                    HD1[hoff[i]:hoff[i] + n * o], act_kind, True)


@kernel
def _chunk_reads(M0, S0, shapes, offsets, act_kind, Xq, Xk, Hk, Dk, QZ, QH, QD1, coef, Gr):
    r"""Every query of the chunk through the state it reads, layer by layer (GEMMs):
    $x_r\mathcal{M}_{\rho(r)} = a_r x_r\mathcal{M}_0 + b_r x_r S_0 - [(G^r\odot x X^\top)\Delta]_r$
    with ``coef[:, 3:5]`` $= (a, b)$ and ``Gr``; tapes ``QZ``, ``QH``, ``QD1``."""
    n = Xq.shape[0]
    L = shapes.shape[0]
    zoff, hoff = _tape_offsets(shapes, n)
    for i in range(L):
        f, o = shapes[i, 0], shapes[i, 1]
        xq = Xq if i == 0 else tape_view(QH, hoff[i - 1], n, f)
        xk = Xk if i == 0 else tape_view(Hk, hoff[i - 1], n, f)
        zq = tape_view(QZ, zoff[i], n, o)
        np.dot(xq, layer(M0, shapes, offsets, i), zq)
        zs = np.dot(xq, layer(S0, shapes, offsets, i))
        pm = np.dot(xq, xk.T)  # (n, n): x_r · X_l
        for r in range(n):
            for l_ in range(n):
                pm[r, l_] *= Gr[r, l_]
        zg = np.dot(pm, tape_view(Dk, zoff[i], n, o))
        for r in range(n):
            for j in range(o):
                zq[r, j] = coef[r, 3] * zq[r, j] + coef[r, 4] * zs[r, j] - zg[r, j]
        if i < L - 1:
            _hidden(QZ[zoff[i]:zoff[i] + n * o], QH[hoff[i]:hoff[i] + n * o],
                    QD1[hoff[i]:hoff[i] + n * o], act_kind, True)


@kernel
def _chunk_end(M0, S0, M1, S1, shapes, offsets, Xk, Hk, Dk, coef, E, G, n):
    r"""The state after the chunk:
    $\mathcal{M}_n = A\mathcal{M}_0 + C S_0 - X^\top\mathrm{diag}(G_{n\cdot})\Delta$,
    $S_n = P S_0 - X^\top\mathrm{diag}(E_{n\cdot})\Delta$ (per layer), into ``M1``, ``S1``."""
    zoff, hoff = _tape_offsets(shapes, n)
    P, A, C = coef[n - 1, 0], coef[n - 1, 1], coef[n - 1, 2]
    for i in range(shapes.shape[0]):
        f = shapes[i, 0]
        xk = Xk if i == 0 else tape_view(Hk, hoff[i - 1], n, f)
        di = tape_view(Dk, zoff[i], n, shapes[i, 1])
        xg = np.empty((n, f), M0.dtype)
        xe = np.empty((n, f), M0.dtype)
        for r in range(n):
            for a in range(f):
                xg[r, a] = G[n - 1, r] * xk[r, a]
                xe[r, a] = E[n - 1, r] * xk[r, a]
        ug = np.dot(xg.T, di)
        ue = np.dot(xe.T, di)
        W0, U0 = layer(M0, shapes, offsets, i), layer(S0, shapes, offsets, i)
        W1, U1 = layer(M1, shapes, offsets, i), layer(S1, shapes, offsets, i)
        for a in range(f):
            for j in range(shapes[i, 1]):
                W1[a, j] = A * W0[a, j] + C * U0[a, j] - ug[a, j]
                U1[a, j] = P * U0[a, j] - ue[a, j]


@kernel
def _coefficients(alpha, eta, theta, uscale, t0, n, read_after, E, G, Gr, coef):
    for r in range(E.shape[0]):
        for l_ in range(E.shape[1]):
            E[r, l_] = 0
            G[r, l_] = 0
            Gr[r, l_] = 0
    _chunk_coefficients(alpha, eta, theta, uscale[t0:t0 + n], t0, n, read_after, E, G, Gr, coef)


@kernel
def chunk_forward(M, S, shapes, offsets, act_kind, residual, loss_kind, p, delta, K, V, Q,
                  alpha, eta, theta, clip, read_after, b, seg, stop_on_bad, out, ckM, ckS, KZ,
                  KH, KD1, KD, KDH, KP, kln, QZ, QH, QD1, qln, unorm2, uscale, M1, S1):
    """The chunked scan in place on ``M``, ``S``; writes ``out`` and keeps per chunk c the
    tapes (n-row layout) of its keys ``KZ[c]``, ``KH[c]``, ``KD1[c]``, ``KD[c]``, ``KDH[c]``
    (and ``KP``, ``kln`` per token) and of its queries ``QZ[c]``, ``QH[c]``, ``QD1[c]``
    (``qln``), ``unorm2``/``uscale`` per token, and ``(M, S)`` every ``seg`` tokens.
    ``M1``, ``S1`` (like ``M``) hold every other chunk-end state.

    Returns the first segment at whose end the weights are not finite, or -1.
    """
    t_ = M.dtype.type
    T = K.shape[0]
    L = shapes.shape[0]
    d_out = shapes[L - 1, 1]
    E, G, Gr = np.zeros((b, b), M.dtype), np.zeros((b, b), M.dtype), np.zeros((b, b), M.dtype)
    coef = np.zeros((b, 5), M.dtype)
    Gl = np.empty((b, d_out), M.dtype)
    M_in, S_in = M, S
    bad_segment = -1
    for t0 in range(0, T, b):
        c = t0 // b
        n = min(b, T - t0)
        if t0 % seg == 0:
            if t0 > 0 and bad_segment < 0 and not all_finite(M):
                bad_segment = t0 // seg - 1
                if stop_on_bad:
                    return bad_segment
            copy(M, ckM[t0 // seg])
            copy(S, ckS[t0 // seg])
        zoff, hoff = _tape_offsets(shapes, n)
        Kc, Qc = K[t0:t0 + n], Q[t0:t0 + n]
        # Eq. 8 for every key of the chunk at M_0
        _rows_forward(M, shapes, offsets, act_kind, Kc, KZ[c], KH[c], KD1[c])
        output_rows(tape_view(KZ[c], zoff[L - 1], n, d_out), Kc, residual, kln[t0:t0 + n],
                     KP[t0:t0 + n])
        loss_grad_rows(KP[t0:t0 + n], V[t0:t0 + n], loss_kind, p, delta, Gl[:n])
        mlp_deltas(M, shapes, offsets, residual, KZ[c], kln[t0:t0 + n], KD1[c], Gl[:n], KD[c],
                   KDH[c])
        for r in range(n):
            uscale[t0 + r] = t_(1.0)
            if clip > 0:
                unorm2[t0 + r] = surprise_norm2(shapes, Kc[r], KH[c], KD[c], n, r)
                uscale[t0 + r] = min(t_(1.0), clip / max(math.sqrt(unorm2[t0 + r]), t_(1e-30)))
        _coefficients(alpha, eta, theta, uscale, t0, n, read_after, E, G, Gr, coef)
        # Eqs. 16-18: every read and the next state by GEMMs
        _chunk_reads(M, S, shapes, offsets, act_kind, Qc, Kc, KH[c], KD[c], QZ[c], QH[c],
                     QD1[c], coef, Gr)
        output_rows(tape_view(QZ[c], zoff[L - 1], n, d_out), Qc, residual, qln[t0:t0 + n],
                     out[t0:t0 + n])
        _chunk_end(M, S, M1, S1, shapes, offsets, Kc, KH[c], KD[c], coef, E, G, n)
        M, M1 = M1, M
        S, S1 = S1, S
    if bad_segment < 0 and not all_finite(M):
        bad_segment = (T - 1) // seg
    if M is not M_in:
        copy(M, M_in)
        copy(S, S_in)
    return bad_segment


@kernel
def _backward_coefficients(alpha, eta, t0, n, read_after, aR, aM, cR, cM, cS):
    r"""The gate products of the cotangents inside a chunk (module doc), for r = n-1..0:
    $a_{rj} = (1-\alpha_{r+1})a_{r+1,j} + [\rho(j) = r]$, $c_{rj} = \eta_{r+1}c_{r+1,j} + a_{rj}$,
    the same recurrences for the $\bar{\mathcal{M}}_{in}$ and $\bar S_{in}$ columns; $\rho(j)$ is
    the state read by token j ($j$, or $j - 1$ with ``read_after`` False)."""
    t_ = aR.dtype.type
    for r in range(n - 1, -1, -1):
        keep = t_(1.0) if r == n - 1 else t_(1.0) - alpha[t0 + r + 1]
        e = t_(1.0) if r == n - 1 else eta[t0 + r + 1]
        for j in range(n):
            prev_a = t_(0.0) if r == n - 1 else aR[r + 1, j]
            prev_c = t_(0.0) if r == n - 1 else cR[r + 1, j]
            rho = j if read_after else j - 1
            aR[r, j] = keep * prev_a + (t_(1.0) if rho == r else t_(0.0))
            cR[r, j] = e * prev_c + aR[r, j]
        aM[r] = t_(1.0) if r == n - 1 else keep * aM[r + 1]
        cM[r] = aM[r] if r == n - 1 else e * cM[r + 1] + aM[r]
        cS[r] = t_(1.0) if r == n - 1 else e * cS[r + 1]


@kernel
def _rowdot(X, Y, out):
    """``out[r] += X[r] · Y[r]``."""
    for r in range(X.shape[0]):
        out[r] += np.dot(X[r], Y[r])


@kernel
def chunk_vjp(M0, S0, Mbar, Sbar, shapes, offsets, act_kind, residual, loss_kind, p, delta,
              Kc, Vc, KZ, KH, KD1, KD, KDH, KP, kln, Qc, QZ, QH, QD1, qln, gout, alpha, eta,
              theta, uscale, unorm2, t0, read_after, E, G, Gr, coef, gK, gV, gQ, galpha, geta,
              gtheta):
    """The VJP of one chunk (module doc) from its start state ``(M0, S0)``: ``Mbar``, ``Sbar``
    enter as the cotangents of the chunk-end state and leave as those of its start; the
    rows of ``gK``, ``gV``, ``gQ`` and the gate cotangents of the chunk are written."""
    t_ = M0.dtype.type
    n = Kc.shape[0]
    L = shapes.shape[0]
    d_out = shapes[L - 1, 1]
    zoff, hoff = _tape_offsets(shapes, n)
    boff = in_offsets(shapes, n)
    E, G, Gr = np.ascontiguousarray(E[:n, :n]), np.ascontiguousarray(G[:n, :n]), \
        np.ascontiguousarray(Gr[:n, :n])
    ZB = np.empty(zoff[L], M0.dtype)  # z̄ of the reads (tape layout)
    RM, RS = np.zeros(n, M0.dtype), np.zeros(n, M0.dtype)  # ⟨R_j, M_0⟩, ⟨R_j, S_0⟩
    RU = np.zeros((n, n), M0.dtype)  # ⟨R_j, u_l⟩
    GX = np.empty((L, n, n), M0.dtype)  # x_j · h_l per layer
    GZ = np.empty((L, n, n), M0.dtype)  # z̄_j · δ_l per layer
    # 1. the reads, layer by layer from the top: z̄ M_ρ(j)ᵀ by GEMMs against M_0, S_0
    zbL = tape_view(ZB, zoff[L - 1], n, d_out)
    if residual:
        layer_norm_backward_rows(tape_view(QZ, zoff[L - 1], n, d_out), qln, gout, zbL)
    else:
        copy_rows(gout, zbL)
    for i in range(L - 1, -1, -1):
        f, o = shapes[i, 0], shapes[i, 1]
        zb = tape_view(ZB, zoff[i], n, o)
        xq = Qc if i == 0 else tape_view(QH, hoff[i - 1], n, f)
        xk = Kc if i == 0 else tape_view(KH, hoff[i - 1], n, f)
        di = tape_view(KD, zoff[i], n, o)
        T1 = np.dot(zb, layer(M0, shapes, offsets, i).T)  # (n, f)
        T2 = np.dot(zb, layer(S0, shapes, offsets, i).T)
        _rowdot(xq, T1, RM)
        _rowdot(xq, T2, RS)
        gz, gx = GZ[i], GX[i]
        np.dot(zb, di.T, gz)
        np.dot(xq, xk.T, gx)
        gr = np.empty((n, n), M0.dtype)
        for j in range(n):
            for l_ in range(n):
                RU[j, l_] += gx[j, l_] * gz[j, l_]
                gr[j, l_] = Gr[j, l_] * gz[j, l_]
        hb = np.dot(gr, xk)
        for r in range(n):
            for a in range(f):
                hb[r, a] = coef[r, 3] * T1[r, a] + coef[r, 4] * T2[r, a] - hb[r, a]
        if i > 0:
            below = tape_view(ZB, zoff[i - 1], n, f)
            copy_rows(hb, below)
            mul_rows(tape_view(QD1, hoff[i - 1], n, f), below)
        else:
            copy_rows(hb, gQ)
            if residual:
                add_rows(gout, gQ)
    # 2. products with the cotangents of the chunk end
    P = Mbar.shape[0]
    mM, mS, sS = np.dot(Mbar, M0[:P]), np.dot(Mbar, S0[:P]), np.dot(Sbar, S0[:P])
    mU, sU = np.zeros(n, M0.dtype), np.zeros(n, M0.dtype)
    XM, XS = np.empty(zoff[L], M0.dtype), np.empty(zoff[L], M0.dtype)  # h_l M̄ᵢₙ, h_l S̄ᵢₙ
    DM, DS = np.empty(boff[L], M0.dtype), np.empty(boff[L], M0.dtype)  # δ_l M̄ᵢₙᵀ, δ_l S̄ᵢₙᵀ
    for i in range(L):
        f, o = shapes[i, 0], shapes[i, 1]
        xk = Kc if i == 0 else tape_view(KH, hoff[i - 1], n, f)
        di = tape_view(KD, zoff[i], n, o)
        xm, xs = tape_view(XM, zoff[i], n, o), tape_view(XS, zoff[i], n, o)
        np.dot(xk, layer(Mbar, shapes, offsets, i), xm)
        np.dot(xk, layer(Sbar, shapes, offsets, i), xs)
        np.dot(di, layer(Mbar, shapes, offsets, i).T, tape_view(DM, boff[i], n, f))
        np.dot(di, layer(Sbar, shapes, offsets, i).T, tape_view(DS, boff[i], n, f))
        _rowdot(xm, di, mU)
        _rowdot(xs, di, sU)
    # 3. gate products of the cotangents, then the gates (Eqs. 13-14 backwards)
    aR, cR = np.empty((n, n), M0.dtype), np.empty((n, n), M0.dtype)
    aM, cM, cS = np.empty(n, M0.dtype), np.empty(n, M0.dtype), np.empty(n, M0.dtype)
    _backward_coefficients(alpha, eta, t0, n, read_after, aR, aM, cR, cM, cS)
    RUG = np.dot(RU, G.T)  # (j, r') = ⟨R_j, Σ_l G_{r'l} u_l⟩
    RUE = np.dot(RU, E.T)
    mUG, mUE = np.dot(G, mU), np.dot(E, mU)
    sUE = np.dot(E, sU)
    for r in range(n):
        if r == 0:
            Pp, Ap, Cp = t_(1.0), t_(1.0), t_(0.0)
        else:
            Pp, Ap, Cp = coef[r - 1, 0], coef[r - 1, 1], coef[r - 1, 2]
        dm = aM[r] * (Ap * mM + Cp * mS - (mUG[r - 1] if r > 0 else t_(0.0)))
        ds = (cM[r] * (Pp * mS - (mUE[r - 1] if r > 0 else t_(0.0)))
              + cS[r] * (Pp * sS - (sUE[r - 1] if r > 0 else t_(0.0))))
        for j in range(n):
            dm += aR[r, j] * (Ap * RM[j] + Cp * RS[j] - (RUG[j, r - 1] if r > 0 else t_(0.0)))
            ds += cR[r, j] * (Pp * RS[j] - (RUE[j, r - 1] if r > 0 else t_(0.0)))
        galpha[r] = -dm  # ᾱ_r = -⟨M̄_r, M_{r-1}⟩
        geta[r] = ds  # η̄_r = ⟨S̄_r, S_{r-1}⟩
    # 4. products of ū_r = -θ_r c_r S̄_r with the key rows (the HVP's inputs)
    A = np.empty(zoff[L], M0.dtype)
    B = np.empty(boff[L], M0.dtype)
    dot_u = np.zeros(n, M0.dtype)
    for i in range(L):
        f, o = shapes[i, 0], shapes[i, 1]
        xq = Qc if i == 0 else tape_view(QH, hoff[i - 1], n, f)
        xk = Kc if i == 0 else tape_view(KH, hoff[i - 1], n, f)
        di = tape_view(KD, zoff[i], n, o)
        zb = tape_view(ZB, zoff[i], n, o)
        a_i = tape_view(A, zoff[i], n, o)
        b_i = tape_view(B, boff[i], n, f)
        hx, dz = np.empty((n, n), M0.dtype), np.empty((n, n), M0.dtype)
        for r in range(n):
            for j in range(n):
                hx[r, j] = cR[r, j] * GX[i, j, r]
                dz[r, j] = cR[r, j] * GZ[i, j, r]
        np.dot(hx, zb, a_i)  # Σ_j c_rj (h_r·x_j) z̄_j
        np.dot(dz, xq, b_i)  # Σ_j c_rj (δ_r·z̄_j) x_j
        xm, xs = tape_view(XM, zoff[i], n, o), tape_view(XS, zoff[i], n, o)
        dmi, dsi = tape_view(DM, boff[i], n, f), tape_view(DS, boff[i], n, f)
        for r in range(n):
            for j in range(o):
                a_i[r, j] += cM[r] * xm[r, j] + cS[r] * xs[r, j]
            for a in range(f):
                b_i[r, a] += cM[r] * dmi[r, a] + cS[r] * dsi[r, a]
        _rowdot(a_i, di, dot_u)
    for r in range(n):
        c = uscale[t0 + r]
        gtheta[r] = -c * dot_u[r]
        corr = dot_u[r] / unorm2[t0 + r] if c < t_(1.0) else t_(0.0)
        coef_r = -theta[t0 + r] * c
        for i in range(L):
            f, o = shapes[i, 0], shapes[i, 1]
            h = Kc[r] if i == 0 else tape_view(KH, hoff[i - 1], n, f)[r]
            d = tape_view(KD, zoff[i], n, o)[r]
            a_r = tape_view(A, zoff[i], n, o)[r]
            b_r = tape_view(B, boff[i], n, f)[r]
            hh = corr * np.dot(h, h)
            dd = corr * np.dot(d, d)
            for j in range(o):
                a_r[j] = coef_r * (a_r[j] - hh * d[j])
            for a in range(f):
                b_r[a] = coef_r * (b_r[a] - dd * h[a])
    # 5. cotangents of the chunk start: S̄_0 = η_0 S̄_0', M̄_0 = (1-α_0) M̄_0' + W̄_HVP
    keep0, eta0 = t_(1.0) - alpha[t0], eta[t0]
    aR0 = np.empty(n, M0.dtype)
    for j in range(n):
        aR0[j] = keep0 * aR[0, j] + (t_(1.0) if (not read_after and j == 0) else t_(0.0))
    for i in range(L):
        f, o = shapes[i, 0], shapes[i, 1]
        xq = Qc if i == 0 else tape_view(QH, hoff[i - 1], n, f)
        zb = tape_view(ZB, zoff[i], n, o)
        xc = np.empty((n, f), M0.dtype)
        xa = np.empty((n, f), M0.dtype)
        for r in range(n):
            for a in range(f):
                xc[r, a] = cR[0, r] * xq[r, a]
                xa[r, a] = aR0[r] * xq[r, a]
        rs = np.dot(xc.T, zb)  # Σ_j c_0j R_j
        rm = np.dot(xa.T, zb)  # Σ_j a'_0j R_j
        Mb, Sb = layer(Mbar, shapes, offsets, i), layer(Sbar, shapes, offsets, i)
        for a in range(f):
            for j in range(o):
                m_in = Mb[a, j]
                Sb[a, j] = eta0 * (rs[a, j] + cM[0] * m_in + cS[0] * Sb[a, j])
                Mb[a, j] = rm[a, j] + keep0 * aM[0] * m_in
    # 6. the surprises through the Hessian-vector products at M_0 (adds W̄ to Mbar)
    mlp_hvp_rows(M0, shapes, offsets, act_kind, residual, loss_kind, p, delta, Kc, Vc, KZ, KH,
                 KD, KDH, KD1, kln, KP, A, B, Mbar, gK, gV)


def chunk_backward(shapes, offsets, act_kind, residual, loss_kind, p, delta, K, V, Q, alpha,
                   eta, theta, read_after, b, seg, ckM, ckS, KZ, KH, KD1, KD, KDH, KP, kln, QZ,
                   QH, QD1, qln, unorm2, uscale, gout, Mbar, Sbar, gK, gV, gQ, galpha, geta,
                   gtheta, Mbuf, Sbuf):
    """The VJP of :func:`chunk_forward`: ``Mbar``, ``Sbar`` enter as the cotangents of the
    final state and leave as those of the initial state. ``Mbuf``, ``Sbuf``
    ``(seg // b + 1, >= P)`` hold the recomputed chunk-start states of one segment.

    A plain Python loop over chunks (each chunk is a few GEMMs, so the loop costs nothing
    noticeable, and the kernels it calls are compiled once rather than again inside it).
    """
    T = K.shape[0]
    P = offsets[-1]
    dt = Mbar.dtype
    E, G, Gr, coef = np.zeros((b, b), dt), np.zeros((b, b), dt), np.zeros((b, b), dt), \
        np.zeros((b, 5), dt)
    for k in range((T - 1) // seg, -1, -1):
        s0, s1 = k * seg, min(T, k * seg + seg)
        Mbuf[0, :P] = ckM[k, :P]
        Sbuf[0, :P] = ckS[k, :P]
        for t0 in range(s0, s1 - b, b):  # chunk-start states of the segment
            m, n = (t0 - s0) // b, min(b, T - t0)
            _coefficients(alpha, eta, theta, uscale, t0, n, read_after, E, G, Gr, coef)
            _chunk_end(Mbuf[m], Sbuf[m], Mbuf[m + 1], Sbuf[m + 1], shapes, offsets,
                       K[t0:t0 + n], KH[t0 // b], KD[t0 // b], coef, E, G, n)
        for t0 in range(s1 - 1 - (s1 - 1 - s0) % b, s0 - 1, -b):
            m, c, n = (t0 - s0) // b, t0 // b, min(b, T - t0)
            r = slice(t0, t0 + n)
            _coefficients(alpha, eta, theta, uscale, t0, n, read_after, E, G, Gr, coef)
            chunk_vjp(Mbuf[m], Sbuf[m], Mbar, Sbar, shapes, offsets, act_kind, residual,
                      loss_kind, p, delta, K[r], V[r], KZ[c], KH[c], KD1[c], KD[c], KDH[c],
                      KP[r], kln[r], Q[r], QZ[c], QH[c], QD1[c], qln[r], gout[r], alpha, eta,
                      theta, uscale, unorm2, t0, read_after, E, G, Gr, coef, gK[r], gV[r],
                      gQ[r], galpha[r], geta[r], gtheta[r])
