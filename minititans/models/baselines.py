r"""Baselines: sliding-window attention (SWA), full attention, linear attention, gated delta rule.

Each is one pre-norm residual block, $h \leftarrow h + \mathrm{mixer}(\mathrm{RMS}(h))$, with the
same embedding, feed-forward layer and head as the Titans, and no persistent tokens. The
attention mixers use the projections with Section 4.4's convolution (so a one-layer model
can tell which token follows which); the linear mixers use Section 4.4's SiLU and
$\ell_2$-normalised $q$, $k$ and the output gate, exactly as the memory does.
"""

from __future__ import annotations

import autograd.numpy as np

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


def init_attention_layer(rng, cfg) -> dict:
    return {"norm": init_norm(rng, cfg), "attn": init_attention(rng, cfg)}


def swa_layer(p, h, cfg):
    """Sliding-window attention (Eq. 2 with ``window``): token i sees i - w < j <= i."""
    return h + attention(p["attn"], rms_norm(p["norm"], h), cfg, window=cfg.window)


def transformer_layer(p, h, cfg):
    """Full causal attention (Eq. 2)."""
    return h + attention(p["attn"], rms_norm(p["norm"], h), cfg)


def init_linear_layer(rng, cfg) -> dict:
    d = cfg.d_model
    return {"norm": init_norm(rng, cfg), "qkv": init_qkv(rng, cfg),
            "out": init_gated_output(rng, cfg),
            # β_t and α_t of the gated delta rule (ignored by linear attention)
            "w_beta": 0.01 * rng.standard_normal(d), "b_beta": np.zeros(()),
            "w_alpha": 0.01 * rng.standard_normal(d), "b_alpha": np.full((), -4.0)}


def linear_attention_layer(p, h, cfg):
    """Linear attention, Eqs. (4)-(5): $y_t = q_t \\sum_{j \\le t} k_j^\\top v_j$."""
    x = rms_norm(p["norm"], h)
    q, k, v, _ = qkv(p["qkv"], x)
    return h + gated_output(p["out"], linear_attention(q, k, v), x)


def gated_delta_layer(p, h, cfg):
    r"""Gated DeltaNet: $W_t = W' - \beta_t k_t^\top(k_t W' - v_t)$, $W' = (1-\alpha_t)W_{t-1}$."""
    x = rms_norm(p["norm"], h)
    q, k, v, _ = qkv(p["qkv"], x)
    beta = sigmoid(x @ p["w_beta"] + p["b_beta"])  # (B, T) in (0, 1): stable with |k| = 1
    alpha = sigmoid(x @ p["w_alpha"] + p["b_alpha"])  # (B, T), starts near 0.02
    # one recurrence per sequence
    y = np.stack([gated_delta_rule(q[b], k[b], v[b], beta[b], alpha[b])
                  for b in range(h.shape[0])])  # (B, T, d)
    return h + gated_output(p["out"], y, x)
