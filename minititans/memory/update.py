r"""One step of the Titans memory update (Section 3.1, Eqs. 8–14).

The full rule, Eqs. 13–14:

$$S_t = \eta_t S_{t-1} - \theta_t \nabla\ell(\mathcal{M}_{t-1}; x_t), \qquad
\mathcal{M}_t = (1 - \alpha_t)\,\mathcal{M}_{t-1} + S_t .$$

Plain gradient descent on the surprise (Eq. 8) is the case $\alpha = \eta = 0$; momentum
without forgetting (Eqs. 9–10) is $\alpha = 0$.

Forgetting towards an anchor. Eq. 13 decays the weights towards 0, and for a deep memory 0
is an absorbing state: with every weight matrix at 0 no gradient flows (the surprise of
$W_1$ is proportional to $W_2$ and the other way round), so after a long stream whose
gradients cannot hold the weights up against the decay, the memory stores nothing ever
again. A state built with ``MemoryState.initial(params, anchored=True)`` forgets towards
its initial weights $\bar{\mathcal{M}} = \mathcal{M}_0$ instead:

$$\mathcal{M}_t = \bar{\mathcal{M}} + (1 - \alpha_t)(\mathcal{M}_{t-1} - \bar{\mathcal{M}})
+ S_t ,$$

which is Eq. 13 for $\mathcal{M}_t - \bar{\mathcal{M}}$ (and Eq. 13 itself when
$\bar{\mathcal{M}} = 0$). docs/design-decisions.md says why and what it costs.
"""

from __future__ import annotations

from dataclasses import dataclass

import autograd.numpy as anp
import numpy as np
from autograd.tracer import getval

from .._checks import (
    MemoryDivergenceError,  # noqa: F401  (re-exported: minititans.memory.MemoryDivergenceError)
    check_array,
    check_choice,
    check_gate,
    diverged_reason,
    report_divergence,
    value_of,
    weight_bound,
    weights_diverged,
)
from .loss import check_loss, surprise
from .models import MemoryParams, check_params, spec_of


@dataclass(frozen=True, eq=False)
class MemoryState:
    """The memory's weights $\\mathcal{M}_t$, its momentum $S_t$ and the forgetting anchor.

    ``anchor`` is None for Eq. 13 as printed (forgetting decays towards 0), or the weights
    $\\bar{\\mathcal{M}}$ that forgetting decays towards (same structure as ``params``).

    ``open_chunk`` is ``(r, b)`` when the ``memory_scan`` that returned this state ended
    ``r`` tokens into a chunk of ``chunk_size = b`` (None: at a chunk boundary). Continuing
    from such a state starts a new chunk, which differs from one call on the whole sequence
    (Eqs. 16–18), so ``memory_scan`` warns then (see its ``partial_chunk``).
    """

    params: MemoryParams
    momentum: MemoryParams
    anchor: MemoryParams | None = None
    open_chunk: tuple[int, int] | None = None

    @classmethod
    def initial(cls, params, *, anchored: bool = False) -> MemoryState:
        """$\\mathcal{M}_0$ = ``params``, $S_0 = 0$; ``anchored``: forget towards it."""
        spec = spec_of(params)
        if not isinstance(anchored, bool):
            raise TypeError(f"anchored must be True or False, got {anchored!r}")
        return cls(params, spec.like(anp.zeros_like(getval(W)) for W in spec),
                   params if anchored else None)

    def __post_init__(self):
        p, m = spec_of(self.params), spec_of(self.momentum)
        ps = [getval(w).shape for w in p]
        ms = [getval(w).shape for w in m]
        if ps != ms:
            raise ValueError(f"momentum shapes {ms} do not match params shapes {ps}")
        if self.anchor is not None:
            a = spec_of(self.anchor)
            if [getval(w).shape for w in a] != ps:
                raise ValueError(f"anchor shapes {[getval(w).shape for w in a]} do not "
                                 f"match params shapes {ps}")


def check_state(state) -> MemoryParams:
    """Check a MemoryState's weights and momentum (float, finite, chained); return the spec."""
    if not isinstance(state, MemoryState):
        raise TypeError(f"state must be a MemoryState, got {type(state).__name__}")
    spec = check_params(state.params, name="state.params")
    check_params(state.momentum, name="state.momentum")
    if state.anchor is not None:
        check_params(state.anchor, name="state.anchor")
    return spec


def state_in_dtype(state: MemoryState, dtype) -> MemoryState:
    """``state`` with its weights, momentum and anchor in ``dtype`` (differentiable); the
    same object when they already are."""
    trees = (state.params, state.momentum) + (() if state.anchor is None else (state.anchor,))
    if all(getval(w).dtype == dtype for tree in trees for w in tree):
        return state

    def cast(tree):
        if tree is None:
            return None
        return spec_of(tree).like(w if getval(w).dtype == dtype else w.astype(dtype)
                                  for w in tree)

    return MemoryState(cast(state.params), cast(state.momentum), cast(state.anchor),
                       state.open_chunk)


def result_dtype(state: MemoryState, *arrays):
    """The dtype rule of the memory functions: ``np.result_type`` of the state's weights,
    momentum and anchor and of the input rows (float32 only when all are float32); the
    gates are cast to it and never change it."""
    trees = (state.params, state.momentum) + (() if state.anchor is None else (state.anchor,))
    return np.result_type(*(getval(w) for tree in trees for w in tree),
                           *(getval(x) for x in arrays))


def tree_norm(tree) -> float:
    """Global Euclidean norm of all the weights (a plain float)."""
    return float(np.sqrt(sum(np.sum(np.square(getval(w))) for w in tree)))


def check_max_grad_norm(max_grad_norm):
    """None, or a real number > 0 (inf allowed: no clipping)."""
    if max_grad_norm is None:
        return None
    raw = getval(max_grad_norm)
    arr = np.asarray(raw)
    if isinstance(raw, bool) or arr.ndim or arr.dtype.kind not in "fiu":
        raise TypeError(f"max_grad_norm must be a float > 0 or None, got {raw!r}")
    if not float(raw) > 0:
        raise ValueError(f"max_grad_norm must be > 0 or None, got {raw!r}")
    return max_grad_norm


def clip_by_norm(u, max_norm):
    """Scale the surprise so its global norm is at most ``max_norm`` (None: unchanged)."""
    if max_norm is None:
        return u
    total = anp.sqrt(sum(anp.sum(w**2) for w in u))
    scale = anp.minimum(1.0, max_norm / anp.maximum(total, 1e-30))
    return spec_of(u).like(scale * w for w in u)


def check_weights(params, token: int, on_nonfinite: str) -> bool:
    """Raise (or warn, and return False) when the weights have diverged: a NaN, an inf or a
    magnitude above :func:`~minititans._checks.weight_bound` (the same rule as the kernels').

    With ``on_nonfinite="warn"`` the caller stops checking after the first warning, so a
    diverged scan warns once, naming the first bad token.
    """
    bound = weight_bound(getval(params[0]).dtype, len(params))
    if not weights_diverged(params, bound):
        return True
    report_divergence(token, on_nonfinite, reason=diverged_reason(bound))
    return False


def channel_rates(alpha, params, tokens: bool = False):
    """``alpha`` per layer of ``params``: the same gate for each, or, channel-wise (a last
    axis of ``C``, the layers' output widths summed), each layer's slice of it. ``tokens``:
    ``alpha`` has a leading axis of tokens, ``(n,)`` or ``(n, C)``, and the slices are
    ``(n, 1, d_out_i)``, to broadcast against per-token weights."""
    if anp.ndim(alpha) == (1 if tokens else 0):
        return [alpha] * len(params)
    out, lo = [], 0
    for w in params:
        width = int(np.shape(getval(w))[-1])
        part = alpha[..., lo:lo + width]
        out.append(anp.reshape(part, (-1, 1, width)) if tokens else part)
        lo += width
    return out


def apply_update(M, S, u, alpha, eta, theta, anchor=None):
    r"""Eqs. 13–14 on whole weight trees; returns the new $(\mathcal{M}_t, S_t)$.
    ``alpha`` may have a rate per output channel (``(C,)``), ``theta`` a step per layer.

    With an ``anchor`` $\bar{\mathcal{M}}$, Eq. 13 acts on $\mathcal{M} - \bar{\mathcal{M}}$.
    """
    spec = spec_of(M)
    # θ_t, or a step per layer θ_{t,i} (theta of shape (L,), Appendix B.3)
    steps = [theta[i] for i in range(len(S))] if anp.ndim(theta) == 1 else [theta] * len(S)
    # Eq. 14: S_t = η_t S_{t-1} - θ_t u_t   (u_t = ∇ℓ(M_{t-1}; x_t), the momentary surprise)
    S_new = spec.like(eta * s - th * g for s, g, th in zip(S, u, steps))
    # α_t, or a rate per output channel (alpha of shape (C,), channel-wise): layer i's columns
    rates = channel_rates(alpha, M)
    if anchor is None:
        # Eq. 13: M_t = (1 - α_t) M_{t-1} + S_t
        M_new = spec.like((1.0 - r) * w + s for w, s, r in zip(M, S_new, rates))
    else:
        # Eq. 13 around the anchor: M_t = M̄ + (1 - α_t)(M_{t-1} - M̄) + S_t
        M_new = spec.like(a + (1.0 - r) * (w - a) + s
                          for w, s, a, r in zip(M, S_new, anchor, rates))
    return M_new, S_new


def output_channels(params) -> int:
    r"""The output channels of a memory, its layers' output widths summed: the length of a
    channel-wise $\alpha_t$ (for a linear memory ``d_out``)."""
    return sum(int(np.shape(getval(w))[-1]) for w in params)


# what the columns of a gate with several values per token are
COLUMNS = {"theta": "a step per memory layer",
           "alpha": "a rate per output channel of the memory's layers"}


def check_columns(name: str, gate, T: int, n: int, what: str, *, low=0.0, high=None):
    """A gate checked: a float or ``(T,)`` (one value per token, as :func:`check_gate`
    returns it), or ``(T, n)``, ``what`` (``theta`` a step per memory layer, Appendix B.3;
    ``alpha`` a rate per output channel, the NeurIPS version's channel-wise forgetting)."""
    raw = value_of(gate)
    if isinstance(raw, (list, tuple)):
        raw = gate = np.asarray(raw, dtype=float)
    if np.ndim(raw) != 2:
        return check_gate(name, gate, T, low=low, high=high)
    arr = np.asarray(raw)
    if arr.dtype.kind not in "fiu" or arr.dtype == np.float16:
        raise TypeError(f"{name} must be a float or a float array, got dtype {arr.dtype}")
    if arr.shape != (T, n):
        raise ValueError(f"{name} must be a float, have shape ({T},), or have shape ({T}, {n}) "
                         f"({what}), got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or inf")
    if arr.size and arr.min() < low:
        raise ValueError(f"{name} must be >= {low}, got a minimum of {arr.min():.6g}")
    if high is not None and arr.size and arr.max() > high:
        raise ValueError(f"{name} must be <= {high}, got a maximum of {arr.max():.6g}")
    return gate if arr.dtype.kind == "f" else arr.astype(float)


def check_theta(theta, T: int, L: int):
    """``theta``: a float, ``(T,)``, or ``(T, L)``, a step per memory layer (Appendix B.3)."""
    return check_columns("theta", theta, T, L, COLUMNS["theta"])


def check_alpha(alpha, T: int, C: int):
    """``alpha`` in [0, 1]: a float, ``(T,)``, or ``(T, C)``, a rate per output channel of
    the memory's layers (:func:`output_channels`)."""
    return check_columns("alpha", alpha, T, C, COLUMNS["alpha"], high=1.0)


def _one_row(name: str, gate, n: int):
    """A gate of one token with ``n`` values (``(n,)``, n > 1) as the row ``(1, n)`` that
    :func:`check_columns` takes; a float (or ``(1,)``) as it is."""
    raw = value_of(gate)
    if isinstance(raw, (list, tuple)):
        gate = raw = np.asarray(raw, dtype=float)
    if np.ndim(raw) == 1 and np.size(raw) > 1:
        if np.size(raw) != n:
            raise ValueError(f"{name} must be a float or have shape ({n},) ({COLUMNS[name]}), got "
                             f"shape {np.shape(raw)}")
        return anp.reshape(gate, (1, n))
    return gate


def memory_step(state: MemoryState, k, v, *, alpha, eta, theta, loss: str = "l2",
                p: float = 3.0, delta: float = 1.0, max_grad_norm=None,
                on_nonfinite: str = "raise") -> MemoryState:
    r"""One token of the Titans update, Eqs. 13–14.

    $$S_t = \eta_t S_{t-1} - \theta_t \nabla\ell(\mathcal{M}_{t-1}; x_t), \quad
    \mathcal{M}_t = (1-\alpha_t)\mathcal{M}_{t-1} + S_t$$

    Args:
        state: $(\mathcal{M}_{t-1}, S_{t-1})$.
        k: ``(d_in,)`` key; v: ``(d_out,)`` value.
        alpha: forgetting gate in [0, 1]; eta: momentum decay in [0, 1]; theta: step >= 0.
            ``alpha`` may also be ``(C,)``, a rate per output channel of the layers
            (:func:`output_channels`), and ``theta`` ``(L,)``, a step per layer, as one
            token's row of :func:`memory_scan`'s gates.
        loss, p, delta: the inner loss (see :func:`associative_loss`).
        max_grad_norm: clip the surprise to this global norm (None: no clipping).
        on_nonfinite: "raise" (default) or "warn" when the weights stop being finite.

    Returns:
        The new MemoryState $(\mathcal{M}_t, S_t)$, in the dtype of :func:`memory_scan`'s
        rule (float32 only when the state, ``k`` and ``v`` are all float32).
    """
    spec = check_state(state)
    check_loss(loss, p, delta)
    check_max_grad_norm(max_grad_norm)
    check_choice("on_nonfinite", on_nonfinite, ("raise", "warn"))
    k_ = check_array("k", k, ndim=1, last_dim=spec.d_in)
    v_ = check_array("v", v, ndim=1, last_dim=spec.d_out)
    # the dtype rule of memory_scan: everything is computed in the result dtype
    dtype = result_dtype(state, k_, v_)
    state = state_in_dtype(state, dtype)
    k, v = (x if getval(x).dtype == dtype else x.astype(dtype) for x in (k, v))
    # alpha may be (C,), a rate per output channel, and theta (L,), a step per layer: checked
    # as the one row of memory_scan's (T, C) and (T, L)
    a, e, th = (g.astype(dtype)[0] if isinstance(g, np.ndarray) else g[0] for g in (
        check_alpha(_one_row("alpha", alpha, output_channels(spec)), 1, output_channels(spec)),
        check_gate("eta", eta, 1, low=0.0, high=1.0),
        check_theta(_one_row("theta", theta, len(spec)), 1, len(spec))))
    with np.errstate(over="ignore", invalid="ignore"):  # non-finite weights raise below
        u = clip_by_norm(surprise(state.params, k[None], v[None], loss, p=p, delta=delta),
                         max_grad_norm)
        M, S = apply_update(state.params, state.momentum, u, a, e, th, state.anchor)
    check_weights(M, 0, on_nonfinite)
    return MemoryState(M, S, state.anchor)
