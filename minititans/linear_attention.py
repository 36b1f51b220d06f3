r"""Linear attention and the delta rule: memories that are a matrix (Titans Eqs. 3–5, Appendix C).

Replacing the softmax of Eq. 2 by a kernel $\phi(q)\phi(k)^\top$ lets the sum over the past
be carried in a matrix (Eqs. 3–5):

$$M_t = M_{t-1} + \phi(k_t)^\top v_t, \qquad y_t = \phi(q_t)\, M_t .$$

Both forms are here and are tested equal: :func:`linear_attention_parallel` (the masked
$T \times T$ product, what one trains with) and :func:`linear_attention_recurrent` (the
matrix state, what one streams with). The delta rule (DeltaNet) replaces the additive write
by one gradient step on $\lVert k_t W - v_t \rVert^2$; Appendix C shows it is the Titans
memory with a linear $\mathcal{M}$ and no momentum. :func:`gated_delta_rule` is Gated
DeltaNet's placement of the forgetting gate, for comparison.
"""

from __future__ import annotations

import autograd.numpy as anp
import numpy as np

from ._checks import (
    DELTA_HINT,
    DELTA_WHAT,
    FEATURE_MAPS,
    LINEAR_HINT,
    LINEAR_WHAT,
    ON_NONFINITE,
    all_finite,
    cast_gate,
    check_array,
    check_bool,
    check_choice,
    check_gate,
    check_qkv,
    check_qkv_rows,
    check_recurrence,
    diverged_reason,
    first_nonfinite_token,
    value_of,
    weight_bound,
    weights_diverged,
)


def apply_feature_map(x, feature_map: str = "identity"):
    r"""The kernel feature map $\phi$: ``"identity"``, or ``"elu1"`` $= \mathrm{elu}(x) + 1$.

    elu1 (Katharopoulos et al. 2020) is $x + 1$ for $x > 0$ and $e^x$ otherwise: positive,
    so the normaliser of Eq. 3 never vanishes.
    """
    check_choice("feature_map", feature_map, FEATURE_MAPS)
    if feature_map == "identity":
        return x
    # exp of the clipped value so positive x never overflows in the discarded branch
    return anp.where(x > 0, x + 1.0, anp.exp(anp.minimum(x, 0.0)))


def _check_qkv(q, k, v):
    q_, _, v_ = check_qkv(q, k, v)
    return q_, v_


def linear_attention_parallel(q, k, v, feature_map: str = "identity", normalize: bool = False,
                              *, on_nonfinite: str = "raise"):
    r"""Titans Eqs. 3–5 in parallel form: $y = \mathrm{tril}(\phi(Q)\phi(K)^\top)\, V$.

    $$y_t = \frac{\phi(q_t) \sum_{j \le t} \phi(k_j)^\top v_j}
                 {\phi(q_t) \sum_{l \le t} \phi(k_l)^\top}$$

    with the denominator only when ``normalize=True`` (Eq. 3); without it this is Eqs. 4–5.
    With ``feature_map="identity"`` the normaliser can be zero or negative: normalise with
    ``"elu1"``.

    Args:
        q, k: ``(..., T, d)``; v: ``(..., T, d_v)``.
        feature_map: ``"identity"`` or ``"elu1"``.
        normalize: divide by the kernel sum (Eq. 3), True or False.
        on_nonfinite: "raise" (default) a :class:`~minititans.MemoryDivergenceError` naming
            the first token whose output is NaN or inf, or "warn".

    Returns:
        ``(..., T, d_v)``.
    """
    check_choice("feature_map", feature_map, FEATURE_MAPS)
    normalize = check_bool("normalize", normalize)
    check_choice("on_nonfinite", on_nonfinite, ON_NONFINITE)
    q_, _ = _check_qkv(q, k, v)
    T = q_.shape[-2]
    # an overflow or a zero normaliser is named below, by token
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        phi_q, phi_k = apply_feature_map(q, feature_map), apply_feature_map(k, feature_map)
        A = anp.matmul(phi_q, anp.swapaxes(phi_k, -1, -2))  # (..., T, T)
        A = anp.where(np.tril(np.ones((T, T), dtype=bool)), A, 0.0)
        y = anp.matmul(A, v)  # (..., T, d_v)
        if normalize:
            y = y / anp.sum(A, axis=-1, keepdims=True)
    check_recurrence(y, on_nonfinite, what=LINEAR_WHAT, hint=LINEAR_HINT)
    return y


linear_attention = linear_attention_parallel


def linear_attention_recurrent(q, k, v, feature_map: str = "identity", normalize: bool = False,
                               state=None, *, on_nonfinite: str = "raise"):
    r"""Titans Eqs. 4–5 as a recurrence over a matrix state, streamable.

    $$M_t = M_{t-1} + \phi(k_t)^\top v_t, \quad z_t = z_{t-1} + \phi(k_t), \quad
      y_t = \frac{\phi(q_t) M_t}{\phi(q_t) z_t^\top}\ \text{(denominator iff normalize)}$$

    Args:
        q, k: ``(..., T, d)``; v: ``(..., T, d_v)``.
        feature_map, normalize: as in :func:`linear_attention_parallel`.
        state: ``None`` (zeros) or the ``(M, z)`` returned by a previous call:
            ``M`` ``(..., d, d_v)``, ``z`` ``(..., d)``.
        on_nonfinite: "raise" (default) or "warn" when an output or the state becomes NaN or
            inf, naming the first such token (:class:`~minititans.MemoryDivergenceError`).

    Returns:
        ``(y, (M_T, z_T))`` with ``y`` ``(..., T, d_v)``.
    """
    check_choice("feature_map", feature_map, FEATURE_MAPS)
    normalize = check_bool("normalize", normalize)
    check_choice("on_nonfinite", on_nonfinite, ON_NONFINITE)
    q_, v_ = _check_qkv(q, k, v)
    *lead, T, d = q_.shape
    d_v = v_.shape[-1]
    if state is None:
        dtype = np.result_type(q_, v_)
        M = np.zeros(tuple(lead) + (d, d_v), dtype)
        z = np.zeros(tuple(lead) + (d,), dtype)
    else:
        if not isinstance(value_of(state), tuple) or len(state) != 2:
            raise TypeError("state must be None or the (M, z) tuple of a previous call")
        M, z = state
        check_array("state[0] (M)", M, ndim=len(lead) + 2)
        check_array("state[1] (z)", z, ndim=len(lead) + 1)
        if value_of(M).shape != tuple(lead) + (d, d_v) or value_of(z).shape != tuple(lead) + (d,):
            raise ValueError(f"state must be (M, z) of shapes {tuple(lead) + (d, d_v)} and "
                             f"{tuple(lead) + (d,)}, got {value_of(M).shape} and "
                             f"{value_of(z).shape}")
    z0 = z
    errors = dict(over="ignore", invalid="ignore", divide="ignore")  # named below, by token
    with np.errstate(**errors):
        phi_q, phi_k = apply_feature_map(q, feature_map), apply_feature_map(k, feature_map)
        ys = []
        for t in range(T):
            qt, kt, vt = phi_q[..., t, :], phi_k[..., t, :], v[..., t, :]
            # Eq. 4: an outer-product write phi(k_t)^T v_t
            M = M + kt[..., :, None] * vt[..., None, :]  # (..., d, d_v)
            z = z + kt
            # Eq. 5: read after write
            y = anp.matmul(qt[..., None, :], M)[..., 0, :]  # (..., d_v)
            if normalize:
                y = y / anp.sum(qt * z, axis=-1, keepdims=True)
            ys.append(y)
    y = anp.stack(ys, axis=-2) if T else np.zeros(tuple(lead) + (0, d_v), np.result_type(q_, v_))
    # a non-finite M_t makes y_t non-finite; z_t (only divided by) may overflow alone
    state_token = -1
    if not all_finite(z):
        with np.errstate(**errors):
            state_token = first_nonfinite_token(
                value_of(z0)[..., None, :] + np.cumsum(value_of(phi_k), axis=-2))
    check_recurrence(y, on_nonfinite, what=LINEAR_WHAT, hint=LINEAR_HINT,
                     state_token=state_token)
    return y, (M, z)


BACKENDS = ("reference", "numba")


def _delta_scan(q, k, v, beta, alpha, state, return_state, gated, on_nonfinite, backend):
    """The token loop shared by both gate placements (so they differ in one line only)."""
    check_choice("on_nonfinite", on_nonfinite, ON_NONFINITE)
    check_choice("backend", backend, BACKENDS)
    q_, k_, v_ = check_qkv_rows(q, k, v)
    T, d = q_.shape
    d_v = v_.shape[1]
    dtype = np.result_type(q_, k_, v_)
    beta = cast_gate(check_gate("beta", beta, T, low=0.0), dtype)
    alpha = cast_gate(check_gate("alpha", 0.0 if alpha is None else alpha, T,
                                   low=0.0, high=1.0), dtype)
    if state is None:
        W = np.zeros((d, d_v), dtype)
    else:
        W_ = check_array("state", state, ndim=2)
        if W_.shape != (d, d_v):
            raise ValueError(f"state must have shape {(d, d_v)}, got {W_.shape}")
        W = state
    if backend == "numba":
        return _delta_numba(q, k, v, beta, alpha, W, return_state, gated, on_nonfinite)
    ys = []
    bound = weight_bound(dtype, 1)  # the rule of a depth-1 memory's weights
    first_bad = -1
    with np.errstate(over="ignore", invalid="ignore"):  # a divergence is named below
        for t in range(T):
            kt, vt = k[t:t + 1], v[t:t + 1]  # (1, d), (1, d_v)
            if gated:
                # Gated DeltaNet: decay first, then the error at the decayed weights
                W = (1.0 - alpha[t]) * W
                W = W - beta[t] * (kt.T @ (kt @ W - vt))
            else:
                # Titans: decay and gradient step both at W_{t-1} (Eq. 13, theta = beta / 2)
                W = (1.0 - alpha[t]) * W - beta[t] * (kt.T @ (kt @ W - vt))  # (d, d_v)
            ys.append((q[t:t + 1] @ W)[0])
            if first_bad < 0 and weights_diverged([W], bound):
                first_bad = t
    y = anp.stack(ys) if T else np.zeros((0, d_v), dtype)
    # the first token whose weights diverged (NaN, inf or past the bound) or output is bad
    check_recurrence(y, on_nonfinite, what=DELTA_WHAT, hint=DELTA_HINT, state_token=first_bad,
                     state_reason=diverged_reason(bound))
    return (y, W) if return_state else y


def _delta_numba(q, k, v, beta, alpha, W, return_state, gated, on_nonfinite):
    """The checked arguments through the numba kernels (differentiable, first order)."""
    from .kernels.delta_vjp import delta_rule_batched  # imports numba: only when asked for

    y, W = delta_rule_batched(q[None], k[None], v[None], beta[None], alpha[None], W[None],
                              rule="gated" if gated else "delta", on_nonfinite=on_nonfinite)
    return (y[0], W[0]) if return_state else y[0]


def delta_rule(q, k, v, beta, alpha=None, *, state=None, return_state: bool = False,
               on_nonfinite: str = "raise", backend: str = "reference"):
    r"""The delta rule with Titans' forgetting gate (Appendix C; Eqs. 12–13 with a linear memory).

    $$W_t = (1 - \alpha_t) W_{t-1} - \beta_t\, k_t^\top (k_t W_{t-1} - v_t), \qquad y_t = q_t W_t$$

    from $W_0 = 0$. This is ``memory_scan`` with a depth-1 memory, $\theta = \beta/2$
    (the loss of Eq. 12 has no ½), $\eta = 0$: the error is measured at the *undecayed*
    $W_{t-1}$ and the decay is applied beside the gradient step. Compare
    :func:`gated_delta_rule`.

    Args:
        q, k: ``(T, d)``; v: ``(T, d_v)``.
        beta: step size $\beta_t \ge 0$, a float or ``(T,)``.
        alpha: forgetting $\alpha_t \in [0, 1]$, a float or ``(T,)``; None means 0.
        state: initial $W_0$ ``(d, d_v)``; None means zeros.
        return_state: also return $W_T$.
        on_nonfinite: "raise" (default) a :class:`~minititans.MemoryDivergenceError` naming
            the first token whose output is NaN or inf or whose weights have diverged (NaN,
            inf or past :func:`~minititans._checks.weight_bound` of a depth-1 memory), or
            "warn" (once).
        backend: "reference" (this token loop, differentiated by autograd) or "numba" (the
            kernel of :mod:`minititans.kernels.attention`, differentiable through the
            hand-written VJP of :mod:`minititans.kernels.delta_vjp`; first order only).

    Returns:
        ``y`` ``(T, d_v)``, or ``(y, W_T)`` if ``return_state``.
    """
    return _delta_scan(q, k, v, beta, alpha, state, return_state, False, on_nonfinite,
                       backend)


def gated_delta_rule(q, k, v, beta, alpha, *, state=None, return_state: bool = False,
                     on_nonfinite: str = "raise", backend: str = "reference"):
    r"""Gated DeltaNet (Yang et al. 2024): the gate is applied *before* the error is computed.

    $$W' = (1 - \alpha_t) W_{t-1}, \qquad W_t = W' - \beta_t\, k_t^\top (k_t W' - v_t)
      = (1-\alpha_t)(I - \beta_t k_t^\top k_t) W_{t-1} + \beta_t k_t^\top v_t$$

    Titans (:func:`delta_rule`) instead computes the error at $W_{t-1}$:
    $W_t = (I - \beta_t k_t^\top k_t - \alpha_t I) W_{t-1} + \beta_t k_t^\top v_t$, so from
    the same $W_{t-1}$ the two differ by exactly
    $W^{\text{gated}}_t - W^{\text{Titans}}_t = \alpha_t \beta_t\, k_t^\top k_t\, W_{t-1}$:
    Gated DeltaNet *multiplies* the two contractions, Titans *adds* them (its first-order
    approximation). They agree when $\alpha_t = 0$, $\beta_t = 0$ or $W_{t-1} = 0$.

    Args and returns as in :func:`delta_rule` (here ``alpha`` is required).
    """
    return _delta_scan(q, k, v, beta, alpha, state, return_state, True, on_nonfinite,
                       backend)
