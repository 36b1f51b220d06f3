r"""Second-order building blocks of the memory for the outer-loop VJP (Titans Eqs. 8, 12, 14).

The scan writes the surprise $u = \nabla_W \ell(W; k, v)$ into the memory (Eq. 14), so the
gradient of an outer loss must go *through* a gradient: given a cotangent $\bar u$ of $u$
(same shapes as $W$), we need

$$\bar W = \nabla_W \langle \bar u, \nabla_W \ell \rangle, \quad
  \bar k = \nabla_k \langle \bar u, \nabla_W \ell \rangle, \quad
  \bar v = \nabla_v \langle \bar u, \nabla_W \ell \rangle,$$

a Hessian-vector product. It is computed *reverse-over-forward*: push the tangent
$\dot W = \bar u$ forward through the memory ($\dot z_i = \dot h_{i-1} W_i + h_{i-1}\bar u_i$,
$\dot h_i = \sigma'(z_i)\,\dot z_i$, $\dot h_0 = 0$), so that
$\langle \bar u, \nabla_W\ell\rangle = \langle \partial\ell/\partial o, \dot o\rangle$, then
differentiate that scalar. The adjoint of $\dot z_i$ is the ordinary back-propagated
$\delta_i$ of :mod:`.mlp`; the adjoint $\bar z_i$ of the primal $z_i$ runs

$$\bar z_L = \ell''(o)\,\dot o \ (\text{through LN}),\quad
  \bar W_i = \dot h_{i-1}^\top \delta_i + h_{i-1}^\top \bar z_i,\quad
  \bar h_{i-1} = \delta_i \bar u_i^\top + \bar z_i W_i^\top,$$
$$\bar z_{i-1} = \sigma'(z_{i-1})\,\bar h_{i-1} + \sigma''(z_{i-1})\,\dot z_{i-1}\,
  (\delta_i W_i^\top), \qquad \bar k = \bar h_0 ,\qquad
  \bar v = -\ell''(o)\,\dot o\ \ (\text{dot loss: } -\dot o),$$

with the exact second derivatives of :func:`.mlp.act_d2`: GELU $\varphi(x)(2 - x^2)$, SiLU
$s(1-s)(2 + x(1-2s))$, $s$ the logistic function.

With the residual form $o = x + \mathrm{LN}(z_L)$ the LayerNorm's Jacobian $J$ (symmetric)
gives $\dot o = J\dot z_L$, and its derivative adds
$\nabla_z \langle g, J(z)\,\dot z\rangle = -\tfrac{r}{n}\langle g, \dot o\rangle\,\hat z
 - r\,(\overline{\hat z \dot z}\; J g + \overline{g \hat z}\; J\dot z)$ to $\bar z_L$
($r = 1/\mathrm{std}$, $\hat z = \mathrm{LN}(z)$, bars are means over the $n$ channels).

Everything works on ``n`` rows at once (a chunk of tokens whose gradients share the weights,
Eqs. 16-18): the products with $W$ are GEMMs. The products with the per-row $\bar u_r$,
$A_{i,r} = h_{i-1,r}\bar u_{i,r}$ and $B_{i,r} = \delta_{i,r}\bar u_{i,r}^\top$, are given
by the caller (it forms them while it builds $\bar u_r$). Tapes use the layout of
:mod:`.mlp`; ``B`` blocks have the fan-in widths (:func:`in_offsets`). The small row helpers
at the end are loops rather than slice assignments, which numba compiles much faster.
"""

from __future__ import annotations

import numpy as np

from ._jit import kernel
from .mlp import (
    _tape_offsets,
    act_d2,
    layer,
    layer_norm_backward_rows,
    layer_norm_rows,
    loss_curv,
    loss_grad,
    tape_view,
)


@kernel
def in_offsets(shapes, n):
    """Block starts ``(L + 1,)`` of a tape over ``n`` rows with the fan-in width of each layer."""
    L = shapes.shape[0]
    off = np.zeros(L + 1, dtype=np.int64)
    for i in range(L):
        off[i + 1] = off[i] + n * shapes[i, 0]
    return off


@kernel
def mlp_deltas(flat, shapes, offsets, residual, Z, ln, HD1, G, D, DH):
    r"""Back-propagate ``G = ∂ℓ/∂M(x)`` ``(n, d_out)``: $\delta_i$ into ``D``, and
    $\delta_{i+1}W_{i+1}^\top$ into ``DH``.

    :func:`minititans.kernels.mlp.mlp_backward` without the input gradient, given the taped
    $\sigma'(z_i)$ ``HD1`` (layout of the ``H`` tape), and keeping also ``DH`` (same layout):
    $\partial\ell/\partial h_i$, which the Hessian-vector product multiplies by $\sigma''$.
    """
    n = G.shape[0]
    L = shapes.shape[0]
    zoff, hoff = _tape_offsets(shapes, n)
    dL = tape_view(D, zoff[L - 1], n, shapes[L - 1, 1])
    if residual:
        layer_norm_backward_rows(tape_view(Z, zoff[L - 1], n, shapes[L - 1, 1]), ln, G, dL)
    else:
        copy_rows(G, dL)
    for i in range(L - 1, 0, -1):
        w = shapes[i - 1, 1]
        dh = tape_view(DH, hoff[i - 1], n, w)
        np.dot(tape_view(D, zoff[i], n, shapes[i, 1]), layer(flat, shapes, offsets, i).T, dh)
        dprev = tape_view(D, zoff[i - 1], n, w)
        d1 = tape_view(HD1, hoff[i - 1], n, w)
        for r in range(n):
            for j in range(w):
                dprev[r, j] = dh[r, j] * d1[r, j]


@kernel
def layer_norm_curvature_rows(z, ln, g, zd, od, dL, zbar):
    r"""``zbar += ∇_z ⟨g, J(z) ż⟩`` row by row: the second derivative of the LayerNorm.

    ``z`` pre-norm rows, ``ln`` their (mean, rstd), ``g`` $= \partial\ell/\partial o$,
    ``zd`` $= \dot z$, ``od`` $= J\dot z$, ``dL`` $= J g$; all ``(n, d)``.
    """
    n, d = z.shape
    t = z.dtype.type
    for r in range(n):
        mu = ln[r, 0]
        rstd = ln[r, 1]
        f = t(0.0)
        m_gy = t(0.0)
        m_yz = t(0.0)
        for j in range(d):
            y = (z[r, j] - mu) * rstd
            f += g[r, j] * od[r, j]
            m_gy += g[r, j] * y
            m_yz += y * zd[r, j]
        m_gy /= t(d)
        m_yz /= t(d)
        for j in range(d):
            y = (z[r, j] - mu) * rstd
            zbar[r, j] -= rstd * (f / t(d) * y + m_yz * dL[r, j] + m_gy * od[r, j])


@kernel
def mlp_hvp_rows(flat, shapes, offsets, act_kind, residual, loss_kind, p, delta,
                 X, Vv, Z, H, D, DH, HD1, ln, pred, A, B, Wbar, Xbar, Vbar):
    r"""Hessian-vector products of the inner loss for ``n`` rows at the same weights (module doc).

    Args:
        flat, shapes, offsets: the weights $W$ (:mod:`.mlp` layout).
        act_kind, residual, loss_kind, p, delta: the memory and its inner loss.
        X ``(n, d_in)`` keys, Vv ``(n, d_out)`` values; Z, H, D, DH, HD1, ln, pred: their
            forward tapes at $W$ (:func:`mlp_deltas`), ``pred`` $= \mathcal{M}(x)$ ``(n, d_out)``.
        A: tape (layout of ``Z``) of $h_{i-1,r}\bar u_{i,r}$; B: tape (:func:`in_offsets`)
            of $\delta_{i,r}\bar u_{i,r}^\top$.
        Wbar: ``(P,)``, $\sum_r \bar W_r$ is added to it.
        Xbar ``(n, d_in)``, Vbar ``(n, d_out)``: overwritten with $\bar k_r$, $\bar v_r$.
    """
    n = X.shape[0]
    L = shapes.shape[0]
    zoff, hoff = _tape_offsets(shapes, n)
    boff = in_offsets(shapes, n)
    d_out = shapes[L - 1, 1]
    ZD = np.empty(zoff[L], flat.dtype)  # ż_i
    HD = np.empty(max(hoff[L - 1], 1), flat.dtype)  # ḣ_i
    # tangent: ż_1 = k ū_1, ḣ_i = σ'(z_i) ż_i, ż_{i+1} = ḣ_i W_{i+1} + h_i ū_{i+1}
    for i in range(L):
        o = shapes[i, 1]
        zd = tape_view(ZD, zoff[i], n, o)
        a_i = tape_view(A, zoff[i], n, o)
        if i == 0:
            copy_rows(a_i, zd)
        else:
            np.dot(tape_view(HD, hoff[i - 1], n, shapes[i - 1, 1]),
                   layer(flat, shapes, offsets, i), zd)
            add_rows(a_i, zd)
        if i < L - 1:
            hd = tape_view(HD, hoff[i], n, o)
            d1 = tape_view(HD1, hoff[i], n, o)
            for r in range(n):
                for j in range(o):
                    hd[r, j] = d1[r, j] * zd[r, j]
    zL = tape_view(Z, zoff[L - 1], n, d_out)
    zdL = tape_view(ZD, zoff[L - 1], n, d_out)
    od = np.empty((n, d_out), flat.dtype)  # ȯ = J ż_L
    if residual:
        layer_norm_backward_rows(zL, ln, zdL, od)
    else:
        copy_rows(zdL, od)
    # ∂/∂o of ⟨∂ℓ/∂o, ȯ⟩: ℓ''(o) ȯ; ∂/∂v: −ℓ''(o) ȯ, or −ȯ for the dot loss (∂ℓ/∂o = −v)
    obar = np.empty((n, d_out), flat.dtype)
    for r in range(n):
        for j in range(d_out):
            obar[r, j] = loss_curv(pred[r, j], Vv[r, j], loss_kind, p, delta) * od[r, j]
            Vbar[r, j] = -od[r, j] if loss_kind == 1 else -obar[r, j]
    zbar = np.empty((n, d_out), flat.dtype)
    if residual:
        g = np.empty((n, d_out), flat.dtype)
        for r in range(n):
            for j in range(d_out):
                g[r, j] = loss_grad(pred[r, j], Vv[r, j], loss_kind, p, delta)
        layer_norm_backward_rows(zL, ln, obar, zbar)
        layer_norm_curvature_rows(zL, ln, g, zdL, od, tape_view(D, zoff[L - 1], n, d_out), zbar)
        copy_rows(obar, Xbar)  # o = k + LN(z_L)
    else:
        copy_rows(obar, zbar)
        for r in range(n):
            for j in range(Xbar.shape[1]):
                Xbar[r, j] = 0
    # reverse: W̄_i = ḣ_{i-1}ᵀ δ_i + h_{i-1}ᵀ z̄_i, then z̄_{i-1} (module doc)
    for i in range(L - 1, -1, -1):
        fan_in = shapes[i, 0]
        Wb = layer(Wbar, shapes, offsets, i)
        hin = X if i == 0 else tape_view(H, hoff[i - 1], n, fan_in)
        if i == 0:  # ḣ_0 = 0
            _add_outer(Wb, hin, zbar)
        elif n == 1:
            _add_outer(Wb, tape_view(HD, hoff[i - 1], n, fan_in),
                       tape_view(D, zoff[i], n, shapes[i, 1]))
            _add_outer(Wb, hin, zbar)
        else:  # one GEMM: [ḣ; h]ᵀ [δ; z̄]
            left = np.empty((2 * n, fan_in), flat.dtype)
            right = np.empty((2 * n, shapes[i, 1]), flat.dtype)
            copy_rows(tape_view(HD, hoff[i - 1], n, fan_in), left[:n])
            copy_rows(hin, left[n:])
            copy_rows(tape_view(D, zoff[i], n, shapes[i, 1]), right[:n])
            copy_rows(zbar, right[n:])
            _add_outer(Wb, left, right)
        hbar = np.dot(zbar, layer(flat, shapes, offsets, i).T)  # (n, fan_in)
        add_rows(tape_view(B, boff[i], n, fan_in), hbar)
        if i == 0:
            add_rows(hbar, Xbar)
        else:
            z = tape_view(Z, zoff[i - 1], n, fan_in)
            d1 = tape_view(HD1, hoff[i - 1], n, fan_in)
            zd = tape_view(ZD, zoff[i - 1], n, fan_in)
            dh = tape_view(DH, hoff[i - 1], n, fan_in)
            zbar = np.empty((n, fan_in), flat.dtype)
            for r in range(n):
                for j in range(fan_in):
                    zbar[r, j] = act_d2(z[r, j], act_kind)
                for j in range(fan_in):
                    zbar[r, j] = d1[r, j] * hbar[r, j] + zbar[r, j] * zd[r, j] * dh[r, j]


@kernel
def _add_outer(W, X, Y):
    """``W += Xᵀ Y`` for ``X`` ``(n, a)``, ``Y`` ``(n, b)``: a rank-1 loop for one row, else
    a GEMM."""
    if X.shape[0] == 1:
        x = X[0]
        y = Y[0]
        for a in range(W.shape[0]):
            xa = x[a]
            row = W[a]
            for j in range(W.shape[1]):
                row[j] += xa * y[j]
    else:
        add_rows(np.dot(X.T, Y), W)


@kernel
def output_rows(zL, X, residual, ln, out):
    """``out = z_L`` or ``X + LN(z_L)`` row by row (the memory's output; ``ln`` is written)."""
    if residual:
        layer_norm_rows(zL, X, ln, out)
    else:
        copy_rows(zL, out)


@kernel
def copy_rows(src, dst):
    """``dst = src`` for 2-d arrays of one shape (a loop: no broadcasting machinery)."""
    for r in range(src.shape[0]):
        for j in range(src.shape[1]):
            dst[r, j] = src[r, j]


@kernel
def add_rows(src, dst):
    """``dst += src`` for 2-d arrays of one shape."""
    for r in range(src.shape[0]):
        for j in range(src.shape[1]):
            dst[r, j] += src[r, j]


@kernel
def mul_rows(src, dst):
    """``dst *= src`` (elementwise) for 2-d arrays of one shape."""
    for r in range(src.shape[0]):
        for j in range(src.shape[1]):
            dst[r, j] *= src[r, j]
