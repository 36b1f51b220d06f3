r"""LMM: the neural long-term memory alone as a sequence model (Titans Sections 3 and 4.4).

One block, pre-norm and residual:

$$x = \mathrm{RMS}(h), \quad \tilde x = [p_1 \dots p_{N_p}] \,\|\, x \ \text{(Eq. 19)}, \quad
  y = \mathcal{M}(\tilde x) \ \text{(Eqs. 11-15)}, \quad
  h \leftarrow h + (\mathrm{RMS}(y) \odot \sigma(x W_g))\, W_O .$$

The memory is written and read token by token (read after write), so the block is causal.
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


def init_layer(rng, cfg) -> dict:
    return {"norm": init_norm(rng, cfg), "persistent": init_persistent_tokens(rng, cfg),
            "memory": init_memory_core(rng, cfg), "out": init_gated_output(rng, cfg)}


def with_persistent(p, x, cfg):
    """Eq. (19): prepend the persistent tokens to ``x`` ``(B, T, d)`` (none if N_p = 0)."""
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
