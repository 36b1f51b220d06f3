r"""MAC, memory as a context (Titans Eqs. 21-25), in the paper's order.

The sequence is cut into segments $S^{(t)}$ of ``segment_len`` tokens. For each segment, with
the memory $\mathcal{M}_{t-1}$ left by the previous one:

1. retrieve (Eq. 21): $h_t = \mathcal{M}^*_{t-1}(q_t)$, $q_t = S^{(t)} W_Q$ — a read, no update;
2. attend (Eqs. 22-23): $y_t = \mathrm{Attn}([p_1 \dots p_{N_p}] \,\|\, \mathrm{RMS}(h_t)
   \,\|\, S^{(t)})$, kept at the segment's own positions (the memory tokens are
   RMS-normalised with a learned gain, see docs/design-decisions.md);
3. store (Eq. 24): $\mathcal{M}_t = \mathcal{M}_{t-1}(y_t)$ — keys and values are
   projected from the *attention output* $y_t$;
4. read and gate (Eq. 25): $o_t = y_t \otimes \mathcal{M}^*_t(y_t)$.

Step 4 reads token by token ($\mathcal{M}_i$ after writing tokens $\le i$ of the segment),
so a token never sees a memory written by a later token; with ``memory_causal`` (default)
memory token $m$ of step 1 is visible only from segment token $m$ on
(:func:`minititans.attention.mac_mask`). The block is then causal.
"""

from __future__ import annotations

import autograd.numpy as np

from ..activations import silu
from ..attention import mac_mask, multi_head_attention
from ..layers import init_linear, l2_normalize, linear, rms_norm
from ..memory import memory_forward
from .blocks import (
    combine,
    init_attention,
    init_combine,
    init_memory_core,
    init_norm,
    init_persistent_tokens,
    initial_states,
    memory_core,
    proj,
)
from .lmm import with_persistent


def init_layer(rng, cfg) -> dict:
    return {"norm": init_norm(rng, cfg), "persistent": init_persistent_tokens(rng, cfg),
            "attn": init_attention(rng, cfg), "memory": init_memory_core(rng, cfg),
            "memory_tokens": init_norm(rng, cfg), "combine": init_combine(rng, cfg.d_model),
            "W_O": init_linear(rng, cfg.d_model, cfg.d_model)}


def layer(p, h, cfg):
    """One MAC block on ``h`` ``(B, T, d)``; returns ``(B, T, d)``."""
    x = rms_norm(p["norm"], h)
    B, T, _ = x.shape
    C, n_p = cfg.segment_len, cfg.num_persistent
    attn, mem = p["attn"], p["memory"]
    # q_t = S W_Q for Eq. 21, along the whole token stream (the convolution is causal)
    q_x = l2_normalize(silu(proj(mem["qkv"]["q"], x)[0]))  # (B, T, d)
    # the attention's projections of the segment tokens, also along the stream
    QKV_x = [proj(attn["qkv"][n], x)[0] for n in ("q", "k", "v")]  # 3 x (B, T, d)
    P = with_persistent(p["persistent"], x[:, :0], cfg)  # (B, N_p, d)
    states, conv_states = initial_states(mem, B), None
    outs = []
    for start in range(0, T, C):
        seg = slice(start, min(start + C, T))
        n = seg.stop - seg.start
        # Eq. 21: h_t = M*_{t-1}(q_t), each sequence's memory as it was before this segment
        h_mem = np.stack([memory_forward(s.params, q_x[b, seg])
                          for b, s in enumerate(states)])  # (B, n, d)
        # as memory tokens, RMS-normalised: their scale drifts as the memory fills or
        # forgets, and attention logits must not drift with it
        h_mem = rms_norm(p["memory_tokens"], h_mem)
        # Eq. 22: S̃ = [p] ‖ h_t ‖ S^(t); persistent and memory tokens are projected
        # without the convolution (they are not part of the token stream)
        prefix = np.concatenate([P, h_mem], axis=1)  # (B, N_p + n, d)
        Q, K, V = (np.concatenate([linear(attn["qkv"][name]["lin"], prefix), z[:, seg]], axis=1)
                   for name, z in zip(("q", "k", "v"), QKV_x))  # (B, N_p + 2n, d)
        mask = mac_mask(n_p, n, n, memory_causal=cfg.memory_causal)
        # Eq. 23: y_t = Attn(S̃) at the segment's positions, with the residual connection
        # of Section 4.4 (so y_t still carries the token it stands at)
        y = x[:, seg] + linear(attn["W_O"],
                               multi_head_attention(Q, K, V, cfg.num_heads,
                                                    mask=mask)[:, n_p + n:])
        # Eq. 24: M_t = M_{t-1}(y_t), then M*_t(y_t) read token by token (read after write)
        m, states, conv_states = memory_core(mem, y, cfg, states, conv_states)  # (B, n, d)
        outs.append(combine(p["combine"], y, m))  # Eq. 25: o_t = y_t ⊗ M*_t(y_t)
    return h + linear(p["W_O"], np.concatenate(outs, axis=1))
