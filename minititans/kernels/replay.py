r"""Replaying the memory update from taped surprises (Titans Eqs. 13-14), for the VJP.

The forward of the differentiable scan keeps, per token, the vectors whose outer products
are the surprise, $u_{t,i} = h_{i-1}^\top\delta_i$, and the state $(\mathcal{M}, S)$ every
few tokens. From a stored state the later ones follow by the update alone,

$$S_t = \eta_t S_{t-1} - \theta_t c_t\, h_{i-1}^\top \delta_i ,\qquad
  \mathcal{M}_t = (1 - \alpha_t)\mathcal{M}_{t-1} + S_t$$

($c_t$ the clip scale) — no matrix product. The backward replays a segment this way, and
so does the search for the first token whose weights stopped being finite.

Tapes hold ``n`` rows per chunk in the layout of :mod:`.mlp` (``n = 1``: one row a token).
"""

from __future__ import annotations

import numpy as np

from ._jit import kernel
from .mlp import _tape_offsets, layer, tape_view


@kernel
def copy(src, dst):
    """``dst[:] = src`` for 1-d arrays (an explicit loop: a plain copy, vectorised)."""
    for i in range(src.shape[0]):
        dst[i] = src[i]


@kernel
def all_finite(a):
    for i in range(a.shape[0]):
        if not np.isfinite(a[i]):
            return False
    return True


@kernel
def surprise_norm2(shapes, x, Hc, Dc, n, r):
    r"""$\lVert u\rVert^2 = \sum_i \lVert h_{i-1}\rVert^2\lVert\delta_i\rVert^2$ of row ``r``
    (input ``x``) of the chunk tapes ``Hc``, ``Dc`` over ``n`` rows."""
    zoff, hoff = _tape_offsets(shapes, n)
    total = x.dtype.type(0.0)
    for i in range(shapes.shape[0]):
        h = x if i == 0 else tape_view(Hc, hoff[i - 1], n, shapes[i - 1, 1])[r]
        d = tape_view(Dc, zoff[i], n, shapes[i, 1])[r]
        total += np.dot(h, h) * np.dot(d, d)
    return total


@kernel
def update(Mi, Si, Mo, So, shapes, offsets, x, Hc, Dc, n, r, coef, keep, e):
    r"""Eqs. (13)-(14) for one token: $S = \eta S - c\,h_{i-1}^\top\delta_i$,
    $\mathcal{M} = (1-\alpha)\mathcal{M} + S$.

    The surprise is row ``r`` of the chunk tapes ``Hc``, ``Dc`` (``n`` rows, input ``x``);
    ``coef`` $= \theta_t c_t$. Reads ``Mi``, ``Si`` and writes ``Mo``, ``So``, which must be
    other arrays (then the loop vectorises). The arithmetic is that of
    :func:`minititans.kernels.scan._update_rows`, so a replay repeats the forward exactly.
    """
    zoff, hoff = _tape_offsets(shapes, n)
    g_scale = -coef
    for i in range(shapes.shape[0]):
        Wi, Wo = layer(Mi, shapes, offsets, i), layer(Mo, shapes, offsets, i)
        Ui, Uo = layer(Si, shapes, offsets, i), layer(So, shapes, offsets, i)
        h = x if i == 0 else tape_view(Hc, hoff[i - 1], n, shapes[i - 1, 1])[r]
        d = tape_view(Dc, zoff[i], n, shapes[i, 1])[r]
        for a in range(shapes[i, 0]):
            g = g_scale * h[a]
            wi, wo, ui, uo = Wi[a], Wo[a], Ui[a], Uo[a]
            for j in range(shapes[i, 1]):
                s = e * ui[j] + g * d[j]
                uo[j] = s
                wo[j] = keep * wi[j] + s


@kernel
def first_bad_token(M, S, K, alpha, eta, theta, shapes, offsets, b, s0, s1, KH, KD, uscale):
    """Replay tokens ``s0..s1-1`` from the state ``(M, S)`` before ``s0``: the first token
    whose weights are not finite (``s1 - 1`` if none is)."""
    t_ = M.dtype.type
    T = K.shape[0]
    M2, S2 = np.empty_like(M), np.empty_like(S)
    for t in range(s0, s1):
        c = t // b
        update(M, S, M2, S2, shapes, offsets, K[t], KH[c], KD[c], min(b, T - c * b), t - c * b,
               theta[t] * uscale[t], t_(1.0) - alpha[t], eta[t])
        M, M2 = M2, M
        S, S2 = S2, S
        if not all_finite(M):
            return t
    return s1 - 1
