r"""The inner loss of the memory and its gradient, the *surprise* (Titans Eqs. 8 and 12).

The associative-memory loss of Eq. 12 is summed, with no ½ and no mean:

$$\ell(\mathcal{M}_{t-1}; x_t) = \lVert \mathcal{M}_{t-1}(k_t) - v_t \rVert_2^2 .$$

Its gradient with respect to the memory's weights is the momentary surprise of Eq. 8. For a
linear memory it is $\nabla_W \ell = 2\,k_t^\top (k_t W - v_t)$. Other *attentional biases*
(the MIRAS view) are loss options: the dot product $-\langle \mathcal{M}(k), v\rangle$ (which
turns the update into linear attention), Huber, and $\ell_p$.
"""

from __future__ import annotations

import autograd.numpy as anp
import numpy as np
from autograd import grad

from .._checks import check_array, check_choice
from .models import forward_per_token, memory_forward, spec_of

LOSSES = ("l2", "dot", "huber", "lp")


def check_loss(loss: str, p: float, delta: float) -> None:
    check_choice("loss", loss, LOSSES)
    for name, val in (("p", p), ("delta", delta)):
        if isinstance(val, bool) or not isinstance(val, (int, float, np.integer, np.floating)):
            raise TypeError(f"{name} must be a float, got {val!r}")
        if not np.isfinite(val):
            raise ValueError(f"{name} must be finite, got {val!r}")
    if loss == "lp" and not (p >= 1.0):
        raise ValueError(f"p must be >= 1 for the lp loss, got {p!r}")
    if loss == "huber" and not (delta > 0.0):
        raise ValueError(f"delta must be > 0 for the huber loss, got {delta!r}")


def _loss_of_prediction(pred, v, loss: str, p: float, delta: float):
    if loss == "dot":
        # -<M(k), v>: its gradient step M += θ kᵀv is linear attention (Eqs. 4–5)
        return -anp.sum(pred * v)
    r = pred - v
    if loss == "l2":
        # Eq. 12: ||M(k) - v||², summed over tokens and channels
        return anp.sum(r**2)
    if loss == "huber":
        # r² inside [-δ, δ], 2δ|r| - δ² outside: continuous, gradient 2r or 2δ·sign(r)
        a = anp.abs(r)
        return anp.sum(anp.where(a <= delta, r**2, 2.0 * delta * a - delta**2))
    # lp: Σ |r|^p
    return anp.sum(anp.abs(r) ** p)


def associative_loss(params, k, v, loss: str = "l2", *, p: float = 3.0, delta: float = 1.0):
    r"""Titans Eq. 12: $\ell = \sum \lVert \mathcal{M}(k) - v \rVert_2^2$, summed over tokens.

    Args:
        params: MemoryParams.
        k: ``(..., d_in)`` keys.
        v: ``(..., d_out)`` values, same leading shape as ``k``.
        loss: "l2" (Eq. 12), "dot" ($-\langle\mathcal{M}(k), v\rangle$), "huber" (threshold
            ``delta``) or "lp" (exponent ``p``).

    Returns:
        A scalar.
    """
    spec = spec_of(params)
    check_loss(loss, p, delta)
    k_arr = check_array("k", k, last_dim=spec.d_in)
    v_arr = check_array("v", v, last_dim=spec.d_out)
    if k_arr.shape[:-1] != v_arr.shape[:-1]:
        raise ValueError(
            f"k and v must have the same leading shape, got {k_arr.shape} and {v_arr.shape}"
        )
    return _loss_of_prediction(memory_forward(params, k), v, loss, p, delta)


def surprise(params, k, v, loss: str = "l2", *, p: float = 3.0, delta: float = 1.0):
    r"""Titans Eq. 8: the momentary surprise $\nabla_\mathcal{M}\,\ell(\mathcal{M}; k, v)$.

    Computed by ``autograd.grad`` of :func:`associative_loss`. For several tokens at once the
    gradients are summed (the loss is a sum); see :func:`per_token_surprise` for one gradient
    per token.

    Returns:
        MemoryParams of the same shapes as ``params``.
    """
    return grad(associative_loss)(params, k, v, loss, p=p, delta=delta)


def _per_token_total(params_b, k, v, loss, p, delta):
    return _loss_of_prediction(forward_per_token(params_b, k), v, loss, p, delta)


def per_token_surprise(params, k, v, loss: str = "l2", *, p: float = 3.0, delta: float = 1.0):
    r"""One surprise per token, all at the same weights: $u_i = \nabla\ell(\mathcal{M}; k_i, v_i)$.

    Every token gets its own copy of the weights; since token i's loss only touches copy i,
    the gradient of the summed loss with respect to the stacked copies is the stack of the
    per-token gradients. This is what the chunked scan needs (Eqs. 16–18).

    Args:
        k: ``(b, d_in)``; v: ``(b, d_out)``.
        loss, p, delta: the inner loss, checked as in :func:`associative_loss`.

    Returns:
        MemoryParams whose weights have a leading axis ``b``.
    """
    spec = spec_of(params)
    check_loss(loss, p, delta)
    k_arr = check_array("k", k, ndim=2, last_dim=spec.d_in)
    v_arr = check_array("v", v, ndim=2, last_dim=spec.d_out)
    if k_arr.shape[0] != v_arr.shape[0]:
        raise ValueError(f"k and v must have the same number of rows, got {k_arr.shape} and "
                         f"{v_arr.shape}")
    b = k_arr.shape[0]
    copies = spec.like(anp.broadcast_to(W[None], (b,) + W.shape) for W in params)
    return grad(_per_token_total)(copies, k, v, loss, p, delta)
