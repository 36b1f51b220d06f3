r"""Rows through the memory: the one implementation of each row computation of the scans.

Twins of :func:`minititans.memory.memory_forward` (the forward of ``n`` rows, with tapes),
:func:`~minititans.memory.per_token_surprise` (Eq. 8 by hand), ``clip_by_norm`` and
``apply_update`` of :mod:`minititans.memory.update` (Eqs. 13–14, also around an anchor),
and the divergence check.
Row vectors, $h_0 = x$:

$$z_i = h_{i-1} W_i,\quad h_i = \sigma(z_i)\ (i < L),\quad
  \mathcal{M}(x) = z_L \ \text{or}\ x + \mathrm{LN}(z_L),$$

$$\delta_L = \partial\ell/\partial z_L,\quad
  \delta_i = (\delta_{i+1} W_{i+1}^\top) \odot \sigma'(z_i),\quad
  u_i = \nabla_{W_i}\ell = h_{i-1}^\top \delta_i .$$

The surprise $u$ is never formed: the scans keep $h_{i-1}$ and $\delta_i$ (tapes of
:mod:`.layout`) and use the outer products inside their updates.
"""

from __future__ import annotations

import math

import numpy as np

from ._jit import inline_kernel, kernel
from .layout import copy_rows, layer, tape_view
from .scalars import LN_EPS, hidden, loss_grad


@kernel
def matmul(X, W, out):
    """``out = X W`` for ``X`` ``(n, f)``, ``W`` ``(f, o)``. One row is a loop over the
    contiguous output axis (it vectorises with no reduction and no BLAS call)."""
    if X.shape[0] == 1:
        x, z = X[0], out[0]
        for j in range(z.shape[0]):
            z[j] = 0
        for a in range(W.shape[0]):
            xa = x[a]
            row = W[a]
            for j in range(z.shape[0]):
                z[j] += xa * row[j]
    else:
        np.dot(X, W, out)


@inline_kernel
def matmul_t(X, W, out):
    """``out = X Wᵀ`` for ``X`` ``(n, o)``, ``W`` ``(f, o)`` (one row: a BLAS gemv)."""
    if X.shape[0] == 1:
        np.dot(W, X[0], out[0])
    else:
        np.dot(X, W.T, out)


@kernel
def memory_forward_rows(W, spec, X, Z, H, HD1, want_d1):
    r"""$z_i$ and $h_i$ of the rows ``X`` ``(n, d_in)`` at the weights ``W``, into the tapes
    ``Z``, ``H``, and $\sigma'(z_i)$ into ``HD1`` (layout of ``H``) when ``want_d1``.
    The output is :func:`output_rows` of the last block of ``Z``."""
    n = X.shape[0]
    shapes = spec.shapes
    L = shapes.shape[0]
    for i in range(L):
        o = shapes[i, 1]
        xin = X if i == 0 else tape_view(H, n * spec.hoff[i - 1], n, shapes[i - 1, 1])
        matmul(xin, layer(W, shapes, spec.offsets, i), tape_view(Z, n * spec.zoff[i], n, o))
        if i < L - 1:
            z0, h0 = n * spec.zoff[i], n * spec.hoff[i]
            hidden(Z[z0:z0 + n * o], H[h0:h0 + n * o], HD1[h0:h0 + n * o], spec.act_kind,
                   want_d1)


@inline_kernel
def output_rows(zL, X, residual, ln, out):
    r"""$\mathcal{M}(x)$ row by row: ``out = z_L``, or ``X + LN(z_L)`` with
    $\mathrm{LN}(z) = (z - \mu)/\sqrt{\mathrm{var} + \epsilon}$ and ``ln[r] = (mu, rstd)``."""
    if not residual:
        copy_rows(zL, out)
        return
    n, d = zL.shape
    t = zL.dtype.type
    for r in range(n):
        mu = t(0.0)
        for j in range(d):
            mu += zL[r, j]
        mu /= t(d)
        var = t(0.0)
        for j in range(d):
            var += (zL[r, j] - mu) * (zL[r, j] - mu)
        rstd = t(1.0) / math.sqrt(var / t(d) + t(LN_EPS))
        ln[r, 0] = mu
        ln[r, 1] = rstd
        for j in range(d):
            out[r, j] = X[r, j] + (zL[r, j] - mu) * rstd


@kernel
def layer_norm_backward_rows(z, ln, g, dz):
    r"""$\partial\ell/\partial z$ through LN, given $g = \partial\ell/\partial\,\mathrm{LN}(z)$:

    $\mathrm{rstd}\,(g - \bar g - \hat z\,\overline{g\hat z})$,
    $\hat z = (z - \mu)\,\mathrm{rstd}$; ``ln[r] = (mu, rstd)``. ``dz`` may be ``g``."""
    n, d = z.shape
    t = z.dtype.type
    for r in range(n):
        mu = ln[r, 0]
        rstd = ln[r, 1]
        gm = t(0.0)
        gzm = t(0.0)
        for j in range(d):
            gm += g[r, j]
            gzm += g[r, j] * (z[r, j] - mu) * rstd
        gm /= t(d)
        gzm /= t(d)
        for j in range(d):
            dz[r, j] = rstd * (g[r, j] - gm - (z[r, j] - mu) * rstd * gzm)


@inline_kernel
def backprop_rows(W, spec, Z, ln, HD1, D, DH):
    r"""Back-propagate through the memory at ``W``: on entry the last block of the tape ``D``
    holds $\partial\ell/\partial\mathcal{M}(x)$ of ``n = ln.shape[0]`` rows; on return ``D``
    holds every $\delta_i = \partial\ell/\partial z_i$ (through the LayerNorm when
    ``residual``) and ``DH`` (layout of ``H``) $\partial\ell/\partial h_i =
    \delta_{i+1} W_{i+1}^\top$, which the Hessian-vector products multiply by $\sigma''$."""
    n = ln.shape[0]
    shapes = spec.shapes
    L = shapes.shape[0]
    zL = n * spec.zoff[L - 1]
    if spec.residual:
        dL = tape_view(D, zL, n, shapes[L - 1, 1])
        layer_norm_backward_rows(tape_view(Z, zL, n, shapes[L - 1, 1]), ln, dL, dL)
    for i in range(L - 1, 0, -1):
        w = shapes[i - 1, 1]
        dh = tape_view(DH, n * spec.hoff[i - 1], n, w)
        matmul_t(tape_view(D, n * spec.zoff[i], n, shapes[i, 1]),
                 layer(W, shapes, spec.offsets, i), dh)
        dprev = tape_view(D, n * spec.zoff[i - 1], n, w)
        d1 = tape_view(HD1, n * spec.hoff[i - 1], n, w)
        for r in range(n):
            for j in range(w):
                dprev[r, j] = dh[r, j] * d1[r, j]


@inline_kernel
def surprise_rows(W, spec, key):
    r"""Eq. 8 for every row of ``key`` (:class:`.layout.KeyRows`, forward taped at ``W``):
    $\delta_L = \partial\ell(\mathcal{M}(k), v)/\partial\mathcal{M}(k)$, then
    :func:`backprop_rows` into ``key.D``, ``key.DH``. Row r's surprise is
    $u_i = h_{i-1,r}^\top\delta_{i,r}$."""
    n, d_out = key.y.shape
    dL = tape_view(key.D, n * spec.zoff[spec.shapes.shape[0] - 1], n, d_out)
    for r in range(n):
        for j in range(d_out):
            dL[r, j] = loss_grad(key.y[r, j], key.V[r, j], spec.loss_kind, spec.p, spec.delta)
    backprop_rows(W, spec, key.Z, key.ln, key.HD1, key.D, key.DH)


@inline_kernel
def clip_scales(spec, X, H, D, unorm2, uscale):
    r"""Per row of the tapes (``X`` ``(n, d_in)``): ``unorm2`` $= \lVert u\rVert^2 =
    \sum_i \lVert h_{i-1}\rVert^2\lVert\delta_i\rVert^2$ (the norm of an outer product is the
    product of the norms) and ``uscale`` $= \min(1, c/\lVert u\rVert)$ (1 without a clip)."""
    n = X.shape[0]
    shapes = spec.shapes
    t = X.dtype.type
    for r in range(n):
        uscale[r] = t(1.0)
        if spec.clip <= 0:
            continue
        total = t(0.0)
        for i in range(shapes.shape[0]):
            h = X[r] if i == 0 else tape_view(H, n * spec.hoff[i - 1], n, shapes[i, 0])[r]
            d = tape_view(D, n * spec.zoff[i], n, shapes[i, 1])[r]
            total += np.dot(h, h) * np.dot(d, d)
        unorm2[r] = total
        uscale[r] = min(t(1.0), spec.clip / max(math.sqrt(total), t(1e-30)))


@inline_kernel
def all_finite(a):
    """No NaN or inf in the 1-d array ``a``."""
    for i in range(a.shape[0]):
        if not np.isfinite(a[i]):
            return False
    return True


@inline_kernel
def max_abs(a):
    r"""$\max_i |a_i|$ of the 1-d array ``a`` as a float64, inf if any entry is NaN."""
    m = 0.0
    for i in range(a.shape[0]):
        x = abs(a[i])
        if not (x <= m):
            m = x if x == x else np.inf
    return m


@inline_kernel
def exceeds(a, bound):
    """Any entry of the 1-d array ``a`` NaN, inf or above ``bound`` in magnitude (the rule of
    :func:`minititans._checks.weight_bound`). Branch-free: an OR over the whole array, which
    vectorises (a check per token costs one pass over the weights)."""
    bad = False
    for i in range(a.shape[0]):
        bad |= not (abs(a[i]) <= bound)
    return bad


@kernel
def forget_rows(alpha, t, keep, rate):
    r"""The forgetting gate of token ``t`` on every output channel of every layer (tape
    layout, ``zoff``): ``rate`` $= \alpha_{t,c}$, ``keep`` $= 1 - \alpha_{t,c}$. ``alpha`` is
    ``(T, 1)`` (one rate per token, the same on every channel) or ``(T, C)`` (channel-wise,
    the NeurIPS version; ``C`` the layers' output widths summed). Returns the smallest and
    largest rate."""
    one = keep.dtype.type(1.0)
    ch = 1 if alpha.shape[1] > 1 else 0
    lo, hi = alpha[t, 0], alpha[t, 0]
    for c in range(keep.shape[0]):
        a = alpha[t, c * ch]
        rate[c] = a
        keep[c] = one - a
        lo = min(lo, a)
        hi = max(hi, a)
    return lo, hi


@kernel
def apply_update(Mi, Si, Mo, So, spec, seq, key, r, t, c, keep, rate):
    r"""Eqs. 13–14 for token ``t``, row ``r`` of the tapes ``key`` (clip scale ``c``):
    $S = \eta_t S - \theta_t c\,h_{i-1}^\top\delta_i$ ($\theta_{t,i}$ per layer when ``seq.theta``
    has a column per layer), $\mathcal{M} = (1-\alpha_t)\mathcal{M} + S$,
    then $+\,\alpha_t\bar{\mathcal{M}}$ when ``seq`` has an anchor (Eq. 13 around it).
    ``keep`` and ``rate`` are $1 - \alpha_t$ and $\alpha_t$ on each output channel
    (:func:`forget_rows`, filled here).

    Reads ``Mi``, ``Si`` and writes ``Mo``, ``So`` (other arrays, so the loop vectorises),
    with the arithmetic of the token loop, so a replay repeats the forward exactly.
    """
    shapes, offsets = spec.shapes, spec.offsets
    n = key.X.shape[0]
    per_layer = seq.theta.shape[1] > 1  # θ (T, L): a step size per memory layer
    forget_rows(seq.alpha, t, keep, rate)
    e = seq.eta[t]
    anchored = seq.anchor.shape[0] > 0
    for i in range(shapes.shape[0]):
        g_scale = -(seq.theta[t, i if per_layer else 0] * c)
        Wi, Wo = layer(Mi, shapes, offsets, i), layer(Mo, shapes, offsets, i)
        Ui, Uo = layer(Si, shapes, offsets, i), layer(So, shapes, offsets, i)
        h = key.X[r] if i == 0 else tape_view(key.H, n * spec.hoff[i - 1], n, shapes[i, 0])[r]
        d = tape_view(key.D, n * spec.zoff[i], n, shapes[i, 1])[r]
        kp = keep[spec.zoff[i]:spec.zoff[i + 1]]
        for a in range(shapes[i, 0]):
            g = g_scale * h[a]
            wi, wo, ui, uo = Wi[a], Wo[a], Ui[a], Uo[a]
            for j in range(shapes[i, 1]):
                s = e * ui[j] + g * d[j]
                uo[j] = s
                wo[j] = kp[j] * wi[j] + s
        if anchored:  # + α_t M̄, channel by channel
            Ai, rt = layer(seq.anchor, shapes, offsets, i), rate[spec.zoff[i]:spec.zoff[i + 1]]
            for a in range(shapes[i, 0]):
                wo, aa = Wo[a], Ai[a]
                for j in range(shapes[i, 1]):
                    wo[j] += rt[j] * aa[j]


@kernel
def first_bad_token(M, S, spec, seq, key, uscale, t0):
    """Replay the tokens ``t0, t0 + 1, ...`` of the rows ``key`` from the state ``(M, S)``
    before ``t0`` (not modified): the first token whose weights have diverged (NaN, inf or
    above ``spec.bound``; the last token if none has, when only a closed form overflowed).
    ``uscale`` holds the rows' clip scales."""
    n = key.X.shape[0]
    P = spec.offsets[spec.shapes.shape[0]]
    M, S = M.copy(), S.copy()
    M2, S2 = np.empty_like(M), np.empty_like(S)
    nz = spec.zoff[spec.shapes.shape[0]]
    keep, rate = np.empty(nz, M.dtype), np.empty(nz, M.dtype)
    for r in range(n):
        t = t0 + r
        apply_update(M, S, M2, S2, spec, seq, key, r, t, uscale[r], keep, rate)
        M, M2 = M2, M
        S, S2 = S2, S
        if exceeds(M[:P], spec.bound):
            return t
    return t0 + n - 1
