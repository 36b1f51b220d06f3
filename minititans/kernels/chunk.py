r"""The chunked scan (``chunk_size=b``, Eqs. 16–18) with an optional tape, and its VJP.

The twin of ``_chunked`` in :mod:`minititans.memory.scan`. Inside a chunk every surprise is
taken at the chunk-start state $(\mathcal{M}_0, S_0)$, so the state after token $r$ of the
chunk is (:func:`chunk_coefficients`)

$$S_r = P_r S_0 - \sum_{l \le r} E_{rl}\,u_l,\qquad
  \mathcal{M}_r = A_r \mathcal{M}_0 + C_r S_0 - \sum_{l\le r} G_{rl}\,u_l ,$$

with $u_l = h_{l}^\top\delta_l$ (per layer) and scalars from the gates. Reading
$\mathcal{M}_r$ with the row $x_r$ that enters a layer never materialises $\mathcal{M}_r$:
$x_r \mathcal{M}_r = A_r x_r \mathcal{M}_0 + C_r x_r S_0 - \sum_l G_{rl}(x_r h_l^\top)\delta_l$,
three GEMMs per layer (:func:`chunk_reads`); the chunk-end state is two more
(:func:`chunk_end`). The chunk costs a few GEMMs instead of $b$ passes over the weights.
With an anchor $\bar{\mathcal{M}}$ (Eq. 13 for $\mathcal{M} - \bar{\mathcal{M}}$), $\mathcal{M}_r$
gains $(1 - A_r)\bar{\mathcal{M}}$: one more GEMM per layer for the reads, and in the VJP
$\mathcal{M}_0 - \bar{\mathcal{M}}$ takes the place of $\mathcal{M}_0$ in $\bar\alpha$, and the
anchor's cotangent is $(1 - A_n)\bar{\mathcal{M}}_{in} + \sum_j (1 - a_j) R_j$.

**The VJP in the same form.** Run backwards, Eqs. 13–14 give for every token $r$ of the chunk

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
  Hessian-vector product needs (:mod:`.hvp`), e.g.
  $h_r \bar S_r = \sum_j c_{rj}(h_r\cdot x_j)\bar z_j + c_r\,h_r\bar{\mathcal{M}}_{in} + \ldots$;
* the reads: $\bar z\,\mathcal{M}_r^\top = A_r\,\bar z\mathcal{M}_0^\top + C_r\,\bar z S_0^\top
  - \sum_l G_{rl}(\bar z\cdot\delta_l)\,h_l$;
* the cotangent of the chunk start, $\bar{\mathcal{M}}_0 = (1-\alpha_0)\bar{\mathcal{M}}_0' +
  \bar W_{HVP}$, $\bar S_0 = \eta_0 \bar S_0'$: one GEMM per layer each.

Chunk-start states are recomputed from a checkpoint every ``seg`` tokens (one GEMM per chunk).
"""

from __future__ import annotations

import numpy as np

from ._jit import kernel
from .hvp import add_weight_cotangent, hvp_rows, hvp_work_size, scale_products
from .layout import (
    Coefficients,
    add_rows,
    add_scaled,
    copy,
    copy_rows,
    key_rows,
    layer,
    new_coefficients,
    query_rows,
    tape_view,
)
from .rows import (
    clip_scales,
    exceeds,
    first_bad_token,
    layer_norm_backward_rows,
    matmul,
    memory_forward_rows,
    output_rows,
    surprise_rows,
)
from .scalars import hidden


@kernel
def chunk_work_size(shapes, b):
    """Elements of the ``work`` array of :func:`chunk_reads` and :func:`chunk_end`."""
    f, o = 0, 0
    for i in range(shapes.shape[0]):
        f, o = max(f, shapes[i, 0]), max(o, shapes[i, 1])
    return max(b * (2 * o + b), 2 * f * (b + o))


@kernel
def chunk_coefficients(seq, cl, t0, n, read_after, co):
    r"""The gate products that write every state of a chunk in terms of its start (Eqs. 16, 18).

    With $\theta'_l = \theta_l c_l$ (clip scale $c_l$ = ``cl[l]``) and the surprises $u_l$ all
    taken at $\mathcal{M}_0$:

    $$S_i = P_i S_0 - \sum_{l \le i} E_{il} u_l,\qquad
      \mathcal{M}_i = A_i \mathcal{M}_0 + C_i S_0 - \sum_{l\le i} G_{il} u_l$$

    by the recurrences $P_i = \eta_i P_{i-1}$, $E_{il} = \eta_i E_{i-1,l}$ ($E_{ll} = \theta'_l$),
    $A_i = (1-\alpha_i) A_{i-1}$, $C_i = (1-\alpha_i) C_{i-1} + P_i$,
    $G_{il} = (1-\alpha_i) G_{i-1,l} + E_{il}$ — products only, no division by $\beta_i$.
    ``co.coef[:, 0:3] = (P, A, C)`` of row i; ``co.coef[:, 3:5]`` and ``co.Gr`` are the
    coefficients of the state each token reads: $\mathcal{M}_i$ (after) or $\mathcal{M}_{i-1}$.
    """
    E, G, Gr, coef = co.E, co.G, co.Gr, co.coef
    t_ = E.dtype.type
    P = t_(1.0)
    A = t_(1.0)
    C = t_(0.0)
    for r in range(n):
        e = seq.eta[t0 + r]
        decay = t_(1.0) - seq.alpha[t0 + r, 0]  # one α per token (checked)
        for l_ in range(r):
            E[r, l_] = e * E[r - 1, l_]
            G[r, l_] = decay * G[r - 1, l_] + E[r, l_]
        E[r, r] = seq.theta[t0 + r, 0] * cl[r]  # one θ per token (checked)
        G[r, r] = E[r, r]
        for l_ in range(r + 1, n):
            E[r, l_] = t_(0.0)
            G[r, l_] = t_(0.0)
        if read_after:
            coef[r, 3] = decay * A
            coef[r, 4] = decay * C + e * P
            for l_ in range(n):
                Gr[r, l_] = G[r, l_]
        else:
            coef[r, 3] = A
            coef[r, 4] = C
            for l_ in range(n):
                Gr[r, l_] = G[r - 1, l_] if (r > 0 and l_ < r) else t_(0.0)
        P = e * P
        A = decay * A
        C = decay * C + P
        coef[r, 0] = P
        coef[r, 1] = A
        coef[r, 2] = C


@kernel
def chunk_reads(M0, S0, anchor, spec, q, key, co, work, want_d1):
    r"""Every query of the chunk through the state it reads, layer by layer (GEMMs):
    $x_r\mathcal{M}_{\rho(r)} = a_r x_r\mathcal{M}_0 + b_r x_r S_0 - [(G^r\odot x X^\top)\Delta]_r$
    with ``co.coef[:, 3:5]`` $= (a, b)$ and ``co.Gr``, into the tapes of ``q``
    (:class:`.layout.QueryRows`); ``work`` of :func:`chunk_work_size`."""
    n = q.X.shape[0]
    shapes = spec.shapes
    L = shapes.shape[0]
    for i in range(L):
        f, o = shapes[i, 0], shapes[i, 1]
        xq = q.X if i == 0 else tape_view(q.H, n * spec.hoff[i - 1], n, f)
        xk = key.X if i == 0 else tape_view(key.H, n * spec.hoff[i - 1], n, f)
        zq = tape_view(q.Z, n * spec.zoff[i], n, o)
        zs, pm = tape_view(work, 0, n, o), tape_view(work, n * o, n, n)
        zg = tape_view(work, n * (o + n), n, o)
        matmul(xq, layer(M0, shapes, spec.offsets, i), zq)
        matmul(xq, layer(S0, shapes, spec.offsets, i), zs)
        np.dot(xq, xk.T, pm)  # (n, n): x_r · X_l
        for r in range(n):
            for l_ in range(n):
                pm[r, l_] *= co.Gr[r, l_]
        np.dot(pm, tape_view(key.D, n * spec.zoff[i], n, o), zg)
        for r in range(n):
            for j in range(o):
                zq[r, j] = co.coef[r, 3] * zq[r, j] + co.coef[r, 4] * zs[r, j] - zg[r, j]
        if anchor.shape[0] > 0:  # + (1 - a_r) x_r M̄
            matmul(xq, layer(anchor, shapes, spec.offsets, i), zs)
            for r in range(n):
                for j in range(o):
                    zq[r, j] += (M0.dtype.type(1.0) - co.coef[r, 3]) * zs[r, j]
        if i < L - 1:
            z0, h0 = n * spec.zoff[i], n * spec.hoff[i]
            hidden(q.Z[z0:z0 + n * o], q.H[h0:h0 + n * o], q.HD1[h0:h0 + n * o], spec.act_kind,
                   want_d1)


@kernel
def chunk_end(M0, S0, M1, S1, anchor, spec, key, co, work):
    r"""The state after the chunk of the rows ``key``:
    $\mathcal{M}_n = A\mathcal{M}_0 + C S_0 - X^\top\mathrm{diag}(G_{n\cdot})\Delta$,
    $S_n = P S_0 - X^\top\mathrm{diag}(E_{n\cdot})\Delta$ (per layer), into ``M1``, ``S1``."""
    n = key.X.shape[0]
    shapes, offsets = spec.shapes, spec.offsets
    E, G, coef = co.E, co.G, co.coef
    P, A, C = coef[n - 1, 0], coef[n - 1, 1], coef[n - 1, 2]
    for i in range(shapes.shape[0]):
        f, o = shapes[i, 0], shapes[i, 1]
        xk = key.X if i == 0 else tape_view(key.H, n * spec.hoff[i - 1], n, f)
        di = tape_view(key.D, n * spec.zoff[i], n, o)
        xg, xe = tape_view(work, 0, n, f), tape_view(work, n * f, n, f)
        ug, ue = tape_view(work, 2 * n * f, f, o), tape_view(work, 2 * n * f + f * o, f, o)
        for r in range(n):
            for a in range(f):
                xg[r, a] = G[n - 1, r] * xk[r, a]
                xe[r, a] = E[n - 1, r] * xk[r, a]
        np.dot(xg.T, di, ug)
        np.dot(xe.T, di, ue)
        W0, U0 = layer(M0, shapes, offsets, i), layer(S0, shapes, offsets, i)
        W1, U1 = layer(M1, shapes, offsets, i), layer(S1, shapes, offsets, i)
        for a in range(f):
            for j in range(o):
                W1[a, j] = A * W0[a, j] + C * U0[a, j] - ug[a, j]
                U1[a, j] = P * U0[a, j] - ue[a, j]
    if anchor.shape[0] > 0:  # + (1 - A) M̄
        add_scaled(anchor[:offsets[-1]], M0.dtype.type(1.0) - A, M1[:offsets[-1]])


@kernel
def chunk_scan(M, S, M1, S1, spec, seq, tape, b, seg, stop, out):
    r"""Eqs. 16–18: chunks of ``b`` tokens whose surprises share the chunk-start weights, in
    place on ``M``, ``S`` (flat ``(P,)``); writes ``out`` ``(T, d_out)``.

    ``M1``, ``S1`` (like ``M``) hold every other chunk-end state. ``tape``
    (:func:`.layout.new_tape` with this ``b``): a full one is filled for the VJP (a slot per
    chunk, the state every ``seg`` tokens), a workspace one is only used. ``stop``: return at
    the first token whose weights are not finite.

    Returns:
        The first token whose weights diverged (NaN, inf or above ``spec.bound``), or -1.
    """
    T = seq.K.shape[0]
    shapes = spec.shapes
    L = shapes.shape[0]
    d_out = shapes[L - 1, 1]
    P = spec.offsets[L]
    co = Coefficients(np.zeros((b, b), M.dtype), np.zeros((b, b), M.dtype),
                      np.zeros((b, b), M.dtype), np.zeros((b, 5), M.dtype))
    work = np.empty(chunk_work_size(shapes, b), M.dtype)
    keep = tape.ckM.shape[0] > 0
    M_in, S_in = M, S
    first_bad = -1
    for t0 in range(0, T, b):
        n = min(b, T - t0)
        c, r0 = (t0 // b, t0) if keep else (0, 0)
        if keep and t0 % seg == 0:
            copy(M, tape.ckM[t0 // seg])
            copy(S, tape.ckS[t0 // seg])
        key = key_rows(seq, tape, t0, n, c, r0)
        q = query_rows(seq, tape, t0, n, c, r0)
        # Eq. 8 for every key of the chunk at M_0
        memory_forward_rows(M, spec, key.X, key.Z, key.H, key.HD1, True)
        output_rows(tape_view(key.Z, n * spec.zoff[L - 1], n, d_out), key.X, spec.residual,
                    key.ln, key.y)
        surprise_rows(M, spec, key)
        uscale = tape.uscale[r0:r0 + n]
        clip_scales(spec, key.X, key.H, key.D, tape.unorm2[r0:r0 + n], uscale)
        chunk_coefficients(seq, uscale, t0, n, spec.read_after, co)
        # Eqs. 16–18: every read and the next state by GEMMs
        chunk_reads(M, S, seq.anchor, spec, q, key, co, work, keep)
        output_rows(tape_view(q.Z, n * spec.zoff[L - 1], n, d_out), q.X, spec.residual, q.ln,
                    out[t0:t0 + n])
        chunk_end(M, S, M1, S1, seq.anchor, spec, key, co, work)
        if first_bad < 0 and exceeds(M1[:P], spec.bound):
            first_bad = first_bad_token(M, S, spec, seq, key, uscale, t0)
            if stop:
                return first_bad
        M, M1 = M1, M
        S, S1 = S1, S
    if M is not M_in:
        copy(M, M_in)
        copy(S, S_in)
    return first_bad


@kernel
def _backward_coefficients(alpha, eta, t0, n, read_after, aR, aM, cR, cM, cS):
    r"""The gate products of the cotangents inside a chunk (module doc), for r = n-1..0:
    $a_{rj} = (1-\alpha_{r+1})a_{r+1,j} + [\rho(j) = r]$, $c_{rj} = \eta_{r+1}c_{r+1,j} + a_{rj}$,
    the same recurrences for the $\bar{\mathcal{M}}_{in}$ and $\bar S_{in}$ columns; $\rho(j)$ is
    the state read by token j ($j$, or $j - 1$ with ``read_after`` False)."""
    t_ = aR.dtype.type
    for r in range(n - 1, -1, -1):
        keep = t_(1.0) if r == n - 1 else t_(1.0) - alpha[t0 + r + 1, 0]
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
def chunk_vjp(M0, S0, Mbar, Sbar, spec, seq, tape, t0, gout, grads, co):
    """The VJP of the chunk starting at token ``t0`` (module doc) from its start state
    ``(M0, S0)``, with its tapes and gate products ``co`` (:func:`chunk_coefficients`):
    ``Mbar``, ``Sbar`` enter as the cotangents of the chunk-end state and leave as those of
    its start; the chunk's rows of ``grads`` (:class:`.layout.Seq`) are written."""
    t_ = M0.dtype.type
    b = co.E.shape[0]
    n = min(b, seq.K.shape[0] - t0)
    key, q = key_rows(seq, tape, t0, n, t0 // b, t0), query_rows(seq, tape, t0, n, t0 // b, t0)
    Kc, KH, KD, Qc, QH = key.X, key.H, key.D, q.X, q.H
    shapes, offsets, residual = spec.shapes, spec.offsets, spec.residual
    L = shapes.shape[0]
    d_out = shapes[L - 1, 1]
    zoff, hoff, boff = n * spec.zoff, n * spec.hoff, n * spec.boff
    E, G = np.ascontiguousarray(co.E[:n, :n]), np.ascontiguousarray(co.G[:n, :n])
    Gr, coef = co.Gr, co.coef
    gQ = grads.Q[t0:t0 + n]
    ZB = np.empty(zoff[L], M0.dtype)  # z̄ of the reads (tape layout)
    RM, RS = np.zeros(n, M0.dtype), np.zeros(n, M0.dtype)  # ⟨R_j, M_0⟩, ⟨R_j, S_0⟩
    RA = np.zeros(n, M0.dtype)  # ⟨R_j, M̄⟩ (anchored: M_r - M̄ is what Eq. 13 decays)
    anchor, anchored = seq.anchor, seq.anchor.shape[0] > 0
    RU = np.zeros((n, n), M0.dtype)  # ⟨R_j, u_l⟩
    GX = np.empty((L, n, n), M0.dtype)  # x_j · h_l per layer
    GZ = np.empty((L, n, n), M0.dtype)  # z̄_j · δ_l per layer
    # 1. the reads, layer by layer from the top: z̄ M_ρ(j)ᵀ by GEMMs against M_0, S_0
    zbL = tape_view(ZB, zoff[L - 1], n, d_out)
    if residual:
        layer_norm_backward_rows(tape_view(q.Z, zoff[L - 1], n, d_out), q.ln, gout, zbL)
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
        if anchored:  # the read state has (1 - a_r) M̄ in it
            T3 = np.dot(zb, layer(anchor, shapes, offsets, i).T)
            _rowdot(xq, T3, RA)
            for r in range(n):
                for a in range(f):
                    hb[r, a] += (t_(1.0) - coef[r, 3]) * T3[r, a]
        if i > 0:
            below = tape_view(ZB, zoff[i - 1], n, f)
            d1 = tape_view(q.HD1, hoff[i - 1], n, f)
            for r in range(n):
                for a in range(f):
                    below[r, a] = hb[r, a] * d1[r, a]
        else:
            copy_rows(hb, gQ)
            if residual:
                add_rows(gout, gQ)
    # 2. products with the cotangents of the chunk end
    P = Mbar.shape[0]
    mM, mS, sS = np.dot(Mbar, M0[:P]), np.dot(Mbar, S0[:P]), np.dot(Sbar, S0[:P])
    mA = np.dot(Mbar, anchor[:P]) if anchored else t_(0.0)
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
    # 3. gate products of the cotangents, then the gates (Eqs. 13–14 backwards)
    aR, cR = np.empty((n, n), M0.dtype), np.empty((n, n), M0.dtype)
    aM, cM, cS = np.empty(n, M0.dtype), np.empty(n, M0.dtype), np.empty(n, M0.dtype)
    _backward_coefficients(seq.alpha, seq.eta, t0, n, spec.read_after, aR, aM, cR, cM, cS)
    RUG = np.dot(RU, G.T)  # (j, r') = ⟨R_j, Σ_l G_{r'l} u_l⟩
    RUE = np.dot(RU, E.T)
    mUG, mUE = np.dot(G, mU), np.dot(E, mU)
    sUE = np.dot(E, sU)
    for r in range(n):
        if r == 0:
            Pp, Ap, Cp = t_(1.0), t_(1.0), t_(0.0)
        else:
            Pp, Ap, Cp = coef[r - 1, 0], coef[r - 1, 1], coef[r - 1, 2]
        dm = aM[r] * (Ap * (mM - mA) + Cp * mS - (mUG[r - 1] if r > 0 else t_(0.0)))
        ds = (cM[r] * (Pp * mS - (mUE[r - 1] if r > 0 else t_(0.0)))
              + cS[r] * (Pp * sS - (sUE[r - 1] if r > 0 else t_(0.0))))
        for j in range(n):
            dm += aR[r, j] * (Ap * (RM[j] - RA[j]) + Cp * RS[j]
                              - (RUG[j, r - 1] if r > 0 else t_(0.0)))
            ds += cR[r, j] * (Pp * RS[j] - (RUE[j, r - 1] if r > 0 else t_(0.0)))
        grads.alpha[t0 + r, 0] = -dm  # ᾱ_r = -⟨M̄_r, M_{r-1} - M̄⟩
        grads.eta[t0 + r] = ds  # η̄_r = ⟨S̄_r, S_{r-1}⟩
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
    corr, coef_u = np.empty(n, M0.dtype), np.empty(n, M0.dtype)
    for r in range(n):
        c = tape.uscale[t0 + r]
        grads.theta[t0 + r, 0] = -c * dot_u[r]
        corr[r] = dot_u[r] / tape.unorm2[t0 + r] if c < t_(1.0) else t_(0.0)
        coef_u[r] = -seq.theta[t0 + r, 0] * c
    scale_products(A, B, spec, key, corr, coef_u)
    # the anchor's: (1 - A_n) M̄_in + Σ_j (1 - a_j) R_j, a_j the M_0 coefficient of read j
    if anchored:
        add_scaled(Mbar, t_(1.0) - coef[n - 1, 1], grads.anchor[:P])
        for i in range(L):
            f = shapes[i, 0]
            xq = Qc if i == 0 else tape_view(QH, hoff[i - 1], n, f)
            xw = np.empty((n, f), M0.dtype)
            for r in range(n):
                for a in range(f):
                    xw[r, a] = (t_(1.0) - coef[r, 3]) * xq[r, a]
            add_rows(np.dot(xw.T, tape_view(ZB, zoff[i], n, shapes[i, 1])),
                     layer(grads.anchor, shapes, offsets, i))
    # 5. cotangents of the chunk start: S̄_0 = η_0 S̄_0', M̄_0 = (1-α_0) M̄_0' + W̄_HVP
    keep0, eta0 = t_(1.0) - seq.alpha[t0, 0], seq.eta[t0]
    aR0 = np.empty(n, M0.dtype)
    for j in range(n):
        aR0[j] = keep0 * aR[0, j] + (t_(1.0) if (not spec.read_after and j == 0) else t_(0.0))
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
    HD, ZB2 = np.empty(boff[L], M0.dtype), np.empty(zoff[L], M0.dtype)
    work = np.empty(hvp_work_size(shapes, n), M0.dtype)
    hvp_rows(M0, spec, key, A, B, HD, ZB2, grads.K[t0:t0 + n], grads.V[t0:t0 + n], work)
    add_weight_cotangent(Mbar, spec, key, HD, ZB2)


def chunk_backward(spec, seq, tape, b, seg, gout, Mbar, Sbar, grads, Mbuf, Sbuf):
    """The VJP of :func:`chunk_scan` with a full tape: ``Mbar``, ``Sbar`` enter as the
    cotangents of the final state and leave as those of the initial state; ``grads``
    (:class:`.layout.Seq`) is written. ``Mbuf``, ``Sbuf`` ``(seg // b + 1, >= P)`` hold the
    recomputed chunk-start states of one segment.

    A plain Python loop over chunks (each chunk is a few GEMMs, so the loop costs nothing
    noticeable, and the kernels it calls are compiled once rather than again inside it).
    """
    T = seq.K.shape[0]
    P = spec.offsets[-1]
    dt = Mbar.dtype
    co = new_coefficients(b, dt)
    work = np.empty(chunk_work_size(spec.shapes, b), dt)
    for k in range((T - 1) // seg, -1, -1):
        s0, s1 = k * seg, min(T, k * seg + seg)
        Mbuf[0, :P] = tape.ckM[k, :P]
        Sbuf[0, :P] = tape.ckS[k, :P]
        for t0 in range(s0, s1 - b, b):  # chunk-start states of the segment
            m, n = (t0 - s0) // b, min(b, T - t0)
            chunk_coefficients(seq, tape.uscale[t0:t0 + n], t0, n, spec.read_after, co)
            chunk_end(Mbuf[m], Sbuf[m], Mbuf[m + 1], Sbuf[m + 1], seq.anchor, spec,
                      key_rows(seq, tape, t0, n, t0 // b, t0), co, work)
        for t0 in range(s1 - 1 - (s1 - 1 - s0) % b, s0 - 1, -b):
            m, n = (t0 - s0) // b, min(b, T - t0)
            chunk_coefficients(seq, tape.uscale[t0:t0 + n], t0, n, spec.read_after, co)
            chunk_vjp(Mbuf[m], Sbuf[m], Mbar, Sbar, spec, seq, tape, t0, gout[t0:t0 + n],
                      grads, co)
