"""Deliberately naive versions of the memory equations, written from the paper.

Nothing here imports minititans: these loops are the oracle the library is tested against.
Weights are plain lists of arrays; the MLP is written out with explicit loops over layers.
"""

import autograd.numpy as anp
import numpy as np
from autograd import grad
from scipy.special import erf as scipy_erf


def gelu_exact(x):
    return 0.5 * x * (1.0 + scipy_erf(x / np.sqrt(2.0)))


def silu(x):
    return x / (1.0 + np.exp(-x))


def naive_mlp(weights, x, activation="gelu", residual_norm=False):
    """M(x) for one token x (d_in,), layer by layer, with the library-independent formulas."""
    from autograd.scipy.special import erf

    act = {
        "gelu": lambda z: 0.5 * z * (1.0 + erf(z / anp.sqrt(2.0))),
        "silu": lambda z: z / (1.0 + anp.exp(-z)),
    }[activation]
    h = x
    for i, W in enumerate(weights):
        h = anp.dot(h, W)
        if i < len(weights) - 1:
            h = act(h)
    if residual_norm:
        mu = anp.mean(h)
        var = anp.mean((h - mu) ** 2)
        h = x + (h - mu) / anp.sqrt(var + 1e-5)
    return h


def naive_loss(weights, k, v, activation="gelu", residual_norm=False):
    """Eq. 12 for one token: ||M(k) - v||²."""
    r = naive_mlp(weights, k, activation, residual_norm) - v
    return anp.sum(r * r)


naive_grad = grad(naive_loss)


def linear_grad(W, k, v):
    """Closed form of Eq. 8 for a linear memory: 2 kᵀ (k W - v)."""
    return 2.0 * np.outer(k, k @ W - v)


def layer_step(theta_t, i):
    """Token t's step for layer i: theta_t itself, or its entry i when theta has a column
    per layer (Appendix B.3)."""
    return theta_t[i] if np.ndim(theta_t) else theta_t


def layer_rate(alpha_t, M, i):
    """Token t's forgetting rate for layer i: alpha_t itself, or, channel-wise (a rate per
    output channel of every layer, the layers' widths one after the other), layer i's
    slice, one rate per column."""
    if np.ndim(alpha_t) == 0:
        return alpha_t
    lo = sum(np.shape(w)[1] for w in M[:i])
    return alpha_t[lo:lo + np.shape(M[i])[1]]


def naive_token_loop(weights, K, V, Q, alpha, eta, theta, *, activation="gelu",
                     residual_norm=False, read="after", momentum=None, anchor=None):
    """Eqs. 13–14 token by token: S_t = η S - θ ∇ℓ(M_{t-1}); M_t = (1-α) M_{t-1} + S_t.

    With ``anchor`` (weights M̄): M_t = M̄ + (1-α)(M_{t-1} - M̄) + S_t.
    """
    A = [np.zeros_like(np.asarray(W, dtype=float)) for W in weights] if anchor is None \
        else [np.array(a, dtype=float) for a in anchor]
    M = [np.array(W, dtype=float) for W in weights]
    S = [np.zeros_like(W) for W in M] if momentum is None else [np.array(s) for s in momentum]
    ys = []
    for t in range(len(K)):
        if read == "before":
            ys.append(naive_mlp(M, Q[t], activation, residual_norm))
        g = naive_grad(M, K[t], V[t], activation, residual_norm)
        S = [eta[t] * s - layer_step(theta[t], i) * gi for i, (s, gi) in enumerate(zip(S, g))]
        M = [a + (1.0 - layer_rate(alpha[t], M, i)) * (w - a) + s
             for i, (w, s, a) in enumerate(zip(M, S, A))]
        if read == "after":
            ys.append(naive_mlp(M, Q[t], activation, residual_norm))
    return np.array(ys), M, S


def naive_chunked(weights, K, V, Q, alpha, eta, theta, b, *, activation="gelu",
                  residual_norm=False, read="after", anchor=None):
    """Eqs. 16–18 as plain loops: inside a chunk every gradient is taken at M_{t'}."""
    A = [np.zeros_like(np.asarray(W, dtype=float)) for W in weights] if anchor is None \
        else [np.array(a, dtype=float) for a in anchor]
    M = [np.array(W, dtype=float) for W in weights]
    S = [np.zeros_like(W) for W in M]
    ys = []
    T = len(K)
    for start in range(0, T, b):
        M_chunk_start = [w.copy() for w in M]
        for t in range(start, min(start + b, T)):
            if read == "before":
                ys.append(naive_mlp(M, Q[t], activation, residual_norm))
            g = naive_grad(M_chunk_start, K[t], V[t], activation, residual_norm)
            S = [eta[t] * s - layer_step(theta[t], i) * gi
                 for i, (s, gi) in enumerate(zip(S, g))]
            M = [a + (1.0 - layer_rate(alpha[t], M, i)) * (w - a) + s
                 for i, (w, s, a) in enumerate(zip(M, S, A))]
            if read == "after":
                ys.append(naive_mlp(M, Q[t], activation, residual_norm))
    return np.array(ys), M, S


def naive_linear_attention(Q, K, V):
    """y_t = q_t Σ_{j<=t} k_jᵀ v_j (Eqs. 4–5), as a double loop."""
    T = len(Q)
    ys = np.zeros((T, V.shape[1]))
    for t in range(T):
        for j in range(t + 1):
            ys[t] += (Q[t] @ K[j]) * V[j]
    return ys


def naive_sequential_recurrence(a, x, h0):
    """h_i = a_i h_{i-1} + x_i."""
    out, h = [], np.array(h0, dtype=float)
    for i in range(len(a)):
        h = a[i] * h + x[i]
        out.append(h)
    return np.array(out)


def unit_rows(rng, n, d):
    """n random unit-norm rows of width d (keys as the Titans block makes them)."""
    x = rng.standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def naive_clipped_chunked(weights, K, V, Q, alpha, eta, theta, b, max_norm, *,
                          activation="gelu", residual_norm=False, read="after"):
    """Eqs. 16–18 (b = 1: Eqs. 13–14) with each token's surprise clipped to a global norm.

    u_t <- u_t * max_norm / ||u_t|| when ||u_t|| > max_norm (the norm over every layer's
    weights together), else unchanged. Returns ``(ys, M, S, norms)``, ``norms`` the
    unclipped ||u_t||.
    """
    M = [np.array(W, dtype=float) for W in weights]
    S = [np.zeros_like(W) for W in M]
    ys, norms = [], []
    for start in range(0, len(K), b):
        M_chunk_start = [w.copy() for w in M]
        for t in range(start, min(start + b, len(K))):
            if read == "before":
                ys.append(naive_mlp(M, Q[t], activation, residual_norm))
            g = naive_grad(M_chunk_start, K[t], V[t], activation, residual_norm)
            norm = np.sqrt(sum(np.sum(gi * gi) for gi in g))
            norms.append(norm)
            if norm > max_norm:
                g = [gi * (max_norm / norm) for gi in g]
            S = [eta[t] * s - theta[t] * gi for s, gi in zip(S, g)]
            M = [(1.0 - alpha[t]) * w + s for w, s in zip(M, S)]
            if read == "after":
                ys.append(naive_mlp(M, Q[t], activation, residual_norm))
    return np.array(ys), M, S, np.array(norms)
