r"""The memory scan in numba: the twin of :func:`minititans.memory.memory_scan` (Titans Eqs. 13-18).

Per token $t$ (Eqs. 8, 13, 14), with the surprise clipped to a global norm when asked,

$$u_t = \nabla_W \ell(\mathcal{M}_{t-1}; k_t, v_t),\quad
  S_t = \eta_t S_{t-1} - \theta_t u_t,\quad
  \mathcal{M}_t = (1 - \alpha_t)\mathcal{M}_{t-1} + S_t,\quad
  y_t = \mathcal{M}_t(q_t)\ \text{or}\ \mathcal{M}_{t-1}(q_t).$$

The gradient is derived by hand (:mod:`.mlp`): $u_{t,i} = h_{i-1}^\top \delta_i$, an outer
product per layer. Two kernels compute the same scan:

* :func:`token_loop` (``chunk_size=1``). One pass over each weight matrix per token does
  everything that needs it: Eq. 14, Eq. 13, and the forward pass of the *next* two rows
  through the new weights (the query read and the next key), so $W$, $S$ are read and
  written once per token. The loops run over the contiguous output axis and vectorise
  without fastmath; the one reduction, $\delta_{i+1} W_{i+1}^\top$, is a BLAS ``gemv``.
* :func:`chunk_loop` (``chunk_size=b``, Eqs. 16-18). All gradients of a chunk are taken at
  the chunk-start weights $(\mathcal{M}_0, S_0)$, so every $\mathcal{M}_i$ of the chunk is
  $A_i \mathcal{M}_0 + c_i S_0 - \sum_{l \le i} G_{il}\, h_{l}^\top\delta_{l}$ (per layer)
  with scalars $A_i, c_i, G_{il}$ from the gates. Reading $\mathcal{M}_i$ with the row
  $x_i$ that enters a layer never materialises $\mathcal{M}_i$:
  $x_i \mathcal{M}_i = A_i x_i \mathcal{M}_0 + c_i x_i S_0 - \sum_l G_{il}(x_i h_l^\top)\delta_l$,
  i.e. three GEMMs per layer; the final weights are two more. The chunk costs a few GEMMs
  instead of $b$ passes over the weights.

A weight that becomes NaN/inf shows up in the forward rows computed from it (any
non-finite entry of column $j$ of $W$ makes entry $j$ of $xW$ non-finite), so divergence
is detected without a separate pass; the first such token is returned and the wrapper
raises :class:`~minititans.memory.update.MemoryDivergenceError` like the reference.
"""

from __future__ import annotations

import math
import warnings

import numba
import numpy as np
from autograd.tracer import isbox

from .._checks import check_choice, check_int
from ..memory.loss import check_loss
from ..memory.update import MemoryDivergenceError, MemoryState
from ._jit import kernel, parallel_kernel
from .mlp import (
    _INV_SQRT2,
    _INV_SQRT2PI,
    ACTIVATION_CODES,
    LN_EPS,
    LOSS_CODES,
    _tape_offsets,
    aligned_zeros,
    as_kernel_array,
    fast_erf,
    fast_exp,
    layer,
    loss_grad,
    pack_weights,
    pack_weights_batched,
    padded,
    tape_offsets,
    tape_view,
    unpack_weights,
)

# --- one row through the memory ----------------------------------------------------------


@kernel
def _hidden(z, h, hd, act_kind, want_d1):
    r"""$h = \sigma(z)$ and, when ``want_d1``, $\sigma'(z)$, sharing the erf/exp between them."""
    t = z.dtype.type
    n = z.shape[0]
    if act_kind == 0:
        for j in range(n):
            s = t(1.0) / (t(1.0) + fast_exp(-z[j]))
            h[j] = z[j] * s
            if want_d1:
                hd[j] = s * (t(1.0) + z[j] * (t(1.0) - s))
    else:
        for j in range(n):
            cdf = t(0.5) * (t(1.0) + fast_erf(z[j] * t(_INV_SQRT2)))
            h[j] = z[j] * cdf
            if want_d1:
                hd[j] = cdf + z[j] * t(_INV_SQRT2PI) * fast_exp(t(-0.5) * z[j] * z[j])


@kernel
def _row_forward(flat, shapes, offsets, zoff, hoff, act_kind, x, z, h, hd):
    """Forward one row ``x`` ``(d_in,)``: tapes ``z`` (all layers), ``h`` and ``hd`` (σ, σ')."""
    L = shapes.shape[0]
    for i in range(L):
        W = layer(flat, shapes, offsets, i)
        zi = z[zoff[i]:zoff[i + 1]]
        xin = x if i == 0 else h[hoff[i - 1]:hoff[i]]
        zi[:] = 0
        for a in range(shapes[i, 0]):
            xa = xin[a]
            for j in range(shapes[i, 1]):
                zi[j] += xa * W[a, j]
        if i < L - 1:
            _hidden(zi, h[hoff[i]:hoff[i + 1]], hd[hoff[i]:hoff[i + 1]], act_kind, True)


@kernel
def _row_output(zL, x, residual, ln, y):
    """``y = z_L`` or ``x + LN(z_L)`` for one row; ``ln = (mean, rstd)`` is written."""
    t = zL.dtype.type
    d = zL.shape[0]
    if not residual:
        y[:] = zL
        return
    mu = t(0.0)
    for j in range(d):
        mu += zL[j]
    mu /= t(d)
    var = t(0.0)
    for j in range(d):
        var += (zL[j] - mu) * (zL[j] - mu)
    rstd = t(1.0) / math.sqrt(var / t(d) + t(LN_EPS))
    ln[0] = mu
    ln[1] = rstd
    for j in range(d):
        y[j] = x[j] + (zL[j] - mu) * rstd


@kernel
def _row_deltas(flat, shapes, offsets, zoff, hoff, residual, loss_kind, p, delta, v, z, hd,
                ln, y, D):
    r"""$\delta_i = \partial\ell/\partial z_i$ of one row at the current weights (into tape ``D``).

    ``y`` is the row's output $\mathcal{M}(x)$; $\delta_L$ is $\partial\ell/\partial y$ (through
    the LayerNorm when ``residual``), then $\delta_i = (W_{i+1}\delta_{i+1}) \odot \sigma'(z_i)$.
    """
    L = shapes.shape[0]
    dL = D[zoff[L - 1]:zoff[L]]
    d = dL.shape[0]
    for j in range(d):
        dL[j] = loss_grad(y[j], v[j], loss_kind, p, delta)
    if residual:
        _ln_backward_row(z[zoff[L - 1]:zoff[L]], ln, dL)
    for i in range(L - 1, 0, -1):
        dprev = D[zoff[i - 1]:zoff[i]]
        # δ_i = (W_{i+1} δ_{i+1}) ⊙ σ'(z_i): a gemv, the one reduction of the token
        np.dot(layer(flat, shapes, offsets, i), D[zoff[i]:zoff[i + 1]], dprev)
        hdi = hd[hoff[i - 1]:hoff[i]]
        for j in range(dprev.shape[0]):
            dprev[j] *= hdi[j]


@kernel
def _sumsq(x):
    t = x.dtype.type
    s = t(0.0)
    for a in range(x.shape[0]):
        s += x[a] * x[a]
    return s


@kernel
def _clip_scale(shapes, zoff, hoff, x, h, D, clip):
    r"""$\min(1, c / \lVert u \rVert)$, 1 when ``clip <= 0``.

    $\lVert u\rVert^2 = \sum_i \lVert h_{i-1}\rVert^2 \lVert\delta_i\rVert^2$: the norm of an
    outer product is the product of the norms, so $u$ is never formed."""
    t = x.dtype.type
    if clip <= 0:
        return t(1.0)
    total = t(0.0)
    for i in range(shapes.shape[0]):
        nx = _sumsq(x) if i == 0 else _sumsq(h[hoff[i - 1]:hoff[i]])
        total += nx * _sumsq(D[zoff[i]:zoff[i + 1]])
    return min(t(1.0), clip / max(math.sqrt(total), t(1e-30)))


@kernel
def _all_finite(a):
    for i in range(a.shape[0]):
        if not np.isfinite(a[i]):
            return False
    return True


@kernel
def _update_rows(W, S, d, kin, e, decay, g_scale, xa, xb, za, zb):
    r"""Eqs. 14 and 13 on one weight matrix, fused with reading two rows through the result.

    $S \leftarrow \eta S + g\,k^\top d$, $W \leftarrow (1-\alpha) W + S$ with
    $g = -\theta c$ (the surprise $u = k^\top d$ is never formed), then ``za = xa W``,
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
            m = decay * Wa[j] + s  # Eq. 13
            Wa[j] = m
            za[j] += qa * m
            zb[j] += kb * m


# --- the token loop (chunk_size = 1) -----------------------------------------------------


def token_workspace(shapes, dtype):
    """Workspace of :func:`token_loop` for one sequence: ``(n_work,)`` of ``dtype``."""
    zoff, hoff = tape_offsets(shapes, 1)
    nz, nh = padded(zoff[-1], dtype), padded(max(hoff[-1], 1), dtype)
    return 4 * nz + 6 * nh + padded(8 + shapes[-1, 1], dtype) + padded(shapes[0, 0], dtype)


@kernel
def _carve(work, start, n):
    """``work[start:start + n]`` and the next start, rounded up to a 64-byte boundary."""
    per_line = 64 // work.itemsize
    return work[start:start + n], start + (n + per_line - 1) // per_line * per_line


@kernel
def token_loop(M, S, shapes, offsets, act_kind, residual, loss_kind, p, delta,
               K, V, Q, alpha, eta, theta, clip, read_after, work, out):
    r"""Eqs. (13)-(14) token by token, in place on ``M``, ``S`` (flat ``(P,)``); writes ``out``.

    Args:
        M, S: flat weights $\mathcal{M}_0$ and momentum $S_0$ (:mod:`.mlp` layout, 64-byte
            aligned), updated in place to $\mathcal{M}_T$, $S_T$.
        act_kind, residual, loss_kind, p, delta: the memory and its inner loss (codes of
            :mod:`.mlp`; ``p``, ``delta`` in the dtype).
        K ``(T, d_in)``, V ``(T, d_out)``, Q ``(T, d_in)``; alpha, eta, theta ``(T,)``.
        clip: max global norm of each surprise, ``<= 0`` for none.
        read_after: ``y_t = M_t(q_t)`` if True, else ``M_{t-1}(q_t)``.
        work: aligned scratch of :func:`token_workspace` elements.
        out: ``(T, d_out)``, written.

    Returns:
        The first token whose update made the weights non-finite, or -1.
    """
    t_ = M.dtype.type
    T = K.shape[0]
    L = shapes.shape[0]
    zoff, hoff = _tape_offsets(shapes, 1)
    d_in = shapes[0, 0]
    d_out = shapes[L - 1, 1]
    nz = zoff[L]
    nh = max(hoff[L - 1], 1)
    # tapes of three rows: the current key (k), and the two rows read through the new
    # weights, A (a query) and B (the next key, which becomes k)
    zk, pos = _carve(work, 0, nz)
    zb, pos = _carve(work, pos, nz)
    za, pos = _carve(work, pos, nz)
    D, pos = _carve(work, pos, nz)
    hk, pos = _carve(work, pos, nh)
    hdk, pos = _carve(work, pos, nh)
    hb, pos = _carve(work, pos, nh)
    hdb, pos = _carve(work, pos, nh)
    ha, pos = _carve(work, pos, nh)
    hda, pos = _carve(work, pos, nh)
    small, pos = _carve(work, pos, 8 + d_out)
    zero_row, pos = _carve(work, pos, d_in)
    zero_row[:] = 0
    lnk = small[0:2]
    lna = small[2:4]
    yk = small[8:8 + d_out]
    first_bad = -1

    _row_forward(M, shapes, offsets, zoff, hoff, act_kind, K[0], zk, hk, hdk)
    _row_output(zk[zoff[L - 1]:nz], K[0], residual, lnk, yk)
    if not read_after:
        _row_forward(M, shapes, offsets, zoff, hoff, act_kind, Q[0], za, ha, hda)
        _row_output(za[zoff[L - 1]:nz], Q[0], residual, lna, out[0])

    for t in range(T):
        # Eq. 8: δ_i of the key at M_{t-1}; the surprise u_{t,i} = h_{i-1}ᵀ δ_i is never formed
        _row_deltas(M, shapes, offsets, zoff, hoff, residual, loss_kind, p, delta, V[t], zk,
                    hdk, lnk, yk, D)
        c = _clip_scale(shapes, zoff, hoff, K[t], hk, D, clip)
        # the rows read through M_t: A = q_t (after) or q_{t+1} (before), B = k_{t+1}
        if read_after:
            xa = Q[t]
        else:
            xa = Q[t + 1] if t + 1 < T else zero_row
        xb = K[t + 1] if t + 1 < T else zero_row
        bad = False
        for i in range(L):
            W = layer(M, shapes, offsets, i)
            zai = za[zoff[i]:zoff[i + 1]]
            zbi = zb[zoff[i]:zoff[i + 1]]
            _update_rows(W, layer(S, shapes, offsets, i), D[zoff[i]:zoff[i + 1]],
                         K[t] if i == 0 else hk[hoff[i - 1]:hoff[i]],
                         eta[t], t_(1.0) - alpha[t], -theta[t] * c,
                         xa if i == 0 else ha[hoff[i - 1]:hoff[i]],
                         xb if i == 0 else hb[hoff[i - 1]:hoff[i]], zai, zbi)
            # a non-finite weight in column j makes za[j] non-finite; confirm on W itself
            if not _all_finite(zai) and not _all_finite(W.ravel()):
                bad = True
            if i < L - 1:
                _hidden(zai, ha[hoff[i]:hoff[i + 1]], hda[hoff[i]:hoff[i + 1]], act_kind, False)
                _hidden(zbi, hb[hoff[i]:hoff[i + 1]], hdb[hoff[i]:hoff[i + 1]], act_kind, True)
        if bad and first_bad < 0:
            first_bad = t
        if read_after:
            _row_output(za[zoff[L - 1]:nz], xa, residual, lna, out[t])
        elif t + 1 < T:
            _row_output(za[zoff[L - 1]:nz], xa, residual, lna, out[t + 1])
        # B (the next key at M_t) becomes the key row
        zk, zb = zb, zk
        hk, hb = hb, hk
        hdk, hdb = hdb, hdk
        _row_output(zk[zoff[L - 1]:nz], xb, residual, lnk, yk)
    return first_bad


# --- the chunked form (chunk_size = b, Eqs. 16-18) ---------------------------------------


@kernel
def _ln_backward_row(zL, ln, g):
    r"""In place, one row: $g \leftarrow \partial\ell/\partial z_L$ through $x + \mathrm{LN}(z)$."""
    t = zL.dtype.type
    d = zL.shape[0]
    mu = ln[0]
    rstd = ln[1]
    gm = t(0.0)
    gzm = t(0.0)
    for j in range(d):
        gm += g[j]
        gzm += g[j] * (zL[j] - mu) * rstd
    gm /= t(d)
    gzm /= t(d)
    for j in range(d):
        g[j] = rstd * (g[j] - gm - (zL[j] - mu) * rstd * gzm)


@kernel
def _chunk_coefficients(alpha, eta, theta, cl, t0, n, read_after, E, G, Gr, coef):
    r"""The gate products that write every state of a chunk in terms of its start (Eqs. 16, 18).

    With $\theta'_l = \theta_l c_l$ (clip scale $c_l$) and the surprises $u_l$ all taken at
    $\mathcal{M}_0$:

    $$S_i = P_i S_0 - \sum_{l \le i} E_{il} u_l,\qquad
      \mathcal{M}_i = A_i \mathcal{M}_0 + C_i S_0 - \sum_{l\le i} G_{il} u_l$$

    by the recurrences $P_i = \eta_i P_{i-1}$, $E_{il} = \eta_i E_{i-1,l}$ ($E_{ll} = \theta'_l$),
    $A_i = (1-\alpha_i) A_{i-1}$, $C_i = (1-\alpha_i) C_{i-1} + P_i$,
    $G_{il} = (1-\alpha_i) G_{i-1,l} + E_{il}$ — products only, no division by $\beta_i$.
    ``coef[:, 0:3] = (P, A, C)`` of row i; ``coef[:, 3:5]`` and ``Gr`` are the coefficients
    of the state each token reads: $\mathcal{M}_i$ (after) or $\mathcal{M}_{i-1}$ (before).
    """
    t_ = E.dtype.type
    P = t_(1.0)
    A = t_(1.0)
    C = t_(0.0)
    for r in range(n):
        e = eta[t0 + r]
        decay = t_(1.0) - alpha[t0 + r]
        for l_ in range(r):
            E[r, l_] = e * E[r - 1, l_]
            G[r, l_] = decay * G[r - 1, l_] + E[r, l_]
        E[r, r] = theta[t0 + r] * cl[r]
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
def _first_nonfinite(MS, shapes, soff, Kc, Hk, Dk, zoff, hoff, alpha, eta, theta, cl, t0, n):
    """Slow path after a chunk diverged: run Eqs. 13-14 token by token from the chunk start
    (gradients at the chunk start, as in the chunk) and return the first token whose
    weights are not finite (``n - 1`` if only the closed form overflowed)."""
    t_ = MS.dtype.type
    L = shapes.shape[0]
    W = MS.copy()
    for r in range(n):
        decay = t_(1.0) - alpha[t0 + r]
        g = -theta[t0 + r] * cl[r]
        ok = True
        for i in range(L):
            f = shapes[i, 0]
            o = shapes[i, 1]
            blk = W[soff[i]:soff[i] + 2 * f * o].reshape((2 * f, o))
            xin = Kc[r] if i == 0 else Hk[hoff[i - 1] + r * f:hoff[i - 1] + (r + 1) * f]
            d = Dk[zoff[i] + r * o:zoff[i] + (r + 1) * o]
            for a in range(f):
                for j in range(o):
                    s = eta[t0 + r] * blk[f + a, j] + g * xin[a] * d[j]
                    blk[f + a, j] = s
                    blk[a, j] = decay * blk[a, j] + s
                    if not np.isfinite(blk[a, j]):
                        ok = False
        if not ok:
            return r
    return n - 1


@kernel
def chunk_loop(M, S, shapes, offsets, act_kind, residual, loss_kind, p, delta,
               K, V, Q, alpha, eta, theta, clip, read_after, b, out):
    r"""Eqs. (16)-(18): chunks of ``b`` tokens whose surprises share the chunk-start weights.

    Arguments as :func:`token_loop` (``M``, ``S`` updated in place), plus the chunk size ``b``.
    Per chunk, with $X$ the rows entering a layer ($K$, then $h_{i-1}$) and $\Delta$ their
    $\delta$'s at $\mathcal{M}_0$, a query row $x_i$ entering the same layer reads

    $$x_i \mathcal{M}_i = A_i\, x_i W_0 + C_i\, x_i S_0 - \big[(G \odot x X^\top)\,\Delta\big]_i$$

    (:func:`_chunk_coefficients`); the new state is
    $W_0 \leftarrow A_b W_0 + C_b S_0 - X^\top \mathrm{diag}(G_{b\cdot})\Delta$ and
    $S_0 \leftarrow P_b S_0 - X^\top \mathrm{diag}(E_{b\cdot})\Delta$. All products are GEMMs
    (``np.dot`` into preallocated outputs).

    Returns:
        The first token whose weights became non-finite, or -1.
    """
    t_ = M.dtype.type
    dt = M.dtype
    T = K.shape[0]
    L = shapes.shape[0]
    b = min(b, T)
    zoff, hoff = _tape_offsets(shapes, b)
    fmax = 0
    omax = 0
    for i in range(L):
        fmax = max(fmax, shapes[i, 0])
        omax = max(omax, shapes[i, 1])
    d_out = shapes[L - 1, 1]
    # [W_i ; S_i] stacked per layer, (2 fan_in, fan_out), so A x W + C x S is one GEMM;
    # two copies: the chunk-start state stays intact while the next one is written
    soff = 2 * offsets
    MS = np.empty(soff[L], dt)
    MS_next = np.empty(soff[L], dt)
    for i in range(L):
        f = shapes[i, 0] * shapes[i, 1]
        MS[soff[i]:soff[i] + f] = M[offsets[i]:offsets[i + 1]]
        MS[soff[i] + f:soff[i + 1]] = S[offsets[i]:offsets[i + 1]]
    Zk = np.empty(zoff[L], dt)
    Dk = np.empty(zoff[L], dt)
    Zq = np.empty(zoff[L], dt)
    nh = max(hoff[L - 1], 1)
    Hk = np.empty(nh, dt)
    HDk = np.empty(nh, dt)
    Hq = np.empty(nh, dt)
    Yk = np.empty((b, d_out), dt)
    lnk = np.empty((b, 2), dt)
    lnq = np.empty((b, 2), dt)
    E = np.zeros((b, b), dt)
    G = np.zeros((b, b), dt)
    Gr = np.zeros((b, b), dt)
    coef = np.zeros((b, 5), dt)
    cl = np.ones(b, dt)
    Xs = np.empty(b * 2 * fmax, dt)
    Pm = np.empty(b * b, dt)
    tmp = np.empty(b * omax, dt)
    DD = np.empty(b * 2 * omax, dt)
    FS = np.empty(fmax * 2 * omax, dt)
    first_bad = -1
    for t0 in range(0, T, b):
        n = min(b, T - t0)
        Kc = K[t0:t0 + n]
        Qc = Q[t0:t0 + n]
        # keys through M_0 (the chunk start): z_i = h_{i-1} W_i, one GEMM per layer
        for i in range(L):
            f = shapes[i, 0]
            o = shapes[i, 1]
            zi = tape_view(Zk, zoff[i], n, o)
            xin = Kc if i == 0 else tape_view(Hk, hoff[i - 1], n, f)
            np.dot(xin, MS[soff[i]:soff[i] + f * o].reshape((f, o)), zi)
            if i < L - 1:
                _hidden(Zk[zoff[i]:zoff[i] + n * o], Hk[hoff[i]:hoff[i] + n * o],
                        HDk[hoff[i]:hoff[i] + n * o], act_kind, True)
        # Eq. 8 for every token at once: δ_L = ∂ℓ/∂M(k), then δ_i = (δ_{i+1} W_{i+1}ᵀ) ⊙ σ'(z_i)
        zL = tape_view(Zk, zoff[L - 1], n, d_out)
        dL = tape_view(Dk, zoff[L - 1], n, d_out)
        for r in range(n):
            _row_output(zL[r], Kc[r], residual, lnk[r], Yk[r])
            for j in range(d_out):
                dL[r, j] = loss_grad(Yk[r, j], V[t0 + r, j], loss_kind, p, delta)
            if residual:
                _ln_backward_row(zL[r], lnk[r], dL[r])
        for i in range(L - 1, 0, -1):
            f = shapes[i, 0]
            o = shapes[i, 1]
            dprev = tape_view(Dk, zoff[i - 1], n, f)
            np.dot(tape_view(Dk, zoff[i], n, o), MS[soff[i]:soff[i] + f * o].reshape((f, o)).T,
                   dprev)
            hd = tape_view(HDk, hoff[i - 1], n, f)
            for r in range(n):
                for j in range(f):
                    dprev[r, j] *= hd[r, j]
        if clip > 0:
            for r in range(n):
                total = t_(0.0)
                for i in range(L):
                    f = shapes[i, 0]
                    o = shapes[i, 1]
                    xin = Kc[r] if i == 0 else Hk[hoff[i - 1] + r * f:hoff[i - 1] + (r + 1) * f]
                    total += _sumsq(xin) * _sumsq(Dk[zoff[i] + r * o:zoff[i] + (r + 1) * o])
                cl[r] = min(t_(1.0), clip / max(math.sqrt(total), t_(1e-30)))
        _chunk_coefficients(alpha, eta, theta, cl, t0, n, read_after, E, G, Gr, coef)
        # queries: x_i M_i = A_i x_i W_0 + C_i x_i S_0 - [(G ⊙ x Xᵀ) Δ]_i, layer by layer
        for i in range(L):
            f = shapes[i, 0]
            o = shapes[i, 1]
            xq = Qc if i == 0 else tape_view(Hq, hoff[i - 1], n, f)
            xk = Kc if i == 0 else tape_view(Hk, hoff[i - 1], n, f)
            xs = Xs[:n * 2 * f].reshape((n, 2 * f))
            for r in range(n):
                for a in range(f):
                    xs[r, a] = coef[r, 3] * xq[r, a]
                    xs[r, f + a] = coef[r, 4] * xq[r, a]
            zq = tape_view(Zq, zoff[i], n, o)
            np.dot(xs, MS[soff[i]:soff[i + 1]].reshape((2 * f, o)), zq)
            pm = Pm[:n * n].reshape((n, n))
            np.dot(xq, xk.T, pm)  # (n, n): x_i · X_l
            for r in range(n):
                for l_ in range(n):
                    pm[r, l_] *= Gr[r, l_]
            tv = tmp[:n * o].reshape((n, o))
            np.dot(pm, tape_view(Dk, zoff[i], n, o), tv)
            for r in range(n):
                for j in range(o):
                    zq[r, j] -= tv[r, j]
            if i < L - 1:
                _hidden(Zq[zoff[i]:zoff[i] + n * o], Hq[hoff[i]:hoff[i] + n * o],
                        Hq[hoff[i]:hoff[i] + n * o], act_kind, False)
        zqL = tape_view(Zq, zoff[L - 1], n, d_out)
        for r in range(n):
            _row_output(zqL[r], Qc[r], residual, lnq[r], out[t0 + r])
        # the state at the chunk end: W ← A W + C S - Xᵀ diag(G_n) Δ, S ← P S - Xᵀ diag(E_n) Δ
        Pn = coef[n - 1, 0]
        An = coef[n - 1, 1]
        Cn = coef[n - 1, 2]
        ok = True
        for i in range(L):
            f = shapes[i, 0]
            o = shapes[i, 1]
            xk = Kc if i == 0 else tape_view(Hk, hoff[i - 1], n, f)
            di = tape_view(Dk, zoff[i], n, o)
            dd = DD[:n * 2 * o].reshape((n, 2 * o))
            for r in range(n):
                for j in range(o):
                    dd[r, j] = E[n - 1, r] * di[r, j]
                    dd[r, o + j] = G[n - 1, r] * di[r, j]
            fs = FS[:f * 2 * o].reshape((f, 2 * o))
            np.dot(xk.T, dd, fs)
            old = MS[soff[i]:soff[i + 1]].reshape((2 * f, o))
            new = MS_next[soff[i]:soff[i + 1]].reshape((2 * f, o))
            for a in range(f):
                for j in range(o):
                    new[a, j] = An * old[a, j] + Cn * old[f + a, j] - fs[a, o + j]
                    new[f + a, j] = Pn * old[f + a, j] - fs[a, j]
            if not _all_finite(MS_next[soff[i]:soff[i] + f * o]):
                ok = False
        if not ok and first_bad < 0:
            first_bad = t0 + _first_nonfinite(MS, shapes, soff, Kc, Hk, Dk, zoff, hoff,
                                              alpha, eta, theta, cl, t0, n)
        MS, MS_next = MS_next, MS
    for i in range(L):
        f = shapes[i, 0] * shapes[i, 1]
        M[offsets[i]:offsets[i + 1]] = MS[soff[i]:soff[i] + f]
        S[offsets[i]:offsets[i + 1]] = MS[soff[i] + f:soff[i + 1]]
    return first_bad


# --- a batch of sequences in parallel ----------------------------------------------------


@kernel
def _scan_one(M, S, shapes, offsets, act_kind, residual, loss_kind, p, delta, K, V, Q, alpha,
              eta, theta, clip, read_after, b, work, out):
    """One sequence: :func:`token_loop` if ``b == 1`` else :func:`chunk_loop`."""
    if b == 1:
        return token_loop(M, S, shapes, offsets, act_kind, residual, loss_kind, p, delta, K, V,
                          Q, alpha, eta, theta, clip, read_after, work, out)
    return chunk_loop(M, S, shapes, offsets, act_kind, residual, loss_kind, p, delta, K, V, Q,
                      alpha, eta, theta, clip, read_after, b, out)


@parallel_kernel
def batch_loop(M, S, shapes, offsets, act_kind, residual, loss_kind, p, delta,
               K, V, Q, alpha, eta, theta, clip, read_after, b, work, out, first_bad):
    """:func:`_scan_one` on every sequence, ``prange`` over them.

    ``M``, ``S`` ``(B, P_pad)``; ``K``, ``V``, ``Q`` ``(B, T, d)``; gates ``(B, T)``;
    ``work`` ``(B, n_work)``; ``out`` ``(B, T, d_out)``; ``first_bad`` ``(B,)`` int64, written.
    The time loop of each sequence stays serial; sequences are independent.
    """
    for s in numba.prange(M.shape[0]):
        first_bad[s] = _scan_one(M[s], S[s], shapes, offsets, act_kind, residual, loss_kind, p,
                                 delta, K[s], V[s], Q[s], alpha[s], eta[s], theta[s], clip,
                                 read_after, b, work[s], out[s])


# --- the Python entry points -------------------------------------------------------------


def _any_box(*xs):
    return any(isbox(x) for x in xs)


def _kernel_args(spec, dtype, loss, p, delta, max_grad_norm):
    """(act code, residual, loss code, p, delta, clip) in the kernel's types."""
    t = np.dtype(dtype).type
    clip = t(-1.0) if max_grad_norm is None else t(float(max_grad_norm))
    return (ACTIVATION_CODES[spec.activation], bool(spec.residual_norm), LOSS_CODES[loss],
            t(p), t(delta), clip)


def _report(first_bad, on_nonfinite, detail=""):
    if first_bad < 0:
        return
    err = MemoryDivergenceError(int(first_bad), detail)
    if on_nonfinite == "raise":
        raise err
    warnings.warn(str(err), RuntimeWarning, stacklevel=4)


def numba_memory_scan(state, keys, values, queries, alpha, eta, theta, *, chunk_size=1,
                      read="after", loss="l2", p=3.0, delta=1.0, max_grad_norm=None,
                      on_nonfinite="raise"):
    r"""``memory_scan(..., backend="numba")``: Titans Eqs. (13)-(18) by the kernels of this module.

    Arguments are those of :func:`minititans.memory.memory_scan`, already validated there;
    ``alpha``, ``eta``, ``theta`` are arrays ``(T,)``. Inputs may be float32 or float64,
    non-contiguous or read-only; they are copied to contiguous arrays of the common dtype.
    If any input is an autograd box the call goes to the differentiable primitive
    ``minititans.kernels.vjp.numba_memory_scan_differentiable`` (same signature).

    Returns:
        ``(out (T, d_out), MemoryState)`` in the common dtype, like the reference.
    """
    leaves = (*state.params, *state.momentum, keys, values, queries, alpha, eta, theta)
    if _any_box(*leaves):
        try:
            from .vjp import numba_memory_scan_differentiable
        except ImportError as exc:
            raise NotImplementedError(
                "differentiating memory_scan(backend='numba') needs "
                "minititans.kernels.vjp.numba_memory_scan_differentiable; use "
                "backend='reference' to differentiate"
            ) from exc
        return numba_memory_scan_differentiable(
            state, keys, values, queries, alpha, eta, theta, chunk_size=chunk_size, read=read,
            loss=loss, p=p, delta=delta, max_grad_norm=max_grad_norm, on_nonfinite=on_nonfinite)
    spec = state.params
    weights = [np.asarray(w) for w in spec]
    momentum = [np.asarray(w) for w in state.momentum]
    K, V, Q = (np.asarray(x) for x in (keys, values, queries))
    dtype = np.result_type(K, V, Q, *weights)
    M, shapes, offsets = pack_weights(weights, dtype)
    S, _, _ = pack_weights(momentum, dtype)
    K, V, Q = (as_kernel_array(x, dtype) for x in (K, V, Q))
    a, e, th = (as_kernel_array(g, dtype) for g in (alpha, eta, theta))
    T = K.shape[0]
    out = np.empty((T, shapes[-1, 1]), dtype=dtype)
    if T:
        args = _kernel_args(spec, dtype, loss, p, delta, max_grad_norm)
        if chunk_size == 1:
            work = aligned_zeros(token_workspace(shapes, dtype), dtype)
            first_bad = token_loop(M, S, shapes, offsets, *args[:5], K, V, Q, a, e, th,
                                   args[5], read == "after", work, out)
        else:
            first_bad = chunk_loop(M, S, shapes, offsets, *args[:5], K, V, Q, a, e, th,
                                   args[5], read == "after", int(chunk_size), out)
        _report(first_bad, on_nonfinite)
    new_M = spec.like(unpack_weights(M, shapes, offsets))
    new_S = spec.like(unpack_weights(S, shapes, offsets))
    return out, MemoryState(new_M, new_S)


def numba_memory_scan_batched(state, keys, values, queries, alpha, eta, theta, *,
                              chunk_size=1, read="after", loss="l2", p=3.0, delta=1.0,
                              max_grad_norm=None, on_nonfinite="raise"):
    r"""B independent memory scans at once, in parallel over the batch (``numba.prange``).

    Sequence $s$ is exactly ``numba_memory_scan`` on ``keys[s]``, ... from its own initial
    state; the time loop inside each stays serial. The number of threads is numba's
    (``numba.set_num_threads``); keep BLAS single-threaded (``OPENBLAS_NUM_THREADS=1``)
    when ``chunk_size > 1`` so the threads do not oversubscribe the cores.

    Args:
        state: MemoryState whose weights and momentum have a leading batch axis,
            ``W_i`` ``(B, fan_in, fan_out)``.
        keys ``(B, T, d_in)``, values ``(B, T, d_out)``, queries ``(B, T, d_in)``.
        alpha, eta, theta: ``(B, T)`` arrays (or floats).
        chunk_size, read, loss, p, delta, max_grad_norm, on_nonfinite: as ``memory_scan``.

    Returns:
        ``(out (B, T, d_out), MemoryState)`` with final weights and momentum ``(B, ...)``.
        A divergence raises :class:`MemoryDivergenceError` for the earliest token over all
        sequences (its message names the sequence).
    """
    if not isinstance(state, MemoryState):
        raise TypeError(f"state must be a MemoryState, got {type(state).__name__}")
    leaves = (*state.params, *state.momentum, keys, values, queries, alpha, eta, theta)
    if _any_box(*leaves):
        raise NotImplementedError("the batched numba scan is not differentiable; map "
                                  "numba_memory_scan over the batch to differentiate")
    spec = state.params
    weights = [np.asarray(w) for w in spec]
    momentum = [np.asarray(w) for w in state.momentum]
    K, V, Q = (np.asarray(x) for x in (keys, values, queries))
    if K.ndim != 3 or V.ndim != 3 or Q.ndim != 3:
        raise ValueError("keys, values and queries must have shape (B, T, d), got "
                         f"{K.shape}, {V.shape} and {Q.shape}")
    B, T = K.shape[:2]
    if any(w.ndim != 3 or w.shape[0] != B for w in weights + momentum):
        raise ValueError(f"state weights and momentum must have a leading batch axis of {B}, "
                         f"got {[w.shape for w in weights]}")
    d_in, d_out = weights[0].shape[1], weights[-1].shape[2]
    if (V.shape[:2] != (B, T) or Q.shape[:2] != (B, T) or K.shape[2] != d_in
            or Q.shape[2] != d_in or V.shape[2] != d_out):
        raise ValueError(f"need keys/queries (B, T, {d_in}) and values (B, T, {d_out}), got "
                         f"{K.shape}, {Q.shape} and {V.shape}")
    chunk_size = check_int("chunk_size", chunk_size, minimum=1)
    check_choice("read", read, ("after", "before"))
    check_choice("on_nonfinite", on_nonfinite, ("raise", "warn"))
    check_loss(loss, p, delta)
    if max_grad_norm is not None and not (float(max_grad_norm) > 0):
        raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm!r}")
    dtype = np.result_type(K, V, Q, *weights)
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"inputs must be float32 or float64, got {dtype}")
    for name, x in (("keys", K), ("values", V), ("queries", Q)):
        if not np.all(np.isfinite(x)):
            raise ValueError(f"{name} contains NaN or inf")
    gates = []
    for name, g, high in (("alpha", alpha, 1.0), ("eta", eta, 1.0), ("theta", theta, None)):
        try:
            g = np.broadcast_to(np.asarray(g, dtype=dtype), (B, T))
        except ValueError:
            raise ValueError(f"{name} must be a float or have shape ({B}, {T}), got shape "
                             f"{np.shape(g)}") from None
        if not np.all(np.isfinite(g)):
            raise ValueError(f"{name} contains NaN or inf")
        if g.size and (g.min() < 0 or (high is not None and g.max() > high)):
            bounds = "[0, 1]" if high is not None else ">= 0"
            raise ValueError(f"{name} must be in {bounds}")
        gates.append(as_kernel_array(g, dtype))
    M, shapes, offsets = pack_weights_batched(weights, dtype)
    S, _, _ = pack_weights_batched(momentum, dtype)
    K, V, Q = (as_kernel_array(x, dtype) for x in (K, V, Q))
    out = np.empty((B, T, d_out), dtype=dtype)
    if T and B:
        args = _kernel_args(spec, dtype, loss, p, delta, max_grad_norm)
        work = aligned_zeros((B, padded(token_workspace(shapes, dtype), dtype)), dtype)
        first_bad = np.full(B, -1, dtype=np.int64)
        batch_loop(M, S, shapes, offsets, *args[:5], K, V, Q, *gates, args[5],
                   read == "after", chunk_size, work, out, first_bad)
        if (first_bad >= 0).any():
            bad = np.where(first_bad >= 0, first_bad, T)
            s = int(np.argmin(bad))
            _report(int(first_bad[s]), on_nonfinite, f" of sequence {s}")
    new_M = spec.like(unpack_weights(M, shapes, offsets))
    new_S = spec.like(unpack_weights(S, shapes, offsets))
    return out, MemoryState(new_M, new_S)
