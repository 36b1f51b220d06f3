r"""MAL, memory as a layer (Titans Eqs. 29–31).

$$\tilde x = [p_1 \dots p_{N_p}] \,\|\, x \ \text{(Eq. 29)}, \quad
  y = \mathcal{M}(\tilde x) \ \text{(Eq. 30)}, \quad
  o = \text{SW-Attn}(y) \ \text{(Eq. 31)}.$$

Two pre-norm residual sub-layers on the extended sequence: the LMM block (Eq. 30), then
sliding-window attention with the persistent prefix visible (Eq. 31). The persistent rows
are dropped at the end.
"""

from __future__ import annotations

from ..layers import rms_norm
from .blocks import attention, init_attention, init_norm, init_persistent_tokens
from .lmm import init_layer as init_lmm_layer
from .lmm import layer as lmm_layer
from .lmm import layer_stream as lmm_layer_stream
from .lmm import with_persistent
from .streaming import attention_state, attention_stream, memory_state


def init_layer(rng, cfg) -> dict:
    """One MAL block: the LMM layer (without its own prefix), then sliding-window attention.

    Returns:
        ``{"persistent": {"P": (N_p, d)}, "lmm": lmm.init_layer, "attn_norm": {"g": (d,)},
        "attn": init_attention}``.
    """
    lmm = init_lmm_layer(rng, cfg.with_(num_persistent=0))  # the prefix is added here once
    return {"persistent": init_persistent_tokens(rng, cfg), "lmm": lmm,
            "attn_norm": init_norm(rng, cfg), "attn": init_attention(rng, cfg)}


def layer(p, h, cfg):
    """One MAL block on ``h`` ``(B, T, d)``; returns ``(B, T, d)``."""
    n_p = cfg.num_persistent
    h_tilde = with_persistent(p["persistent"], h, cfg)  # Eq. 29: (B, N_p + T, d)
    y = lmm_layer(p["lmm"], h_tilde, cfg.with_(num_persistent=0))  # Eq. 30, residual inside
    # Eq. 31: SW-Attn with the persistent prefix visible (sliding_window_mask)
    o = y + attention(p["attn"], rms_norm(p["attn_norm"], y), cfg, window=cfg.window,
                      prefix=n_p)
    return o[:, n_p:]


def layer_state(p, cfg, batch_size, t) -> dict:
    """The state of :func:`layer_stream` after ``t`` tokens: the LMM's memory, the KV cache."""
    n_p = cfg.num_persistent
    return {"lmm": memory_state(p["lmm"]["memory"], cfg, batch_size,
                                (n_p + t if t else 0) % cfg.chunk_size),
            "attn": attention_state(cfg, batch_size, t, window=cfg.window, prefix=n_p)}


def layer_stream(p, h, cfg, state, t):
    """:func:`layer` on the next tokens ``h`` ``(B, T, d)`` after ``t`` tokens: ``(h, state)``."""
    n_p = cfg.num_persistent if t == 0 else 0  # the first piece carries the prefix
    h_tilde = with_persistent(p["persistent"], h, cfg) if n_p else h  # Eq. 29
    # Eq. 30; the LMM sees h̃ as its whole input (t = 0 marks its memory as fresh)
    y, lmm = lmm_layer_stream(p["lmm"], h_tilde, cfg.with_(num_persistent=0), state["lmm"], t)
    a, attn = attention_stream(p["attn"], rms_norm(p["attn_norm"], y), cfg, state["attn"],
                               window=cfg.window, prefix=cfg.num_persistent)  # Eq. 31
    return (y + a)[:, n_p:], {"lmm": lmm, "attn": attn}
