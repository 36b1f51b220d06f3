"""Deliberately naive loop versions of the sequence operations, for the tests.

Written straight from the equations, one token and one key at a time, in plain NumPy and
math. This module must never import minititans: it is the oracle the fast code is checked
against.
"""

import math

import numpy as np


def naive_causal_attention(q, k, v, window=None, prefix=0):
    """Titans Eq. 2, one query and one key at a time, with the window and prefix rules."""
    T, d = q.shape
    y = np.zeros((T, v.shape[1]))
    for i in range(T):
        visible = [j for j in range(T)
                   if j < prefix or (j <= i and (window is None or j > i - window))]
        logits = [sum(q[i, c] * k[j, c] for c in range(d)) / math.sqrt(d) for j in visible]
        top = max(logits)
        weights = [math.exp(s - top) for s in logits]
        total = sum(weights)
        for w, j in zip(weights, visible, strict=True):
            y[i] += (w / total) * v[j]
    return y


def _phi(x, feature_map):
    if feature_map == "identity":
        return np.array(x, dtype=float)
    return np.array([[xi + 1.0 if xi > 0 else math.exp(xi) for xi in row] for row in x])


def naive_linear_attention(q, k, v, feature_map="identity", normalize=False):
    """Titans Eqs. 3–5 as the double sum over j <= t, with no matrix state."""
    pq, pk = _phi(q, feature_map), _phi(k, feature_map)
    T = q.shape[0]
    y = np.zeros((T, v.shape[1]))
    for t in range(T):
        num = np.zeros(v.shape[1])
        den = 0.0
        for j in range(t + 1):
            kernel = float(np.dot(pq[t], pk[j]))  # phi(q_t) phi(k_j)^T
            num += kernel * v[j]
            den += kernel
        y[t] = num / den if normalize else num
    return y


def naive_delta_rule(q, k, v, beta, alpha, gated=False, W0=None):
    """Appendix C's delta rule, per token, with the gate placed as Titans or Gated DeltaNet."""
    T, d = k.shape
    W = np.zeros((d, v.shape[1])) if W0 is None else np.array(W0, dtype=float)
    y = np.zeros((T, v.shape[1]))
    for t in range(T):
        kt, vt = k[t][None, :], v[t][None, :]
        if gated:
            Wd = (1.0 - alpha[t]) * W
            W = Wd - beta[t] * kt.T @ (kt @ Wd - vt)
        else:
            W = (1.0 - alpha[t]) * W - beta[t] * kt.T @ (kt @ W - vt)
        y[t] = q[t] @ W
    return y, W


def naive_depthwise_conv(w, b, x):
    """y_t = sum_j w[j] * x_{t-j} (+ b), zeros before the start, one output at a time."""
    K = w.shape[0]
    T, C = x.shape
    y = np.zeros((T, C))
    for t in range(T):
        for c in range(C):
            acc = 0.0 if b is None else b[c]
            for j in range(K):
                if t - j >= 0:
                    acc += w[j, c] * x[t - j, c]
            y[t, c] = acc
    return y
