r"""The scalar functions of the kernels: activations and their derivatives, the inner loss.

Twins of :mod:`minititans.activations` (SiLU $x\,\mathrm{sigm}(x)$, exact GELU
$x\,\Phi(x)$) and of the per-channel terms of the inner loss of
:mod:`minititans.memory.loss` (Eq. 12), with the derivatives the hand-written gradients
need. They take integer codes (:data:`ACTIVATION_CODES`, :data:`LOSS_CODES`) and work in
float32 or float64 (the same dtype out).
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


def _exp_f32(x):
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


def _erf_f32(x):
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


@specialise(fast_exp)
def _fast_exp_impl(x):
    return _exp_f32 if x == types.float32 else (lambda x: math.exp(x))


@specialise(fast_erf)
def _fast_erf_impl(x):
    return _erf_f32 if x == types.float32 else (lambda x: math.erf(x))


@kernel
def sigmoid(x):
    r"""$1/(1 + e^{-x})$: equal to the reference's tanh form up to rounding, and about four
    times cheaper (``exp`` against ``tanh`` in libm); $e^{-x} = \infty$ gives exactly 0."""
    t = type(x)
    return t(1.0) / (t(1.0) + fast_exp(-x))


@kernel
def hidden(z, h, hd, act_kind, want_d1):
    r"""$h = \sigma(z)$ and, when ``want_d1``, $\sigma'(z)$ for a vector ``z`` (in place is fine).

    SiLU (kind 0): $\sigma = z s$, $\sigma' = s(1 + z(1 - s))$ with $s = \mathrm{sigm}(z)$;
    GELU (kind 1): $\sigma = z\Phi(z)$, $\sigma' = \Phi(z) + z\varphi(z)$. The two share
    their exp/erf.
    """
    t = z.dtype.type
    n = z.shape[0]
    if act_kind == 0:
        for j in range(n):
            s = t(1.0) / (t(1.0) + fast_exp(-z[j]))  # sigmoid, inline so the loop vectorises
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
def act_d2(x, kind):
    r"""$\sigma''(x)$: SiLU $s(1-s)(2 + x(1 - 2s))$; GELU $\varphi(x)(2 - x^2)$."""
    t = type(x)
    if kind == 0:
        s = sigmoid(x)
        return s * (t(1.0) - s) * (t(2.0) + x * (t(1.0) - t(2.0) * s))
    pdf = t(_INV_SQRT2PI) * fast_exp(t(-0.5) * x * x)
    return pdf * (t(2.0) - x * x)


@kernel
def loss_grad(o, v, kind, p, delta):
    r"""$\partial\ell/\partial o$ for one channel of the inner loss (Eq. 12), $r = o - v$.

    The terms: l2 $r^2$; dot $-o v$; huber $r^2$ if $|r| \le \delta$ else
    $2\delta|r| - \delta^2$; lp $|r|^p$. Their derivatives:
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
