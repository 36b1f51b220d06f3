"""Elementwise non-linearities, written once and shared by the memory and the layers.

The exact forms are used everywhere (DESIGN.md): SiLU x·σ(x) and GELU x·Φ(x) with the error
function, not the tanh approximation. The numba kernels implement the same formulas.
"""

import math

import autograd.numpy as anp
from autograd.scipy.special import erf

_INV_SQRT2 = 1.0 / math.sqrt(2.0)  # a Python float, so float32 inputs stay float32


def sigmoid(x):
    r"""Logistic function $\sigma(x) = 1 / (1 + e^{-x})$, written via tanh so it never overflows."""
    return 0.5 * (anp.tanh(0.5 * x) + 1.0)


def silu(x):
    r"""SiLU (swish): $x\,\sigma(x)$."""
    return x * sigmoid(x)


def gelu(x):
    r"""Exact GELU: $x\,\Phi(x) = \tfrac{x}{2}\,(1 + \mathrm{erf}(x/\sqrt{2}))$."""
    return 0.5 * x * (1.0 + erf(x * _INV_SQRT2))


def identity(x):
    return x


ACTIVATIONS = {"silu": silu, "gelu": gelu}
