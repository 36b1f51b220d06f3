r"""MAG, memory as a gate (Titans Eqs. 26–28).

$$\tilde x = [p_1 \dots p_{N_p}] \,\|\, x \ \text{(Eq. 26)}, \quad
  y = \text{SW-Attn}^*(\tilde x) \ \text{(Eq. 27)}, \quad
  o = y \otimes \mathcal{M}(\tilde x) \ \text{(Eq. 28)}.$$

The attention branch sees the ``window`` most recent tokens and the persistent prefix
(:func:`minititans.attention.sliding_window_mask`); the memory branch runs the LMM over the whole
$\tilde x$. The two branches are combined by :func:`minititans.models.blocks.combine`.
"""

from __future__ import annotations

from ..layers import init_linear, linear, rms_norm
from .blocks import (
    attention,
    combine,
    init_attention,
    init_combine,
    init_memory_core,
    init_norm,
    init_persistent_tokens,
    memory_core,
)
from .lmm import with_persistent
from .streaming import attention_state, attention_stream, memory_state, memory_stream


def init_layer(rng, cfg) -> dict:
    """One MAG block.

    Returns:
        ``{"norm": {"g": (d,)}, "persistent": {"P": (N_p, d)}, "attn": init_attention,
        "memory": init_memory_core, "combine": init_combine, "W_O": {"W": (d, d)}}``.
    """
    return {"norm": init_norm(rng, cfg), "persistent": init_persistent_tokens(rng, cfg),
            "attn": init_attention(rng, cfg), "memory": init_memory_core(rng, cfg),
            "combine": init_combine(rng, cfg.d_model),
            "W_O": init_linear(rng, cfg.d_model, cfg.d_model)}


def layer(p, h, cfg):
    """One MAG block on ``h`` ``(B, T, d)``; returns ``(B, T, d)``."""
    n_p = cfg.num_persistent
    x = rms_norm(p["norm"], h)
    x_tilde = with_persistent(p["persistent"], x, cfg)  # Eq. 26: (B, N_p + T, d)
    # Eq. 27: SW-Attn*, the window plus the visible prefix (sliding_window_mask)
    y = attention(p["attn"], x_tilde, cfg, window=cfg.window, prefix=n_p)
    m, _, _ = memory_core(p["memory"], x_tilde, cfg)  # M(x̃), the LMM over x̃
    o = combine(p["combine"], y, m)  # Eq. 28: y ⊗ M(x̃)
    return h + linear(p["W_O"], o[:, n_p:])


def layer_state(p, cfg, batch_size, t) -> dict:
    """The state of :func:`layer_stream` after ``t`` tokens: the window's KV cache, the memory."""
    n_p = cfg.num_persistent
    return {"attn": attention_state(cfg, batch_size, t, window=cfg.window, prefix=n_p),
            "memory": memory_state(p["memory"], cfg, batch_size,
                                   (n_p + t if t else 0) % cfg.chunk_size)}


def layer_stream(p, h, cfg, state, t):
    """:func:`layer` on the next tokens ``h`` ``(B, T, d)`` after ``t`` tokens: ``(h, state)``."""
    n_p = cfg.num_persistent if t == 0 else 0  # the first piece carries the prefix
    x = rms_norm(p["norm"], h)
    x_tilde = with_persistent(p["persistent"], x, cfg) if n_p else x  # Eq. 26
    y, attn = attention_stream(p["attn"], x_tilde, cfg, state["attn"], window=cfg.window,
                               prefix=cfg.num_persistent)  # Eq. 27
    m, memory = memory_stream(p["memory"], x_tilde, cfg, state["memory"], fresh=t == 0)
    o = combine(p["combine"], y, m)  # Eq. 28
    return h + linear(p["W_O"], o[:, n_p:]), {"attn": attn, "memory": memory}
