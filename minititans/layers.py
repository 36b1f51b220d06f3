r"""The pieces of a Titans block (Titans Section 4.4, Eqs. 1 and 19).

Section 4.4 lists them: residual connections in every block; SiLU after the $q, k, v$
projections; $\ell_2$-normalised $q$ and $k$; a depthwise causal 1-D convolution after each
projection; normalisation and a linear gate before the output projection. Persistent memory
(Eq. 19) prepends learnable tokens. Each layer is a pair ``init_x(rng, ...) -> params`` (a
dict of arrays) and ``x(params, inputs)``, a pure function autograd can differentiate.
"""

from __future__ import annotations

import autograd.numpy as anp
import numpy as np
from autograd.extend import defvjp, primitive

from ._checks import check_array, check_float_dtype, check_int, check_rng
from .activations import sigmoid, silu

__all__ = [
    "init_linear", "linear", "silu", "l2_normalize", "init_depthwise_conv", "depthwise_conv",
    "init_rms_norm", "rms_norm", "init_layer_norm", "layer_norm", "init_output_gate",
    "output_gate", "init_persistent", "prepend_persistent", "residual",
]

NORM_EPS = 1e-6  # RMSNorm / LayerNorm epsilon, inside the square root


def _check_eps(eps):
    # a negative eps takes the square root of a negative number for a small row: NaN
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.floating)) or not eps >= 0:
        raise ValueError(f"eps must be a float >= 0, got {eps!r}")


def init_linear(rng, d_in: int, d_out: int, bias: bool = False, *, dtype=np.float64):
    r"""A projection $x W (+ b)$, $W \sim \mathcal{N}(0, 1/d_{in})$, $b = 0$.

    Returns:
        ``{"W": (d_in, d_out)}``, plus ``"b": (d_out,)`` if ``bias``.
    """
    check_rng(rng)
    d_in = check_int("d_in", d_in, minimum=1)
    d_out = check_int("d_out", d_out, minimum=1)
    dtype = check_float_dtype(dtype)
    p = {"W": (rng.standard_normal((d_in, d_out)) / np.sqrt(d_in)).astype(dtype)}
    if bias:
        p["b"] = np.zeros(d_out, dtype)
    return p


def linear(p, x):
    r"""Titans Eq. 1: $Q = x W_Q$ (and likewise $K$, $V$, any projection), plus $b$ if present.

    Args:
        p: from :func:`init_linear`; x: ``(..., d_in)``.

    Returns:
        ``(..., d_out)``.
    """
    check_array("x", x, last_dim=np.shape(p["W"])[0])
    y = x @ p["W"]
    return y + p["b"] if "b" in p else y


def l2_normalize(x, eps: float = 1e-6):
    r"""Section 4.4's $\ell_2$-normalised $q$ and $k$: $x / \sqrt{\lVert x \rVert_2^2 + \epsilon}$.

    $\epsilon$ sits inside the square root (as in flash-linear-attention) so the map is
    smooth at $x = 0$ and its gradient is finite there.

    Args:
        x: ``(..., d)``, normalised along the last axis.

    Returns:
        ``(..., d)``.
    """
    _check_eps(eps)
    check_array("x", x)
    return x / anp.sqrt(anp.sum(x * x, axis=-1, keepdims=True) + eps)


def init_depthwise_conv(rng, channels: int, kernel_size: int = 4, bias: bool = True, *,
                        dtype=np.float64):
    r"""A depthwise causal convolution: a $K$-tap filter per channel, $w \sim \mathcal{N}(0, 1/K)$.

    Returns:
        ``{"w": (K, C)}``, plus ``"b": (C,)`` (zeros) if ``bias``. ``w[j]`` multiplies
        $x_{t-j}$.
    """
    check_rng(rng)
    C = check_int("channels", channels, minimum=1)
    K = check_int("kernel_size", kernel_size, minimum=1)
    dtype = check_float_dtype(dtype)
    p = {"w": (rng.standard_normal((K, C)) / np.sqrt(K)).astype(dtype)}
    if bias:
        p["b"] = np.zeros(C, dtype)
    return p


@primitive
def _causal_taps(w, xp):
    r"""$y_t = \sum_j w_j \odot x'_{K-1+t-j}$ for the padded input ``xp`` ``(..., K-1+T, C)``.

    One autograd node with its own VJP: slicing a box once per tap would cost a scatter
    into a zero array of ``xp``'s size per tap in the backward pass.
    """
    K, T = w.shape[0], xp.shape[-2] - w.shape[0] + 1
    y = w[0] * xp[..., K - 1:K - 1 + T, :]
    for j in range(1, K):  # tap j reads x_{t-j}, at row K - 1 + t - j of the padded input
        y = y + w[j] * xp[..., K - 1 - j:K - 1 - j + T, :]
    return y


def _taps_vjp_w(ans, w, xp):
    K, T = w.shape[0], xp.shape[-2] - w.shape[0] + 1
    lead = tuple(range(xp.ndim - 1))  # every axis but the channels
    return lambda g: np.stack([np.sum(g * xp[..., K - 1 - j:K - 1 - j + T, :], axis=lead)
                               for j in range(K)])


def _taps_vjp_xp(ans, w, xp):
    K, T = w.shape[0], xp.shape[-2] - w.shape[0] + 1

    def vjp(g):
        out = np.zeros(np.shape(xp), dtype=np.result_type(g, w))
        for j in range(K):
            out[..., K - 1 - j:K - 1 - j + T, :] += w[j] * g
        return out

    return vjp


defvjp(_causal_taps, _taps_vjp_w, _taps_vjp_xp)


def depthwise_conv(p, x, state=None):
    r"""Section 4.4's depthwise causal 1-D convolution (kernel 4 in the NeurIPS version).

    $$y_t = \sum_{j=0}^{K-1} w_j \odot x_{t-j} \;(+\, b)$$

    with $x_{t-j}$ for $t - j < 0$ taken from ``state`` (the last $K-1$ inputs of the
    previous call, oldest first) or zero. Streaming token by token with the returned state
    equals one call on the whole sequence. Leading axes (a batch) are carried along: each
    sequence has its own state.

    Args:
        p: from :func:`init_depthwise_conv`, ``w`` ``(K, C)``.
        x: ``(..., T, C)``.
        state: ``None`` or ``(..., K - 1, C)``.

    Returns:
        ``(y, new_state)``: ``y`` ``(..., T, C)``, ``new_state`` ``(..., K - 1, C)`` (the
        last $K-1$ rows of ``state ‖ x``).
    """
    K, C = np.shape(p["w"])
    x_ = check_array("x", x, last_dim=C)
    if x_.ndim < 2:
        raise ValueError(f"x must have shape (..., T, {C}), got shape {x_.shape}")
    lead = x_.shape[:-2]
    if state is None:
        state = np.zeros(lead + (K - 1, C), x_.dtype)
    elif check_array("state", state).shape != lead + (K - 1, C):
        raise ValueError(f"state must have shape {lead + (K - 1, C)} (..., kernel_size - 1, "
                         f"channels), got {np.shape(state)}")
    xp = anp.concatenate([state, x], axis=-2)  # (..., K - 1 + T, C)
    y = _causal_taps(p["w"], xp)  # (..., T, C): tap j reads x_{t-j}
    if "b" in p:
        y = y + p["b"]
    return y, xp[..., xp.shape[-2] - (K - 1):, :]


def init_rms_norm(rng, d: int, *, dtype=np.float64):
    """RMSNorm gain ``{"g": ones (d,)}`` (``rng`` is unused; kept for one init signature)."""
    check_rng(rng)
    return {"g": np.ones(check_int("d", d, minimum=1), check_float_dtype(dtype))}


def rms_norm(p, x, eps: float = NORM_EPS):
    r"""RMSNorm over the last axis: $g \odot x / \sqrt{\mathrm{mean}(x^2) + \epsilon}$.

    Args:
        p: from :func:`init_rms_norm`; x: ``(..., d)``.

    Returns:
        ``(..., d)``.
    """
    _check_eps(eps)
    check_array("x", x, last_dim=np.shape(p["g"])[0])
    return p["g"] * x / anp.sqrt(anp.mean(x * x, axis=-1, keepdims=True) + eps)


def init_layer_norm(rng, d: int, *, dtype=np.float64):
    """LayerNorm gain and bias ``{"g": ones (d,), "b": zeros (d,)}`` (``rng`` unused)."""
    check_rng(rng)
    d = check_int("d", d, minimum=1)
    return {"g": np.ones(d, check_float_dtype(dtype)), "b": np.zeros(d, check_float_dtype(dtype))}


def layer_norm(p, x, eps: float = NORM_EPS):
    r"""LayerNorm over the last axis: $g \odot (x - \mu) / \sqrt{\sigma^2 + \epsilon} + b$.

    Args:
        p: from :func:`init_layer_norm`; x: ``(..., d)``.

    Returns:
        ``(..., d)``.
    """
    _check_eps(eps)
    check_array("x", x, last_dim=np.shape(p["g"])[0])
    mu = anp.mean(x, axis=-1, keepdims=True)
    var = anp.mean((x - mu) ** 2, axis=-1, keepdims=True)
    return p["g"] * (x - mu) / anp.sqrt(var + eps) + p["b"]


def init_output_gate(rng, d: int, d_x=None, *, dtype=np.float64):
    r"""The output gate's RMSNorm gain and gate projection $W_g \sim \mathcal{N}(0, 1/d_x)$.

    Returns:
        ``{"norm": {"g": (d,)}, "W_g": (d_x, d)}``; ``d_x`` defaults to ``d``.
    """
    d_x = d if d_x is None else d_x
    return {"norm": init_rms_norm(rng, d, dtype=dtype),
            "W_g": init_linear(rng, d_x, d, dtype=dtype)["W"]}


def output_gate(p, y, x):
    r"""Section 4.4's "normalisation and a linear gate before the output projection".

    $$o = \mathrm{RMSNorm}(y) \odot \sigma(x W_g)$$

    ``y`` is the branch output (attention or memory), ``x`` the block input that decides how
    much of each channel passes. The output projection (a :func:`linear`) follows, outside.

    Args:
        p: from :func:`init_output_gate`; y: ``(..., d)``; x: ``(..., d_x)``.

    Returns:
        ``(..., d)``.
    """
    check_array("x", x, last_dim=np.shape(p["W_g"])[0])
    return rms_norm(p["norm"], y) * sigmoid(x @ p["W_g"])


def init_persistent(rng, num_tokens: int, d: int, *, dtype=np.float64):
    r"""$N_p$ learnable persistent tokens, rows $\sim \mathcal{N}(0, I/d)$ (about unit norm).

    Returns:
        ``{"P": (num_tokens, d)}``; ``num_tokens = 0`` gives the "w/o persistent" ablation.
    """
    check_rng(rng)
    n = check_int("num_tokens", num_tokens, minimum=0)
    d = check_int("d", d, minimum=1)
    return {"P": (rng.standard_normal((n, d)) / np.sqrt(d)).astype(check_float_dtype(dtype))}


def prepend_persistent(p, x):
    r"""Titans Eq. 19: $x_{new} = [p_1 \dots p_{N_p}] \,\|\, x$.

    Args:
        p: from :func:`init_persistent`, ``P`` ``(N_p, d)``; x: ``(..., T, d)``.

    Returns:
        ``(..., N_p + T, d)``; the same tokens lead every sequence of a batch.
    """
    n, d = np.shape(p["P"])
    x_ = check_array("x", x, last_dim=d)
    if x_.ndim < 2:
        raise ValueError(f"x must have shape (..., T, {d}), got shape {x_.shape}")
    lead = x_.shape[:-2]
    # reshape first: autograd can broadcast_to over axes of size 1, not over new leading axes
    P = anp.broadcast_to(anp.reshape(p["P"], (1,) * len(lead) + (n, d)), lead + (n, d))
    return anp.concatenate([P, x], axis=-2)  # (..., N_p + T, d)


def residual(f, x):
    """Section 4.4's residual connection: $x + f(x)$."""
    return x + f(x)
