r"""The linear recurrence $h_i = a_i\,h_{i-1} + x_i$, sequentially and as a parallel scan.

Inside a chunk the momentum of Titans Eq. 18, $S_i = \eta_i S_{i-1} - \theta_i u_i$, and
the forgetting update of Eq. 13, $M_i = (1 - \alpha_i) M_{i-1} + S_i$, are both this
recurrence. Because the pairs $(a_i, x_i)$ compose associatively,

$$(a, x) \circ (a', x') = (a\,a',\; a'\,x + x'),$$

all prefixes can be computed in $\lceil \log_2 n \rceil$ rounds (Hillis & Steele): in round
$r$ every element combines with the element $2^r$ places before it. The result gives
$h_i = A_i h_0 + X_i$ with $A_i = \prod_{j \le i} a_j$, without dividing by any $\beta$,
so it stays exact when a gate is 0 (Eq. 16's $\beta_t/\beta_i$ would divide by zero).
"""

from __future__ import annotations

import autograd.numpy as anp


def _expand(a, like):
    """Reshape per-step scalars ``(n,)`` to broadcast against ``like`` ``(n, ...)``;
    multipliers that already have its number of axes (``(n, 1, d)``: one per column) stay."""
    if a.ndim == like.ndim:
        return a
    return anp.reshape(a, (a.shape[0],) + (1,) * (like.ndim - 1))


def associative_scan(a, x):
    r"""Inclusive scan of $(a_i, x_i)$ under $(a, x) \circ (a', x') = (a a', a' x + x')$.

    Args:
        a: ``(n,)`` per-step multipliers, or ``(n, ...)`` broadcasting against ``x``.
        x: ``(n, ...)`` per-step inputs.

    Returns:
        ``(A, X)`` with $A_i = \prod_{j\le i} a_j$ ``(n,)`` and
        $X_i = \sum_{j \le i} (\prod_{j < l \le i} a_l)\, x_j$ ``(n, ...)``.
    """
    n = a.shape[0]
    A, X = a, x
    shift = 1
    while shift < n:
        # the element `shift` places back; before the start, the identity pair (1, 0)
        A_prev = anp.concatenate([anp.ones((shift,) + A.shape[1:], dtype=A.dtype), A[:-shift]])
        X_prev = anp.concatenate([anp.zeros((shift,) + X.shape[1:], dtype=X.dtype), X[:-shift]])
        X = _expand(A, X) * X_prev + X  # (a', x') applied after (a, x): a' x + x'
        A = A * A_prev
        shift *= 2
    return A, X


def linear_recurrence(a, x, h0):
    r"""All states of $h_i = a_i h_{i-1} + x_i$ from $h_0$, by :func:`associative_scan`.

    Args:
        a: ``(n,)``; x: ``(n, ...)``; h0: ``(...)``.

    Returns:
        ``(n, ...)``: $h_1, \dots, h_n$.
    """
    A, X = associative_scan(a, x)
    return _expand(A, X) * h0[None] + X


def linear_recurrence_loop(a, x, h0):
    """The same recurrence one step at a time: the definition the scan must match."""
    h, out = h0, []
    for i in range(a.shape[0]):
        h = a[i] * h + x[i]
        out.append(h)
    return anp.stack(out)
