r"""Gradients of the matrix recurrences: the numba delta rule as an autograd primitive (Appendix C).

One recurrence covers the three matrix memories of the baselines. With the decay
$c_t = 1 - \alpha_t$ and the error $e_t$,

$$W_t = c_t W_{t-1} - \beta_t\, k_t^\top e_t, \qquad y_t = q_t W_t,$$

* ``"delta"`` (Titans' gate, :func:`minititans.linear_attention.delta_rule`):
  $e_t = k_t W_{t-1} - v_t$;
* ``"gated"`` (Gated DeltaNet, :func:`~minititans.linear_attention.gated_delta_rule`):
  $e_t = c_t\, k_t W_{t-1} - v_t$;
* ``"linear"`` (linear attention, Eqs. 4–5): $e_t = -v_t$, $\beta_t = 1$, $c_t = 1$, so
  $W_t = W_{t-1} + k_t^\top v_t$.

The forward is the numba twin of :mod:`.attention` (its divergence check included); the
backward is :func:`_delta_backward_one`, a reverse-time loop. With $\bar W_t$ the cotangent of
the state after token $t$ (the read of $y_t$ included) and $s_t = c_t$ (gated) or 1:

$$\bar W_t \mathrel{+}= q_t^\top \bar y_t,\quad \bar q_t = \bar y_t W_t^\top,\quad
  \bar e_t = -\beta_t\, k_t \bar W_t,\quad \bar\beta_t = -\langle k_t \bar W_t, e_t\rangle,
  \quad \bar v_t = -\bar e_t,$$
$$\bar k_t = -\beta_t\, \bar W_t e_t^\top + s_t\, \bar e_t W_{t-1}^\top,\quad
  \bar\alpha_t = -\langle \bar W_t, W_{t-1}\rangle - [\text{gated}]\,
  \langle k_t W_{t-1}, \bar e_t\rangle,\quad
  \bar W_{t-1} = c_t \bar W_t + s_t\, k_t^\top \bar e_t ,$$

and $\bar W_0$ is the cotangent of the initial state (for linear attention the $\bar\beta$,
$\bar\alpha$ are not used, and $\bar W_{t-1} = \bar W_t$).

**States: checkpoints and recomputation.** The forward keeps nothing but its inputs. The
backward runs the recurrence once more, keeping $W_t$ every ``C`` tokens
(``checkpoint_every``, by default about $\sqrt T$), then goes through the segments from the
last, recomputing the ``C + 1`` states of one segment from its checkpoint: memory
$d\, d_v (T/C + C)$ per sequence instead of $d\, d_v T$, for one more pass of the recurrence.
Running $W_t$ backwards ($W_{t-1} = (I - \beta_t k_t^\top k_t)^{-1} W_t / c_t$) would need no
memory at all but is ill-conditioned when $\beta_t \lVert k_t \rVert^2 \approx 1$.

**What autograd sees.** One primitive over a batch of sequences,
``_delta_primitive(q (B, T, d), k, v (B, T, d_v), beta (B, T), alpha (B, T), W0 (B, d, d_v))``
returning the tuple ``(y (B, T, d_v), W_T (B, d, d_v))``, so the final state is
differentiable too (streaming). The sequences of the batch run backwards in parallel
(``numba.prange``). The VJP is first order only.
"""

from __future__ import annotations

import math
from collections import namedtuple
from dataclasses import dataclass

import numba
import numpy as np
from autograd.core import defvjp_argnums
from autograd.extend import primitive
from autograd.tracer import getval, isbox

from ._jit import inline_kernel, kernel, parallel_kernel
from .attention import delta_rule, gated_delta_rule, linear_attention_recurrent
from .layout import as_kernel_array

RULES = ("linear", "delta", "gated")  # in the order of the kernels' codes
# the sequence (q, k (T, d), v (T, d_v), beta, alpha (T,)), or a batch of them; also their
# cotangents (numba compiles a named tuple as a struct)
Rows = namedtuple("Rows", "q k v beta alpha")


@inline_kernel
def _error(k, v, beta, alpha, rule, W, ke, e):
    """$k W$ into ``ke`` and the error $e$ into ``e`` ``(d_v,)``, at ``W`` = $W_{t-1}$."""
    d, dv = W.shape
    one = W.dtype.type(1.0)
    ke[:] = 0
    if rule != 0:
        for a in range(d):
            ka = k[a]
            for j in range(dv):
                ke[j] += ka * W[a, j]
    s = (one - alpha) if rule == 2 else one
    for j in range(dv):
        e[j] = s * ke[j] - v[j]


@inline_kernel
def _step(k, v, beta, alpha, rule, W, W_new, ke, e):
    r"""One write: $W_t = c_t W_{t-1} - \beta_t k_t^\top e_t$ from ``W`` into ``W_new``."""
    d, dv = W.shape
    one = W.dtype.type(1.0)
    _error(k, v, beta, alpha, rule, W, ke, e)
    c = one if rule == 0 else one - alpha
    b = one if rule == 0 else beta
    for a in range(d):
        g = -b * k[a]
        for j in range(dv):
            W_new[a, j] = c * W[a, j] + g * e[j]


@kernel
def _delta_backward_one(x, W0, gy, rule, seg, Wbar, g):
    r"""The VJP of one sequence ``x`` (:data:`Rows`) from $W_0$ = ``W0`` ``(d, d_v)`` with
    $\bar y$ = ``gy`` ``(T, d_v)``: ``Wbar`` holds $\bar W_T$ on entry and $\bar W_0$ on exit;
    the cotangents of ``x`` go into ``g`` (:data:`Rows`)."""
    q, k, v, beta, alpha = x
    gq, gk, gv, gbeta, galpha = g
    T, d = q.shape
    dv = v.shape[1]
    dt = q.dtype
    zero, one = dt.type(0.0), dt.type(1.0)
    n_seg = (T + seg - 1) // seg
    ck = np.empty((n_seg, d, dv), dt)  # W_{s C}: the state before each segment
    buf = np.empty((seg + 1, d, dv), dt)  # the states of one segment
    ke = np.empty(dv, dt)
    e = np.empty(dv, dt)
    kWbar = np.empty(dv, dt)
    ebar = np.empty(dv, dt)
    tmp = np.empty(d, dt)
    W = buf[0]
    W[:, :] = W0
    for t in range((n_seg - 1) * seg):  # up to the last checkpoint (the rest is replayed)
        if t % seg == 0:
            ck[t // seg, :, :] = W
        _step(k[t], v[t], beta[t], alpha[t], rule, W, buf[1], ke, e)
        W[:, :] = buf[1]
    ck[n_seg - 1, :, :] = W
    for s in range(n_seg - 1, -1, -1):
        t0 = s * seg
        t1 = min(T, t0 + seg)
        buf[0, :, :] = ck[s]
        for t in range(t0, t1):  # recompute W_{t0} .. W_{t1}
            _step(k[t], v[t], beta[t], alpha[t], rule, buf[t - t0], buf[t - t0 + 1], ke, e)
        for t in range(t1 - 1, t0 - 1, -1):
            W_prev = buf[t - t0]  # W_{t-1}
            W_t = buf[t - t0 + 1]
            c = one if rule == 0 else one - alpha[t]
            b = one if rule == 0 else beta[t]
            sc = c if rule == 2 else one  # s_t: how W_{t-1} enters the error
            _error(k[t], v[t], beta[t], alpha[t], rule, W_prev, ke, e)
            # the read y_t = q_t W_t: q̄_t = ȳ_t W_tᵀ, W̄_t += q_tᵀ ȳ_t; then k_t W̄_t
            np.dot(W_t, gy[t], gq[t])
            kWbar[:] = 0
            for a in range(d):
                qa = q[t, a]
                ka = k[t, a]
                for j in range(dv):
                    Wbar[a, j] += qa * gy[t, j]
                    kWbar[j] += ka * Wbar[a, j]
            gb = zero
            for j in range(dv):
                ebar[j] = -b * kWbar[j]
                gb -= kWbar[j] * e[j]
                gv[t, j] = -ebar[j]
            gbeta[t] = gb if rule != 0 else zero
            # k̄_t = -β_t W̄_t e_tᵀ + s_t W_{t-1} ē_tᵀ
            np.dot(Wbar, e, tmp)
            for a in range(d):
                gk[t, a] = -b * tmp[a]
            if rule == 0:
                galpha[t] = zero
                continue  # linear attention: W̄_{t-1} = W̄_t, no gates
            np.dot(W_prev, ebar, tmp)
            for a in range(d):
                gk[t, a] += sc * tmp[a]
            # ᾱ_t = -c̄_t: c_t scales W_{t-1} in the write and, gated, in the error
            gc = np.dot(Wbar.reshape(d * dv), W_prev.reshape(d * dv))
            if rule == 2:
                for j in range(dv):
                    gc += ke[j] * ebar[j]
            galpha[t] = -gc
            for a in range(d):
                ka = k[t, a]
                for j in range(dv):
                    Wbar[a, j] = c * Wbar[a, j] + sc * ka * ebar[j]


@parallel_kernel
def _delta_backward(x, W0, gy, rule, seg, Wbar, g):
    for n in numba.prange(x.q.shape[0]):
        _delta_backward_one(Rows(x.q[n], x.k[n], x.v[n], x.beta[n], x.alpha[n]), W0[n], gy[n],
                            rule, seg, Wbar[n],
                            Rows(g.q[n], g.k[n], g.v[n], g.beta[n], g.alpha[n]))


@dataclass(frozen=True)
class _Config:
    """Everything about one call that is not an array."""

    rule: str
    dtype: np.dtype
    checkpoint_every: int
    on_nonfinite: str


def _forward(q, k, v, beta, alpha, W0, cf):
    """The numba twins of :mod:`.attention` on a batch: ``(y (B, T, d_v), W_T (B, d, d_v))``."""
    if cf.rule == "linear":
        z0 = np.zeros(W0.shape[:2], W0.dtype)  # the normaliser's sum: not used (normalize=False)
        y, (W, _) = linear_attention_recurrent(q, k, v, state=(W0, z0),
                                               on_nonfinite=cf.on_nonfinite)
        return y, W
    fn = gated_delta_rule if cf.rule == "gated" else delta_rule
    out = [fn(q[n], k[n], v[n], beta[n], alpha[n], state=W0[n], return_state=True,
              on_nonfinite=cf.on_nonfinite) for n in range(q.shape[0])]
    return np.stack([o[0] for o in out]), np.stack([o[1] for o in out])


@primitive
def _delta_primitive(q, k, v, beta, alpha, W0, *, config):
    """The recurrence of ``config.rule`` on a batch: ``(y, W_T)``."""
    dt = config.dtype
    return _forward(*(as_kernel_array(x, dt) for x in (q, k, v, beta, alpha, W0)), config)


def _delta_vjp(argnums, ans, args, kwargs):
    cf = kwargs["config"]
    dt = cf.dtype

    def vjp(g):
        if any(isbox(x) for x in (*g, *args)):
            raise NotImplementedError(
                "the VJP of the numba delta rule is first order only; use "
                "backend='reference' for higher derivatives")
        q, k, v, beta, alpha, W0 = (as_kernel_array(x, dt) for x in args)
        gy = as_kernel_array(g[0], dt)
        Wbar = np.array(g[1], dtype=dt, order="C")  # W̄_T in, W̄_0 out
        gq, gk, gv = np.empty_like(q), np.empty_like(k), np.empty_like(v)
        gbeta, galpha = np.empty_like(beta), np.empty_like(alpha)
        if q.shape[0] and q.shape[1]:
            _delta_backward(Rows(q, k, v, beta, alpha), W0, gy, RULES.index(cf.rule),
                            cf.checkpoint_every, Wbar, Rows(gq, gk, gv, gbeta, galpha))
        else:
            gq[...], gk[...], gv[...], gbeta[...], galpha[...] = 0, 0, 0, 0, 0
        grads = (gq, gk, gv, gbeta, galpha, Wbar)
        return tuple(grads[i].astype(np.asarray(args[i]).dtype, copy=False) for i in argnums)

    return vjp


defvjp_argnums(_delta_primitive, _delta_vjp)


def default_checkpoint_every(T: int) -> int:
    r"""Tokens between two stored states in the backward: about $\sqrt T$."""
    return max(1, round(math.sqrt(T)))


def delta_rule_batched(q, k, v, beta, alpha, state, *, rule, on_nonfinite="raise",
                       checkpoint_every=None):
    r"""The recurrence of ``rule`` (module docstring) on a batch, differentiable (first order).

    Args:
        q, k: ``(B, T, d)``; v: ``(B, T, d_v)``; beta, alpha: ``(B, T)`` (ignored by
            ``"linear"``); state: $W_0$ ``(B, d, d_v)``. Any of them may be an autograd box;
            the values are checked by the forward twins of :mod:`.attention`.
        rule: ``"linear"``, ``"delta"`` or ``"gated"``.
        on_nonfinite: "raise" or "warn" when the weights or an output become NaN or inf.
        checkpoint_every: tokens between stored states in the backward (None: about
            $\sqrt T$).

    Returns:
        ``(y (B, T, d_v), W_T (B, d, d_v))`` in the common dtype of ``q``, ``k``, ``v``.
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {', '.join(map(repr, RULES))}, got {rule!r}")
    plain = [np.asarray(getval(x)) for x in (q, k, v)]
    for name, x, ndim in (("q", plain[0], 3), ("k", plain[1], 3), ("v", plain[2], 3),
                          ("state", np.asarray(getval(state)), 3)):
        if x.ndim != ndim:
            raise ValueError(f"{name} must have {ndim} axes (batch first), got shape {x.shape}")
    B, T, d = plain[0].shape
    if plain[1].shape != (B, T, d) or plain[2].shape[:2] != (B, T):
        raise ValueError(f"k must have the shape of q {(B, T, d)} and v {(B, T, 'd_v')}, got "
                         f"{plain[1].shape} and {plain[2].shape}")
    if np.shape(getval(state)) != (B, d, plain[2].shape[2]):
        raise ValueError(f"state must have shape {(B, d, plain[2].shape[2])}, got "
                         f"{np.shape(getval(state))}")
    if rule != "linear":
        for name, gate in (("beta", beta), ("alpha", alpha)):
            if np.shape(getval(gate)) != (B, T):
                raise ValueError(f"{name} must have shape {(B, T)}, got {np.shape(getval(gate))}")
    seg = default_checkpoint_every(T) if checkpoint_every is None else int(checkpoint_every)
    if seg < 1:
        raise ValueError(f"checkpoint_every must be a positive int, got {checkpoint_every!r}")
    config = _Config(rule=rule, dtype=np.result_type(*plain), checkpoint_every=seg,
                     on_nonfinite=on_nonfinite)
    if rule == "linear":
        shape = plain[0].shape[:2]
        beta, alpha = np.ones(shape), np.zeros(shape)
    if not any(isbox(x) for x in (q, k, v, beta, alpha, state)):
        dt = config.dtype
        return _forward(*(as_kernel_array(x, dt) for x in (q, k, v, beta, alpha, state)),
                        config)
    res = _delta_primitive(q, k, v, beta, alpha, state, config=config)
    return res[0], res[1]
