r"""Hessian-vector products of the inner loss, for the outer-loop VJP (Eqs. 8, 12, 14).

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
$\delta_i$ of :mod:`.rows`; the adjoint $\bar z_i$ of the primal $z_i$ runs

$$\bar z_L = \ell''(o)\,\dot o \ (\text{through LN}),\quad
  \bar W_i = \dot h_{i-1}^\top \delta_i + h_{i-1}^\top \bar z_i,\quad
  \bar h_{i-1} = \delta_i \bar u_i^\top + \bar z_i W_i^\top,$$
$$\bar z_{i-1} = \sigma'(z_{i-1})\,\bar h_{i-1} + \sigma''(z_{i-1})\,\dot z_{i-1}\,
  (\delta_i W_i^\top), \qquad \bar k = \bar h_0 ,\qquad
  \bar v = -\ell''(o)\,\dot o\ \ (\text{dot loss: } -\dot o),$$

with the exact second derivatives of :func:`.scalars.act_d2`.

With the residual form $o = x + \mathrm{LN}(z_L)$ the LayerNorm's Jacobian $J$ (symmetric)
gives $\dot o = J\dot z_L$, and its derivative adds
$\nabla_z \langle g, J(z)\,\dot z\rangle = -\tfrac{r}{n}\langle g, \dot o\rangle\,\hat z
 - r\,(\overline{\hat z \dot z}\; J g + \overline{g \hat z}\; J\dot z)$ to $\bar z_L$
($r = 1/\mathrm{std}$, $\hat z = \mathrm{LN}(z)$, bars are means over the $n$ channels).

Everything works on ``n`` rows at once (a chunk of tokens whose gradients share the weights,
Eqs. 16–18, or one token): the products with $W$ are GEMMs. The products with the per-row
$\bar u_r$, $A_{i,r} = h_{i-1,r}\bar u_{i,r}$ (layout of ``Z``) and
$B_{i,r} = \delta_{i,r}\bar u_{i,r}^\top$ (fan-in layout), are given by the caller (it forms
them while it builds $\bar u_r$). The weight cotangent is left as its two factors
$\dot h_{i-1}$ and $\bar z_i$: the chunk adds it with one GEMM a layer
(:func:`add_weight_cotangent`), the token loop folds it into its next pass over the weights.
"""

from __future__ import annotations

import numpy as np

from ._jit import kernel
from .layout import add_rows, copy_rows, layer, tape_view
from .rows import layer_norm_backward_rows, matmul, matmul_t
from .scalars import act_d2, loss_curv, loss_grad


@kernel
def hvp_work_size(shapes, n):
    """Elements of the ``work`` array of :func:`hvp_rows` for ``n`` rows."""
    size, L = 0, shapes.shape[0]
    for i in range(L):
        size = max(size, shapes[i, 0])
    for i in range(L):
        size += shapes[i, 1]
    return n * (size + 3 * shapes[L - 1, 1])


@kernel
def layer_norm_curvature_rows(z, ln, g, zd, od, dL, zbar):
    r"""``zbar += ∇_z ⟨g, J(z) ż⟩`` row by row: the second derivative of the LayerNorm.

    ``z`` pre-norm rows, ``ln`` their (mean, rstd), ``g`` $= \partial\ell/\partial o$,
    ``zd`` $= \dot z$, ``od`` $= J\dot z$, ``dL`` $= J g$; all ``(n, d)``.
    """
    n, d = z.shape
    t = z.dtype.type
    y = np.empty(d, z.dtype)  # the normalised row, LN(z)
    for r in range(n):
        rstd = ln[r, 1]
        for j in range(d):
            y[j] = (z[r, j] - ln[r, 0]) * rstd
        f = np.dot(g[r], od[r]) / t(d)
        m_gy, m_yz = np.dot(g[r], y) / t(d), np.dot(y, zd[r]) / t(d)
        for j in range(d):
            zbar[r, j] -= rstd * (f * y[j] + m_yz * dL[r, j] + m_gy * od[r, j])


@kernel
def hvp_rows(W, spec, key, A, B, HD, ZB, Xbar, Vbar, work):
    r"""Hessian-vector products of the inner loss for the rows ``key`` at ``W`` (module doc).

    Args:
        W: the weights (flat), spec: :class:`.layout.Spec`.
        key: :class:`.layout.KeyRows`, ``n`` keys taped at ``W`` (``D``, ``DH`` included).
        A: tape (layout of ``Z``) of $h_{i-1,r}\bar u_{i,r}$; B: tape (fan-in layout) of
            $\delta_{i,r}\bar u_{i,r}^\top$.
        HD: written, fan-in layout: $\dot h_{i-1}$ ($\dot h_0 = 0$).
        ZB: written, layout of ``Z``: $\bar z_i$. The weight cotangent of layer i is
            $\dot h_{i-1}^\top\delta_i + h_{i-1}^\top\bar z_i$.
        Xbar ``(n, d_in)``, Vbar ``(n, d_out)``: written, $\bar k_r$ and $\bar v_r$.
        work: scratch of :func:`hvp_work_size` elements.
    """
    V, Z, D, HD1, DH, ln, pred = key.V, key.Z, key.D, key.HD1, key.DH, key.ln, key.y
    n, d_out = pred.shape
    shapes, offsets = spec.shapes, spec.offsets
    L = shapes.shape[0]
    zoff, hoff, boff = spec.zoff, spec.hoff, spec.boff
    nz = n * zoff[L]
    ZD = work[:nz]  # ż_i
    od = tape_view(work, nz, n, d_out)  # ȯ = J ż_L
    obar = tape_view(work, nz + n * d_out, n, d_out)
    g = tape_view(work, nz + 2 * n * d_out, n, d_out)
    tmp = work[nz + 3 * n * d_out:]
    # tangent: ż_1 = k ū_1, ḣ_i = σ'(z_i) ż_i, ż_{i+1} = ḣ_i W_{i+1} + h_i ū_{i+1}
    for a in range(n * boff[1]):
        HD[a] = 0
    for i in range(L):
        o = shapes[i, 1]
        zd = tape_view(ZD, n * zoff[i], n, o)
        if i == 0:
            copy_rows(tape_view(A, 0, n, o), zd)
        else:
            matmul(tape_view(HD, n * boff[i], n, shapes[i, 0]), layer(W, shapes, offsets, i), zd)
            add_rows(tape_view(A, n * zoff[i], n, o), zd)
        if i < L - 1:
            hd = tape_view(HD, n * boff[i + 1], n, o)
            d1 = tape_view(HD1, n * hoff[i], n, o)
            for r in range(n):
                for j in range(o):
                    hd[r, j] = d1[r, j] * zd[r, j]
    zL = tape_view(Z, n * zoff[L - 1], n, d_out)
    zdL = tape_view(ZD, n * zoff[L - 1], n, d_out)
    zbL = tape_view(ZB, n * zoff[L - 1], n, d_out)
    if spec.residual:
        layer_norm_backward_rows(zL, ln, zdL, od)
    else:
        copy_rows(zdL, od)
    # ∂/∂o of ⟨∂ℓ/∂o, ȯ⟩: ℓ''(o) ȯ; ∂/∂v: −ℓ''(o) ȯ, or −ȯ for the dot loss (∂ℓ/∂o = −v)
    for r in range(n):
        for j in range(d_out):
            obar[r, j] = loss_curv(pred[r, j], V[r, j], spec.loss_kind, spec.p, spec.delta) \
                * od[r, j]
            Vbar[r, j] = -od[r, j] if spec.loss_kind == 1 else -obar[r, j]
    if spec.residual:
        for r in range(n):
            for j in range(d_out):
                g[r, j] = loss_grad(pred[r, j], V[r, j], spec.loss_kind, spec.p, spec.delta)
        layer_norm_backward_rows(zL, ln, obar, zbL)
        layer_norm_curvature_rows(zL, ln, g, zdL, od, tape_view(D, n * zoff[L - 1], n, d_out),
                                  zbL)
        copy_rows(obar, Xbar)  # o = k + LN(z_L)
    else:
        copy_rows(obar, zbL)
        for r in range(n):
            for j in range(Xbar.shape[1]):
                Xbar[r, j] = 0
    # reverse: z̄_{i-1} = σ'(z_{i-1}) (δ_i ū_iᵀ + z̄_i W_iᵀ) + σ''(z_{i-1}) ż_{i-1} (δ_i W_iᵀ)
    for i in range(L - 1, -1, -1):
        f = shapes[i, 0]
        hbar = tape_view(tmp, 0, n, f)
        matmul_t(tape_view(ZB, n * zoff[i], n, shapes[i, 1]), layer(W, shapes, offsets, i), hbar)
        add_rows(tape_view(B, n * boff[i], n, f), hbar)
        if i == 0:
            add_rows(hbar, Xbar)
            break
        z = tape_view(Z, n * zoff[i - 1], n, f)
        d1 = tape_view(HD1, n * hoff[i - 1], n, f)
        zd = tape_view(ZD, n * zoff[i - 1], n, f)
        dh = tape_view(DH, n * hoff[i - 1], n, f)
        zb = tape_view(ZB, n * zoff[i - 1], n, f)
        for r in range(n):
            for j in range(f):
                zb[r, j] = d1[r, j] * hbar[r, j] + act_d2(z[r, j], spec.act_kind) * zd[r, j] \
                    * dh[r, j]


@kernel
def add_weight_cotangent(Wbar, spec, key, HD, ZB):
    r"""``Wbar`` $\mathrel{+}= \sum_r \dot h_{i-1,r}^\top\delta_{i,r} + h_{i-1,r}^\top\bar z_{i,r}$
    on every layer, from the factors left by :func:`hvp_rows`: one GEMM
    $[\dot h; h]^\top [\delta; \bar z]$ a layer ($\dot h_0 = 0$)."""
    n = key.X.shape[0]
    shapes = spec.shapes
    for i in range(shapes.shape[0]):
        f, o = shapes[i, 0], shapes[i, 1]
        Wb = layer(Wbar, shapes, spec.offsets, i)
        zb = tape_view(ZB, n * spec.zoff[i], n, o)
        if i == 0:
            add_rows(np.dot(key.X.T, zb), Wb)
            continue
        left = np.empty((2 * n, f), Wbar.dtype)
        right = np.empty((2 * n, o), Wbar.dtype)
        copy_rows(tape_view(HD, n * spec.boff[i], n, f), left[:n])
        copy_rows(tape_view(key.H, n * spec.hoff[i - 1], n, f), left[n:])
        copy_rows(tape_view(key.D, n * spec.zoff[i], n, o), right[:n])
        copy_rows(zb, right[n:])
        add_rows(np.dot(left.T, right), Wb)


@kernel
def scale_products(A, B, spec, key, corr, coef):
    r"""$A_i \leftarrow c\,(A_i - \kappa\lVert h_{i-1}\rVert^2\delta_i)$,
    $B_i \leftarrow c\,(B_i - \kappa\lVert\delta_i\rVert^2 h_{i-1})$: the products of
    $\bar u = c\,(\bar S - \kappa u)$ from those of $\bar S$ ($\kappa$ = ``corr``,
    $c$ = ``coef``; $u_i = h_{i-1}^\top\delta_i$) for every row of ``key``."""
    n = key.X.shape[0]
    shapes = spec.shapes
    for i in range(shapes.shape[0]):
        f, o = shapes[i, 0], shapes[i, 1]
        for r in range(n):
            h = key.X[r] if i == 0 else tape_view(key.H, n * spec.hoff[i - 1], n, f)[r]
            d = tape_view(key.D, n * spec.zoff[i], n, o)[r]
            a_i = tape_view(A, n * spec.zoff[i], n, o)[r]
            b_i = tape_view(B, n * spec.boff[i], n, f)[r]
            hh = corr[r] * np.dot(h, h)
            dd = corr[r] * np.dot(d, d)
            for m in range(o):
                a_i[m] = coef[r] * (a_i[m] - hh * d[m])
            for m in range(f):
                b_i[m] = coef[r] * (b_i[m] - dd * h[m])


@kernel
def scale_products_per_layer(A, B, spec, key, kappa, c, theta):
    r""":func:`scale_products` for one row of ``key`` when each layer has its own step
    $\theta_i$ (``theta`` ``(L,)``, Appendix B.3): the products of
    $\bar u_i = c\,(\kappa u_i - \theta_i \bar S_i)$, with
    $\kappa = \sum_j \theta_j\langle\bar S_j, u_j\rangle / \lVert u\rVert^2$ when the clip is
    active (else 0): $A_i \leftarrow c\,(\kappa\lVert h_{i-1}\rVert^2\delta_i - \theta_i A_i)$,
    $B_i \leftarrow c\,(\kappa\lVert\delta_i\rVert^2 h_{i-1} - \theta_i B_i)$."""
    shapes = spec.shapes
    for i in range(shapes.shape[0]):
        f, o = shapes[i, 0], shapes[i, 1]
        h = key.X[0] if i == 0 else tape_view(key.H, spec.hoff[i - 1], 1, f)[0]
        d = tape_view(key.D, spec.zoff[i], 1, o)[0]
        a_i = tape_view(A, spec.zoff[i], 1, o)[0]
        b_i = tape_view(B, spec.boff[i], 1, f)[0]
        hh = kappa * np.dot(h, h)
        dd = kappa * np.dot(d, d)
        for m in range(o):
            a_i[m] = c * (hh * d[m] - theta[i] * a_i[m])
        for m in range(f):
            b_i[m] = c * (dd * h[m] - theta[i] * b_i[m])
