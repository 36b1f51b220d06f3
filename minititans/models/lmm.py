r"""LMM: the neural long-term memory alone as a sequence model (Titans Sections 3 and 4.4).

One block, pre-norm and residual:

$$x = \mathrm{RMS}(h), \quad \tilde x = [p_1 \dots p_{N_p}] \,\|\, x \ \text{(Eq. 19)}, \quad
  y = \mathcal{M}(\tilde x) \ \text{(Eqs. 11–15)}, \quad
  h \leftarrow h + (\mathrm{RMS}(y) \odot \sigma(x W_g))\, W_O .$$

The memory is written and read token by token (read after write), so the block is causal.
Streamed (:func:`layer_stream`), the persistent tokens are written by the first piece only;
the state is the memory's (:func:`minititans.models.streaming.memory_state`).
"""

from __future__ import annotations

from ..layers import prepend_persistent, rms_norm
from .blocks import (
    gated_output,
    init_gated_output,
    init_memory_core,
    init_norm,
    init_persistent_tokens,
    memory_core,
)
from .streaming import memory_state, memory_stream


def init_layer(rng, cfg) -> dict:
    """One LMM block.

    Returns:
        ``{"norm": {"g": (d,)}, "persistent": {"P": (N_p, d)}, "memory": init_memory_core,
        "out": init_gated_output}`` (see :mod:`minititans.models.blocks`).
    """
    return {"norm": init_norm(rng, cfg), "persistent": init_persistent_tokens(rng, cfg),
            "memory": init_memory_core(rng, cfg), "out": init_gated_output(rng, cfg)}


def with_persistent(p, x, cfg):
    """Eq. 19: prepend the persistent tokens to ``x`` ``(B, T, d)`` (none if N_p = 0)."""
    if not cfg.num_persistent:
        return x
    return prepend_persistent(p, x)  # (B, N_p + T, d)


def layer(p, h, cfg):
    """One LMM block on ``h`` ``(B, T, d)``; returns ``(B, T, d)``."""
    x = rms_norm(p["norm"], h)
    x_tilde = with_persistent(p["persistent"], x, cfg)  # (B, N_p + T, d)
    y, _, _ = memory_core(p["memory"], x_tilde, cfg)
    y = y[:, cfg.num_persistent:]  # (B, T, d): the outputs at the sequence's own positions
    return h + gated_output(p["out"], y, x)


def layer_state(p, cfg, batch_size, t) -> dict:
    """The state of :func:`layer_stream` after ``t`` tokens (``N_p + t`` memory writes)."""
    n_written = cfg.num_persistent + t if t else 0
    return memory_state(p["memory"], cfg, batch_size, n_written % cfg.chunk_size)


def layer_stream(p, h, cfg, state, t):
    """:func:`layer` on the next tokens ``h`` ``(B, T, d)`` after ``t`` tokens: ``(h, state)``."""
    x = rms_norm(p["norm"], h)
    n_p = cfg.num_persistent if t == 0 else 0  # the first piece writes the persistent tokens
    x_tilde = with_persistent(p["persistent"], x, cfg) if n_p else x
    y, state = memory_stream(p["memory"], x_tilde, cfg, state, fresh=t == 0)
    return h + gated_output(p["out"], y[:, n_p:], x), state
