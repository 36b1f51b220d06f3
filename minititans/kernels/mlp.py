r"""Numba building blocks of the memory $\mathcal{M}$: weights layout, activations, the inner loss.

The twin of :mod:`minititans.memory.models` and :mod:`minititans.memory.loss` for the kernels.
Everything here is dtype-generic (float32 or float64 in, the same dtype out) and compiled
by :func:`minititans.kernels._jit.kernel`.

**Weights layout.** The weights $(W_1, \dots, W_L)$ of one memory are packed into one flat
C-contiguous vector ``flat`` (``(P,)``, or ``(B, P)`` for a batch), with ``shapes``
``(L, 2)`` int64 (fan-in, fan-out of each layer) and ``offsets`` ``(L + 1,)`` int64 so that
``W_i = flat[offsets[i]:offsets[i + 1]].reshape(shapes[i])`` (:func:`layer`, a view).
Momentum $S$ uses the same layout.

**Tapes.** A forward pass over ``n`` rows keeps, per layer $i = 1..L$, the pre-activation
$z_i = h_{i-1} W_i$ ``(n, w_i)`` in a flat tape ``Z`` and $h_i = \sigma(z_i)$ for
$i < L$ in a flat tape ``H``; :func:`tape_view` returns layer ``i``'s block as an
``(n, w_i)`` C-contiguous view (:func:`tape_offsets` gives the block starts).
With ``residual`` the output is $x + \mathrm{LN}(z_L)$ and ``ln[r] = (mean, 1/std)`` of row r.

**The forward and backward pass** (row vectors, $h_0 = x$):

$$z_i = h_{i-1} W_i,\quad h_i = \sigma(z_i)\ (i < L),\quad
  \mathcal{M}(x) = z_L \ \text{or}\ x + \mathrm{LN}(z_L)$$

$$\delta_L = \partial\ell/\partial z_L,\quad
  \delta_i = (\delta_{i+1} W_{i+1}^\top) \odot \sigma'(z_i),\quad
  \nabla_{W_i}\ell = h_{i-1}^\top \delta_i .$$

:func:`mlp_backward` returns the $\delta_i$ (per token, in a tape ``D`` of the layout of
``Z``); the per-token surprise is then the outer products $u_i = h_{i-1}^\top\delta_i$, and a
weighted sum of them over tokens is one GEMM (:func:`weight_grad`).

The scalar functions (:func:`act`, :func:`act_d1`, :func:`act_d2`, :func:`loss_grad`,
:func:`loss_curv`) take integer codes (:data:`ACTIVATION_CODES`, :data:`LOSS_CODES`).
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from ._jit import kernel, specialise

ACTIVATION_CODES = {"silu": 0, "gelu": 1}
LOSS_CODES = {"l2": 0, "dot": 1, "huber": 2, "lp": 3}
LN_EPS = 1e-5  # the LayerNorm epsilon of minititans.memory.models

_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT2PI = 1.0 / math.sqrt(2.0 * math.pi)


# --- weights layout (plain Python) -------------------------------------------------------

ALIGN_BYTES = 64  # one cache line / one AVX-512 register: aligned rows load in one piece


def aligned_zeros(shape, dtype):
    """A C-contiguous zero array whose first element sits on a 64-byte boundary.

    Misaligned 512-bit loads and stores straddle two cache lines; on the benchmark machine
    the fused update loop ran 1.8x slower on misaligned weights.
    """
    dtype = np.dtype(dtype)
    n = int(np.prod(shape))
    buf = np.zeros(n + ALIGN_BYTES // dtype.itemsize, dtype=dtype)
    start = (-buf.ctypes.data % ALIGN_BYTES) // dtype.itemsize
    return buf[start:start + n].reshape(shape)


def padded(n, dtype):
    """``n`` rounded up to a whole number of 64-byte lines of ``dtype``."""
    per_line = ALIGN_BYTES // np.dtype(dtype).itemsize
    return -(-int(n) // per_line) * per_line


def as_kernel_array(x, dtype):
    """``x`` as a C-contiguous, writeable array of ``dtype``, copied only when needed.

    Kernels are compiled per argument type, and numba types read-only and non-contiguous
    arrays differently: passing everything through here means no such input fails or
    compiles (and caches) another specialisation.
    """
    x = np.asarray(x)
    if x.dtype == dtype and x.flags.c_contiguous and x.flags.writeable:
        return x
    return np.array(x, dtype=dtype, order="C")


def pack_weights(weights, dtype):
    """Pack ``[W_1, ..., W_L]`` (each ``(fan_in, fan_out)``) into the flat layout.

    Returns:
        ``(flat (P,), shapes (L, 2) int64, offsets (L + 1,) int64)``; ``flat`` is a new
        C-contiguous array of ``dtype``, 64-byte aligned (:func:`aligned_zeros`).
    """
    shapes = np.array([np.shape(w) for w in weights], dtype=np.int64).reshape(-1, 2)
    offsets = np.zeros(len(shapes) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(shapes[:, 0] * shapes[:, 1])
    flat = aligned_zeros(int(offsets[-1]), dtype)
    for i, w in enumerate(weights):
        flat[offsets[i]:offsets[i + 1]] = np.asarray(w, dtype=dtype).reshape(-1)
    return flat, shapes, offsets


def pack_weights_batched(weights, dtype):
    """Pack weights with a leading batch axis, ``[W_1 (B, ...), ...]``, into ``(B, P_pad)``.

    Each sequence's row starts on a 64-byte boundary: ``P_pad`` is ``P = offsets[-1]``
    rounded up (:func:`padded`); columns ``P:`` are zero padding. ``flat[b]`` is then a
    ``(P_pad,)`` C-contiguous vector in the layout of :func:`pack_weights`.
    """
    B = np.shape(weights[0])[0]
    shapes = np.array([np.shape(w)[1:] for w in weights], dtype=np.int64).reshape(-1, 2)
    offsets = np.zeros(len(shapes) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(shapes[:, 0] * shapes[:, 1])
    flat = aligned_zeros((B, padded(offsets[-1], dtype)), dtype)
    for i, w in enumerate(weights):
        flat[:, offsets[i]:offsets[i + 1]] = np.asarray(w, dtype=dtype).reshape(B, -1)
    return flat, shapes, offsets


def unpack_weights(flat, shapes, offsets):
    """The inverse of :func:`pack_weights` (also of the batched form): a list of new arrays."""
    lead = flat.shape[:-1]
    flat = flat[..., :offsets[-1]]
    return [flat[..., offsets[i]:offsets[i + 1]].reshape(lead + tuple(shapes[i])).copy()
            for i in range(len(shapes))]


def tape_offsets(shapes, n):
    """Starts of each layer's block in a tape over ``n`` rows.

    Returns ``(Z offsets (L + 1,), H offsets (L,))``; ``H``'s total size is ``hoff[-1]``.

    ``Z`` holds $z_1..z_L$ (width ``shapes[i, 1]``), ``H`` holds $h_1..h_{L-1}$.
    Plain NumPy (kernels call the compiled twin ``_tape_offsets``).
    """
    shapes = np.asarray(shapes, dtype=np.int64)
    widths = n * shapes[:, 1]
    zoff = np.concatenate([[0], np.cumsum(widths)]).astype(np.int64)
    hoff = np.concatenate([[0], np.cumsum(widths[:-1])]).astype(np.int64)
    return zoff, hoff


@kernel
def _tape_offsets(shapes, n):
    L = shapes.shape[0]
    zoff = np.zeros(L + 1, dtype=np.int64)
    hoff = np.zeros(L, dtype=np.int64)
    for i in range(L):
        zoff[i + 1] = zoff[i] + n * shapes[i, 1]
        if i < L - 1:
            hoff[i + 1] = hoff[i] + n * shapes[i, 1]
    return zoff, hoff


@kernel
def layer(flat, shapes, offsets, i):
    """$W_i$ as a ``(fan_in, fan_out)`` C-contiguous view into ``flat`` (``(P,)`` or longer)."""
    return flat[offsets[i]:offsets[i + 1]].reshape((shapes[i, 0], shapes[i, 1]))


@kernel
def tape_view(tape, start, n, width):
    """Rows ``(n, width)`` of a flat tape starting at ``start`` (a C-contiguous view)."""
    return tape[start:start + n * width].reshape((n, width))


# --- scalars: activations and the inner loss ---------------------------------------------

# erf and exp are the cost of GELU/SiLU: libm's are scalar calls (~6 ns for erf), which also
# stop LLVM from vectorising the loop around them. For float32 the kernels use branch-free
# versions that vectorise (a few float32 ulp); float64 keeps libm, so float64 kernels match
# the reference to rounding.


def fast_exp(x):
    """$e^x$: libm for float64; a vectorisable Cody-Waite + polynomial version for float32."""
    return math.exp(x)


def fast_erf(x):
    """$\\mathrm{erf}(x)$: libm for float64; a vectorisable rational approximation for float32."""
    return math.erf(x)


@intrinsic
def _float32_from_bits(typingctx, bits):
    """Reinterpret an int32 as the float32 with those bits (to build $2^n$ exactly)."""
    if bits != types.int32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@specialise(fast_exp)
def _fast_exp_impl(x):
    if x != types.float32:
        return lambda x: math.exp(x)

    def exp_f32(x):
        # Cephes expf: e^x = 2^n e^r with |r| <= ln2/2, e^r by a degree-6 polynomial;
        # 2^n = 2^(n//2) 2^(n - n//2) so every factor is a normal float32
        t = np.float32
        xc = min(max(x, t(-104.0)), t(88.73))
        n = math.floor(xc * t(1.4426950408889634) + t(0.5))
        r = xc - n * t(0.693359375) - n * t(-2.12194440e-4)
        y = (((((t(1.9875691500e-4) * r + t(1.3981999507e-3)) * r + t(8.3334519073e-3)) * r
               + t(4.1665795894e-2)) * r + t(1.6666665459e-1)) * r + t(5.0000001201e-1)) * r * r
        y = y + r + t(1.0)
        ni = np.int32(n)
        n1 = np.int32(ni >> 1)
        n2 = np.int32(ni - n1)
        y = y * _float32_from_bits(np.int32((n1 + 127) << 23))
        y = y * _float32_from_bits(np.int32((n2 + 127) << 23))
        return x if x != x else y  # NaN stays NaN

    return exp_f32


@specialise(fast_erf)
def _fast_erf_impl(x):
    if x != types.float32:
        return lambda x: math.erf(x)

    def erf_f32(x):
        # the rational approximation of Eigen / XLA (erf(x) = x P(x^2) / Q(x^2) on [-4, 4],
        # +-1 outside, where float32 erf is +-1 anyway)
        t = np.float32
        xc = min(max(x, t(-4.0)), t(4.0))
        x2 = xc * xc
        p = t(-2.72614225801306e-10) * x2 + t(2.77068142495902e-08)
        p = p * x2 + t(-2.10102402082508e-06)
        p = p * x2 + t(-5.69250639462346e-05)
        p = p * x2 + t(-7.34990630326855e-04)
        p = p * x2 + t(-2.95459980854025e-03)
        p = p * x2 + t(-1.60960333262415e-02)
        q = t(-1.45660718464996e-05) * x2 + t(-2.13374055278905e-04)
        q = q * x2 + t(-1.68282697438203e-03)
        q = q * x2 + t(-7.37332916720468e-03)
        q = q * x2 + t(-1.42647390514189e-02)
        y = xc * p / q
        return x if x != x else y

    return erf_f32


@kernel
def sigmoid(x):
    r"""$1/(1 + e^{-x})$: equal to the reference's tanh form up to rounding, and about four
    times cheaper (``exp`` against ``tanh`` in libm); $e^{-x} = \infty$ gives exactly 0."""
    t = type(x)
    return t(1.0) / (t(1.0) + fast_exp(-x))


@kernel
def act(x, kind):
    r"""$\sigma(x)$: SiLU $x\,\mathrm{sigm}(x)$ (kind 0) or exact GELU $x\,\Phi(x)$ (kind 1)."""
    t = type(x)
    if kind == 0:
        return x * sigmoid(x)
    return t(0.5) * x * (t(1.0) + fast_erf(x * t(_INV_SQRT2)))


@kernel
def act_d1(x, kind):
    r"""$\sigma'(x)$: SiLU $s(1 + x(1 - s))$, $s = \mathrm{sigm}(x)$; GELU $\Phi + x\varphi$."""
    t = type(x)
    if kind == 0:
        s = sigmoid(x)
        return s * (t(1.0) + x * (t(1.0) - s))
    cdf = t(0.5) * (t(1.0) + fast_erf(x * t(_INV_SQRT2)))
    pdf = t(_INV_SQRT2PI) * fast_exp(t(-0.5) * x * x)
    return cdf + x * pdf


@kernel
def act_d2(x, kind):
    r"""$\sigma''(x)$: SiLU $s(1-s)(2 + x(1 - 2s))$; GELU $\varphi(x)(2 - x^2)$."""
    t = type(x)
    if kind == 0:
        s = sigmoid(x)
        return s * (t(1.0) - s) * (t(2.0) + x * (t(1.0) - t(2.0) * s))
    pdf = t(_INV_SQRT2PI) * fast_exp(t(-0.5) * x * x)
    return pdf * (t(2.0) - x * x)


@kernel
def loss_value(o, v, kind, p, delta):
    r"""One channel's term of the inner loss at prediction ``o`` and target ``v``.

    l2 (0): $r^2$; dot (1): $-o v$; huber (2): $r^2$ if $|r| \le \delta$ else
    $2\delta|r| - \delta^2$; lp (3): $|r|^p$; with $r = o - v$.
    """
    t = type(o)
    if kind == 1:
        return -o * v
    r = o - v
    if kind == 0:
        return r * r
    a = abs(r)
    if kind == 2:
        return r * r if a <= delta else t(2.0) * delta * a - delta * delta
    return a ** p


@kernel
def loss_grad(o, v, kind, p, delta):
    r"""$\partial\ell/\partial o$ for one channel (see :func:`loss_value`).

    l2: $2r$; dot: $-v$; huber: $2r$ or $2\delta\,\mathrm{sign}(r)$; lp:
    $p|r|^{p-1}\mathrm{sign}(r)$ (0 at $r = 0$, as autograd gives).
    """
    t = type(o)
    if kind == 1:
        return -v
    r = o - v
    if kind == 0:
        return t(2.0) * r
    sign = t(1.0) if r > 0 else (t(-1.0) if r < 0 else t(0.0))
    a = abs(r)
    if kind == 2:
        return t(2.0) * r if a <= delta else t(2.0) * delta * sign
    return p * a ** (p - t(1.0)) * sign


@kernel
def loss_curv(o, v, kind, p, delta):
    r"""$\partial^2\ell/\partial o^2$ for one channel; $\partial^2\ell/\partial o\,\partial v$ is
    its negative for l2, huber and lp (they depend on $o - v$), and $-1$ for dot.

    l2: 2; dot: 0; huber: 2 inside $[-\delta, \delta]$ else 0; lp: $p(p-1)|r|^{p-2}$
    (0 for $p = 1$; infinite at $r = 0$ when $1 < p < 2$).
    """
    t = type(o)
    if kind == 1:
        return t(0.0)
    r = o - v
    if kind == 0:
        return t(2.0)
    a = abs(r)
    if kind == 2:
        return t(2.0) if a <= delta else t(0.0)
    if p == t(1.0):
        return t(0.0)
    return p * (p - t(1.0)) * a ** (p - t(2.0))


# --- rows: forward, backward, weight gradients -------------------------------------------

@kernel
def mlp_forward(flat, shapes, offsets, act_kind, residual, X, Z, H, ln, out):
    r"""$\mathcal{M}(x)$ for every row of ``X``, keeping the tape.

    Args:
        flat, shapes, offsets: the weights (module docstring).
        act_kind: 0 silu, 1 gelu. residual: bool, $x + \mathrm{LN}(z_L)$.
        X: ``(n, d_in)``.
        Z: tape ``(n * sum(w_i),)``, written: $z_1..z_L$.
        H: tape ``(n * sum_{i<L} w_i,)`` (size >= 1), written: $h_1..h_{L-1}$.
        ln: ``(n, 2)``, written when ``residual``: row mean and $1/\sqrt{\mathrm{var}+\epsilon}$.
        out: ``(n, d_out)``, written.
    """
    n = X.shape[0]
    L = shapes.shape[0]
    zoff, hoff = _tape_offsets(shapes, n)
    for i in range(L):
        W = layer(flat, shapes, offsets, i)
        zi = tape_view(Z, zoff[i], n, shapes[i, 1])
        if i == 0:
            np.dot(X, W, zi)  # (n, w_1)
        else:
            np.dot(tape_view(H, hoff[i - 1], n, shapes[i - 1, 1]), W, zi)
        if i < L - 1:
            hi = tape_view(H, hoff[i], n, shapes[i, 1])
            for r in range(n):
                for j in range(shapes[i, 1]):
                    hi[r, j] = act(zi[r, j], act_kind)
    zL = tape_view(Z, zoff[L - 1], n, shapes[L - 1, 1])
    if residual:
        layer_norm_rows(zL, X, ln, out)
    else:
        out[:, :] = zL


@kernel
def layer_norm_rows(z, x, ln, out):
    r"""``out = x + LN(z)`` row by row, $\mathrm{LN}(z) = (z - \mu)/\sqrt{\mathrm{var} + \epsilon}$;
    stores ``ln[r] = (mu, rstd)``."""
    n, d = z.shape
    t = z.dtype.type
    for r in range(n):
        mu = t(0.0)
        for j in range(d):
            mu += z[r, j]
        mu /= t(d)
        var = t(0.0)
        for j in range(d):
            var += (z[r, j] - mu) * (z[r, j] - mu)
        rstd = t(1.0) / math.sqrt(var / t(d) + t(LN_EPS))
        ln[r, 0] = mu
        ln[r, 1] = rstd
        for j in range(d):
            out[r, j] = x[r, j] + (z[r, j] - mu) * rstd


@kernel
def layer_norm_backward_rows(z, ln, g, dz):
    r"""$\partial\ell/\partial z$ through LN, given $g = \partial\ell/\partial\,\mathrm{LN}(z)$:

    $\mathrm{rstd}\,(g - \bar g - \hat z\,\overline{g\hat z})$,
    $\hat z = (z - \mu)\,\mathrm{rstd}$; ``ln[r] = (mu, rstd)``, writes ``dz``."""
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


@kernel
def loss_grad_rows(out, V, loss_kind, p, delta, G):
    r"""``G = ∂ℓ/∂out`` row by row: ``out``, ``V``, ``G`` ``(n, d_out)``; p, delta in the dtype."""
    n, d = out.shape
    for r in range(n):
        for j in range(d):
            G[r, j] = loss_grad(out[r, j], V[r, j], loss_kind, p, delta)


@kernel
def mlp_backward(flat, shapes, offsets, act_kind, residual, X, Z, H, ln, G, D, GX, want_gx):
    r"""Backpropagate ``G = ∂ℓ/∂M(x)`` ``(n, d_out)`` to every pre-activation (and to ``X``).

    Writes ``D`` (tape of the layout of ``Z``): $\delta_i = \partial\ell/\partial z_i$,
    $\delta_L$ through the LayerNorm when ``residual``, then
    $\delta_i = (\delta_{i+1} W_{i+1}^\top)\odot\sigma'(z_i)$. When ``want_gx``, also
    ``GX`` ``(n, d_in)`` $= \delta_1 W_1^\top$ (plus ``G`` when ``residual``).
    The surprise of row r is $u_i = h_{i-1,r}^\top \delta_{i,r}$ (see :func:`weight_grad`).
    """
    n = X.shape[0]
    L = shapes.shape[0]
    zoff, hoff = _tape_offsets(shapes, n)
    dL = tape_view(D, zoff[L - 1], n, shapes[L - 1, 1])
    if residual:
        layer_norm_backward_rows(tape_view(Z, zoff[L - 1], n, shapes[L - 1, 1]), ln, G, dL)
    else:
        dL[:, :] = G
    for i in range(L - 1, 0, -1):
        W = layer(flat, shapes, offsets, i)
        di = tape_view(D, zoff[i], n, shapes[i, 1])
        dprev = tape_view(D, zoff[i - 1], n, shapes[i - 1, 1])
        np.dot(di, W.T, dprev)  # (n, w_{i-1}) = δ_{i+1} W_{i+1}ᵀ in 1-based terms
        zprev = tape_view(Z, zoff[i - 1], n, shapes[i - 1, 1])
        for r in range(n):
            for j in range(shapes[i - 1, 1]):
                dprev[r, j] *= act_d1(zprev[r, j], act_kind)
    if want_gx:
        np.dot(tape_view(D, zoff[0], n, shapes[0, 1]), layer(flat, shapes, offsets, 0).T, GX)
        if residual:
            for r in range(n):
                for j in range(GX.shape[1]):
                    GX[r, j] += G[r, j]


@kernel
def weight_grad(shapes, offsets, X, H, D, coef, scratch, out_flat):
    r"""$\sum_r c_r\, h_{i-1,r}^\top \delta_{i,r}$ for every layer, into ``out_flat`` ``(P,)``.

    One GEMM per layer: $(h_{i-1} \odot c)^\top \delta_i$.

    Args:
        X, H, D: the input, ``H`` tape and ``D`` tape of :func:`mlp_backward` over n rows.
        coef: ``(n,)`` per-row weights $c_r$.
        scratch: flat ``(n * max fan_in,)`` workspace.
        out_flat: ``(P,)``, overwritten.
    """
    n = X.shape[0]
    L = shapes.shape[0]
    zoff, hoff = _tape_offsets(shapes, n)
    for i in range(L):
        fan_in = shapes[i, 0]
        a = tape_view(scratch, 0, n, fan_in)
        src = X if i == 0 else tape_view(H, hoff[i - 1], n, fan_in)
        for r in range(n):
            for j in range(fan_in):
                a[r, j] = coef[r] * src[r, j]
        np.dot(a.T, tape_view(D, zoff[i], n, shapes[i, 1]), layer(out_flat, shapes, offsets, i))
