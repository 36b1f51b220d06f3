r"""Data-dependent gates $\alpha_t$, $\eta_t$, $\theta_t$ (Titans Section 3.1, Eqs. 13–14).

The paper says the forgetting gate $\alpha_t$, the momentum decay $\eta_t$ and the step size
$\theta_t$ are functions of the token $x_t$ but not which functions. Our choice (see
docs/design-decisions.md), shared by every known implementation: a sigmoid of a linear map,

$$\alpha_t = \sigma(x_t w_\alpha + b_\alpha), \quad
\eta_t = \sigma(x_t w_\eta + b_\eta), \quad
\theta_t = \theta_{max}\, \sigma(x_t w_\theta + b_\theta).$$

The biases are initialised so that, for weights near zero, the gates start at a small
$\alpha$ (forget slowly), $\eta$ near 0.9 (a long momentum) and a small $\theta$: with the
summed loss of Eq. 12 the step is large, and a deep memory with $\eta \approx 0.9$ was seen to
diverge from $\theta \approx 0.1$.
"""

from __future__ import annotations

import math

import autograd.numpy as anp
import numpy as np

from .._checks import check_array, check_int, check_rng
from ..activations import sigmoid

ALPHA_INIT = 0.01    # forget 1% of the memory per token at the start
ETA_INIT = 0.9       # momentum keeps ~10 tokens of past surprise
THETA_INIT = 0.02    # a small inner step; with l2-normalised keys the linear step is 2θ
THETA_MAX = 0.1      # the largest step the gate can ever produce


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def init_gates(rng, d_model: int, *, alpha_init: float = ALPHA_INIT, eta_init: float = ETA_INIT,
               theta_init: float = THETA_INIT, theta_max: float = THETA_MAX,
               scale: float = 0.01, theta_columns: int = 1, alpha_columns: int = 1) -> dict:
    """Parameters of the three gate projections: weights ``(d_model,)`` and scalar biases.

    The weights start small (``scale``) so the initial gates are close to the ``*_init``
    values whatever the input; ``theta_max`` is not a parameter but fixes the range of θ.
    ``theta_columns`` > 1 gives θ one projection per memory layer (Appendix B.3 of the
    NeurIPS version): ``w_theta`` ``(d_model, theta_columns)``, ``b_theta``
    ``(theta_columns,)``, every column starting at ``theta_init``. ``alpha_columns`` > 1
    likewise gives α one projection per output channel of the memory's layers (channel-wise
    forgetting, the NeurIPS version), every column starting at ``alpha_init``.

    Returns:
        ``{"w_alpha": (d_model,), "b_alpha": float, "w_eta": (d_model,), "b_eta": float,
        "w_theta": (d_model,), "b_theta": float}``.
    """
    check_rng(rng)
    d_model = check_int("d_model", d_model, minimum=1)
    n = check_int("theta_columns", theta_columns, minimum=1)
    n_a = check_int("alpha_columns", alpha_columns, minimum=1)
    for name, val in (("alpha_init", alpha_init), ("eta_init", eta_init)):
        if not 0.0 < val < 1.0:
            raise ValueError(f"{name} must be in (0, 1), got {val!r}")
    if not 0.0 < theta_init < theta_max:
        raise ValueError(f"theta_init must be in (0, theta_max={theta_max}), got {theta_init!r}")
    return {
        "w_alpha": scale * rng.standard_normal(d_model if n_a == 1 else (d_model, n_a)),
        "b_alpha": _logit(alpha_init) if n_a == 1 else np.full(n_a, _logit(alpha_init)),
        "w_eta": scale * rng.standard_normal(d_model), "b_eta": _logit(eta_init),
        "w_theta": scale * rng.standard_normal(d_model if n == 1 else (d_model, n)),
        "b_theta": (_logit(theta_init / theta_max) if n == 1
                    else np.full(n, _logit(theta_init / theta_max))),
    }


def compute_gates(gate_params: dict, x, *, theta_max: float = THETA_MAX):
    r"""$(\alpha_t, \eta_t, \theta_t)$ for every token of ``x`` ``(T, d_model)``; each ``(T,)``,
    θ ``(T, L)`` when its projection has a column per memory layer (``theta_columns``), α
    ``(T, C)`` when it has one per output channel (``alpha_columns``)."""
    check_array("x", x, ndim=2, last_dim=anp.shape(gate_params["w_alpha"])[0])
    if not theta_max > 0:
        raise ValueError(f"theta_max must be > 0, got {theta_max!r}")
    g = gate_params
    alpha = sigmoid(x @ g["w_alpha"] + g["b_alpha"])  # (T,) or (T, C), in (0, 1)
    eta = sigmoid(x @ g["w_eta"] + g["b_eta"])  # (T,) in (0, 1)
    theta = theta_max * sigmoid(x @ g["w_theta"] + g["b_theta"])  # (T,) or (T, L)
    return alpha, eta, theta
