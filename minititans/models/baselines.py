r"""Baselines: sliding-window attention (SWA), full attention, linear attention, gated delta rule.

Each is one pre-norm residual block, $h \leftarrow h + \mathrm{mixer}(\mathrm{RMS}(h))$, with the
same embedding, feed-forward layer and head as the Titans, and no persistent tokens. The
attention mixers use the projections with Section 4.4's convolution (so a one-layer model
can tell which token follows which); the linear mixers use Section 4.4's SiLU and
$\ell_2$-normalised $q$, $k$ and the output gate, exactly as the memory does.
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


def linear_attention_layer(p, h, cfg):
    """Linear attention, Eqs. 4–5: $y_t = q_t \\sum_{j \\le t} k_j^\\top v_j$."""
    x = rms_norm(p["norm"], h)
    q, k, v, _ = qkv(p["qkv"], x)
    d = cfg.d_model
    y, _ = linear_attention_chunks(q, k, v, np.zeros((np.shape(h)[0], d, d)))
    return h + gated_output(p["out"], y, x)


def gated_delta_layer(p, h, cfg):
    r"""Gated DeltaNet: $W_t = W' - \beta_t k_t^\top(k_t W' - v_t)$, $W' = (1-\alpha_t)W_{t-1}$."""
    x = rms_norm(p["norm"], h)
    q, k, v, _ = qkv(p["qkv"], x)
    beta = sigmoid(x @ p["w_beta"] + p["b_beta"])  # (B, T) in (0, 1): stable with |k| = 1
    alpha = sigmoid(x @ p["w_alpha"] + p["b_alpha"])  # (B, T), starts near 0.02
    # one recurrence per sequence
    y = anp.stack([gated_delta_rule(q[b], k[b], v[b], beta[b], alpha[b])
                  for b in range(h.shape[0])])  # (B, T, d)
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
    if cfg.model == "linear_attention":
        y, W = linear_attention_chunks(q, k, v, state["W"])
    else:
        beta = sigmoid(x @ p["w_beta"] + p["b_beta"])
        alpha = sigmoid(x @ p["w_alpha"] + p["b_alpha"])
        out = [gated_delta_rule(q[b], k[b], v[b], beta[b], alpha[b], state=state["W"][b],
                                return_state=True) for b in range(h.shape[0])]
        y, W = anp.stack([o[0] for o in out]), anp.stack([o[1] for o in out])
    return h + gated_output(p["out"], y, x), {"conv": conv_dict(conv), "W": W}
