r"""Baselines: sliding-window attention (SWA), full attention, linear attention, gated delta rule.

Each is one pre-norm residual block, $h \leftarrow h + \mathrm{mixer}(\mathrm{RMS}(h))$, with the
same embedding, feed-forward layer and head as the Titans, and no persistent tokens. The
attention mixers use the projections with Section 4.4's convolution (so a one-layer model
can tell which token follows which); the linear mixers use Section 4.4's SiLU and
$\ell_2$-normalised $q$, $k$ and the output gate, exactly as the memory does.

With ``cfg.backend == "numba"`` the two matrix memories run as one numba recurrence over
the batch with a hand-written VJP (:mod:`minititans.kernels.delta_vjp`), in ``apply`` and
in ``stream`` alike; with ``"reference"``, linear attention runs in chunks of its parallel
form and the gated delta rule token by token, both differentiated by autograd.
"""

from __future__ import annotations

import autograd.numpy as anp
import numpy as np

from ..activations import sigmoid
from ..layers import rms_norm
from ..linear_attention import gated_delta_rule, linear_attention
from .blocks import (
    attention,
    gated_output,
    init_attention,
    init_gated_output,
    init_norm,
    init_qkv,
    qkv,
)
from .streaming import attention_state, attention_stream, conv_dict, conv_state


def init_attention_layer(rng, cfg) -> dict:
    """SWA's and the transformer's block: ``{"norm": {"g": (d,)}, "attn": init_attention}``."""
    return {"norm": init_norm(rng, cfg), "attn": init_attention(rng, cfg)}


def swa_layer(p, h, cfg):
    """Sliding-window attention (Eq. 2 with ``window``): token i sees i - w < j <= i."""
    return h + attention(p["attn"], rms_norm(p["norm"], h), cfg, window=cfg.window)


def transformer_layer(p, h, cfg):
    """Full causal attention (Eq. 2)."""
    return h + attention(p["attn"], rms_norm(p["norm"], h), cfg)


def init_linear_layer(rng, cfg) -> dict:
    """The block of linear attention and the gated delta rule.

    Returns:
        ``{"norm": {"g": (d,)}, "qkv": init_qkv, "out": init_gated_output, "w_beta": (d,),
        "b_beta": (), "w_alpha": (d,), "b_alpha": ()}`` (β and α: the gated delta rule's).
    """
    d = cfg.d_model
    return {"norm": init_norm(rng, cfg), "qkv": init_qkv(rng, cfg),
            "out": init_gated_output(rng, cfg),
            # β_t and α_t of the gated delta rule (ignored by linear attention)
            "w_beta": 0.01 * rng.standard_normal(d), "b_beta": anp.zeros(()),
            "w_alpha": 0.01 * rng.standard_normal(d), "b_alpha": anp.full((), -4.0)}


def linear_attention_chunks(q, k, v, M, size=64):
    r"""Eqs. 4–5 from $M_0$ = ``M`` ``(B, d, d_v)``, in chunks of ``size`` tokens.

    Per chunk: $y = q M + \mathrm{tril}(q k^\top) v$ (the parallel form inside the chunk),
    then $M \leftarrow M + k^\top v$; no $T \times T$ matrix. Returns ``(y, M_T)``.
    """
    ys = []
    for s in range(0, q.shape[1], size):
        c = slice(s, s + size)
        ys.append(anp.matmul(q[:, c], M) + linear_attention(q[:, c], k[:, c], v[:, c]))
        M = M + anp.matmul(anp.swapaxes(k[:, c], 1, 2), v[:, c])  # M += Σ k_j^T v_j
    return anp.concatenate(ys, axis=1), M


def gates(p, x):
    """The gated delta rule's $\\beta_t$, $\\alpha_t$ from the normalised input ``x``
    ``(B, T, d)``: ``(beta, alpha)``, each ``(B, T)``."""
    beta = sigmoid(x @ p["w_beta"] + p["b_beta"])  # in (0, 1): stable with |k| = 1
    alpha = sigmoid(x @ p["w_alpha"] + p["b_alpha"])  # starts near 0.02
    return beta, alpha


def matrix_memory(q, k, v, W, cfg, beta=None, alpha=None):
    """Linear attention (``beta`` None) or the gated delta rule from $W_0$ = ``W``.

    ``q``, ``k``, ``v`` ``(B, T, d)``, ``W`` ``(B, d, d)``, ``beta``, ``alpha`` ``(B, T)``;
    ``cfg.backend`` picks the numba recurrence or the reference. Returns ``(y, W_T)``.
    """
    if cfg.backend == "numba":
        from ..kernels.delta_vjp import delta_rule_batched  # imports numba: only when asked

        if beta is None:
            return delta_rule_batched(q, k, v, None, None, W, rule="linear")
        return delta_rule_batched(q, k, v, beta, alpha, W, rule="gated")
    if beta is None:
        return linear_attention_chunks(q, k, v, W)
    # one recurrence per sequence
    out = [gated_delta_rule(q[b], k[b], v[b], beta[b], alpha[b], state=W[b], return_state=True)
           for b in range(np.shape(q)[0])]
    return anp.stack([o[0] for o in out]), anp.stack([o[1] for o in out])  # (B, T, d), (B, d, d)


def linear_attention_layer(p, h, cfg):
    """Linear attention, Eqs. 4–5: $y_t = q_t \\sum_{j \\le t} k_j^\\top v_j$."""
    x = rms_norm(p["norm"], h)
    q, k, v, _ = qkv(p["qkv"], x)
    d = cfg.d_model
    y, _ = matrix_memory(q, k, v, np.zeros((np.shape(h)[0], d, d)), cfg)
    return h + gated_output(p["out"], y, x)


def gated_delta_layer(p, h, cfg):
    r"""Gated DeltaNet: $W_t = W' - \beta_t k_t^\top(k_t W' - v_t)$, $W' = (1-\alpha_t)W_{t-1}$."""
    x = rms_norm(p["norm"], h)
    q, k, v, _ = qkv(p["qkv"], x)
    d = cfg.d_model
    y, _ = matrix_memory(q, k, v, np.zeros((np.shape(h)[0], d, d)), cfg, *gates(p, x))
    return h + gated_output(p["out"], y, x)


# --- streaming: each mixer's state between calls --------------------------------------------


def attention_layer_state(p, cfg, batch_size, t) -> dict:
    """SWA: the last ``w - 1`` keys and values; the transformer: all of them (a KV cache)."""
    window = cfg.window if cfg.model == "swa" else None
    return attention_state(cfg, batch_size, t, window=window, prefix=0)


def attention_layer_stream(p, h, cfg, state, t):
    """:func:`swa_layer` or :func:`transformer_layer` on the next tokens: ``(h, state)``."""
    window = cfg.window if cfg.model == "swa" else None
    y, state = attention_stream(p["attn"], rms_norm(p["norm"], h), cfg, state, window=window,
                                prefix=0)
    return h + y, state


def linear_layer_state(p, cfg, batch_size, t) -> dict:
    """The matrix memory $M_t$ (``W`` ``(B, d, d)``) and the convolutions' last inputs."""
    d = cfg.d_model
    return {"conv": conv_state(cfg, batch_size), "W": np.zeros((batch_size, d, d))}


def linear_layer_stream(p, h, cfg, state, t):
    """:func:`linear_attention_layer` or :func:`gated_delta_layer` on the next tokens."""
    x = rms_norm(p["norm"], h)
    q, k, v, conv = qkv(p["qkv"], x, state["conv"])
    gated = () if cfg.model == "linear_attention" else gates(p, x)
    y, W = matrix_memory(q, k, v, state["W"], cfg, *gated)
    return h + gated_output(p["out"], y, x), {"conv": conv_dict(conv), "W": W}
