r"""MAC, memory as a context (Titans Eqs. 21–25), in the paper's order.

The sequence is cut into segments $S^{(t)}$ of ``segment_len`` tokens. For each segment, with
the memory $\mathcal{M}_{t-1}$ left by the previous one:

1. retrieve (Eq. 21): $h_t = \mathcal{M}^*_{t-1}(q_t)$, $q_t = S^{(t)} W_Q$ — a read, no update;
2. attend (Eqs. 22–23): $y_t = \mathrm{Attn}([p_1 \dots p_{N_p}] \,\|\, \mathrm{RMS}(h_t)
   \,\|\, S^{(t)})$, kept at the segment's own positions (the memory tokens are
   RMS-normalised with a learned gain, see docs/design-decisions.md);
3. store (Eq. 24): $\mathcal{M}_t = \mathcal{M}_{t-1}(y_t)$ — keys and values are
   projected from the *attention output* $y_t$;
4. read and gate (Eq. 25): $o_t = y_t \otimes \mathcal{M}^*_t(y_t)$.

Step 4 reads token by token ($\mathcal{M}_i$ after writing tokens $\le i$ of the segment),
so a token never sees a memory written by a later token; with ``memory_causal`` (default)
memory token $m$ of step 1 is visible only from segment token $m$ on
(:func:`minititans.attention.mac_mask`). The block is then causal.

Streamed (:func:`layer_stream`), a piece may end anywhere inside a segment: the state keeps
the memory as it was at the segment's start (for Eq. 21), the keys and values of the
segment's memory tokens and tokens read so far (the attention of Eqs. 22–23), and the
memory being written (Eq. 24). With ``memory_causal=False`` a token sees memory tokens read
with *later* queries of its segment, so there only pieces that end at segment boundaries
give the outputs of one call on the whole sequence.
"""

from __future__ import annotations

import autograd.numpy as anp
import numpy as np

from .._checks import first_nonfinite_token, report_divergence
from ..activations import silu
from ..attention import mac_mask, multi_head_attention
from ..errors import MEMORY_HINT
from ..layers import init_linear, l2_normalize, linear, rms_norm
from ..memory import memory_forward
from .blocks import (
    batched_scan,
    combine,
    init_attention,
    init_combine,
    init_memory_core,
    init_norm,
    init_persistent_tokens,
    initial_states,
    memory_core,
    proj,
    read_memories,
)
from .lmm import with_persistent
from .streaming import conv_dict, conv_state, memory_state, memory_stream, memory_weights


def check_read(h, first_token):
    """Eq. 21's read obeys the divergence rule: a memory whose finite weights read inf (or
    NaN) raises MemoryDivergenceError naming the token, not a NaN error later."""
    bad = first_nonfinite_token(h)
    if bad >= 0:
        report_divergence(first_token + bad, "raise", what="MAC's memory read (Eq. 21)",
                          hint=MEMORY_HINT)

def init_layer(rng, cfg) -> dict:
    """One MAC block.

    Returns:
        ``{"norm": {"g": (d,)}, "persistent": {"P": (N_p, d)}, "attn": init_attention,
        "memory": init_memory_core, "memory_tokens": {"g": (d,)}, "combine": init_combine,
        "W_O": {"W": (d, d)}}`` (see :mod:`minititans.models.blocks`).
    """
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
    states = initial_states(mem, B, cfg.anchored_memory, batched=batched_scan(cfg, x))
    conv_states = None
    outs = []
    for start in range(0, T, C):
        seg = slice(start, min(start + C, T))
        n = seg.stop - seg.start
        # Eq. 21: h_t = M*_{t-1}(q_t), each sequence's memory as it was before this segment
        with np.errstate(over="ignore", invalid="ignore"):  # said by check_read
            h_mem = read_memories(states, q_x[:, seg])  # (B, n, d)
        check_read(h_mem, start)
        # as memory tokens, RMS-normalised: their scale drifts as the memory fills or
        # forgets, and attention logits must not drift with it
        h_mem = rms_norm(p["memory_tokens"], h_mem)
        # Eq. 22: S̃ = [p] ‖ h_t ‖ S^(t); persistent and memory tokens are projected
        # without the convolution (they are not part of the token stream)
        prefix = anp.concatenate([P, h_mem], axis=1)  # (B, N_p + n, d)
        Q, K, V = (anp.concatenate([linear(attn["qkv"][name]["lin"], prefix), z[:, seg]], axis=1)
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
    return h + linear(p["W_O"], anp.concatenate(outs, axis=1))


def layer_state(p, cfg, batch_size, t) -> dict:
    """The state of :func:`layer_stream` after ``t`` tokens (``t mod C`` into a segment)."""
    B, d, pos = batch_size, cfg.d_model, t % cfg.segment_len
    seg = np.zeros((B, pos, d))
    return {"conv_q": conv_state(cfg, B, ("q",)), "conv_attn": conv_state(cfg, B),
            "M_segment": [np.zeros((B,) + np.shape(W)) for W in p["memory"]["M0"]],
            "memory_k": seg, "memory_v": seg.copy(), "segment_k": seg.copy(),
            "segment_v": seg.copy(),
            "memory": memory_state(p["memory"], cfg, B, pos % cfg.chunk_size)}


def layer_stream(p, h, cfg, state, t):
    """:func:`layer` on the next tokens ``h`` ``(B, T, d)`` after ``t`` tokens: ``(h, state)``."""
    x = rms_norm(p["norm"], h)
    B, T, _ = x.shape
    C, n_p = cfg.segment_len, cfg.num_persistent
    attn, mem = p["attn"], p["memory"]
    zq, cq = proj(mem["qkv"]["q"], x, state["conv_q"].get("q"))
    q_x = l2_normalize(silu(zq))  # (B, T, d), Eq. 21's queries
    QKV = [proj(attn["qkv"][n], x, state["conv_attn"].get(n)) for n in ("q", "k", "v")]
    P = with_persistent(p["persistent"], x[:, :0], cfg)  # (B, N_p, d)
    P_k, P_v = (linear(attn["qkv"][n]["lin"], P) for n in ("k", "v"))
    M_seg = memory_weights(mem["M0"], state["M_segment"], fresh=t == 0)
    cache = {n: state[n] for n in ("memory_k", "memory_v", "segment_k", "segment_v")}
    memory, fresh = state["memory"], t == 0
    outs, start, pos = [], 0, t % C
    while start < T:  # one part of a segment at a time
        n = min(C - pos, T - start)
        part = slice(start, start + n)
        # Eq. 21 with the memory of the segment's start, then its keys and values (Eq. 22)
        with np.errstate(over="ignore", invalid="ignore"):  # said by check_read
            h_read = anp.stack([memory_forward(M, q_x[b, part]) for b, M in enumerate(M_seg)])
        check_read(h_read, t + start)
        h_mem = rms_norm(p["memory_tokens"], h_read)
        for name, z in (("memory_k", linear(attn["qkv"]["k"]["lin"], h_mem)),
                        ("memory_v", linear(attn["qkv"]["v"]["lin"], h_mem)),
                        ("segment_k", QKV[1][0][:, part]), ("segment_v", QKV[2][0][:, part])):
            cache[name] = anp.concatenate([cache[name], z], axis=1)  # (B, pos + n, d)
        K = anp.concatenate([P_k, cache["memory_k"], cache["segment_k"]], axis=1)
        V = anp.concatenate([P_v, cache["memory_v"], cache["segment_v"]], axis=1)
        m_all = pos + n
        # the rows of mac_mask that belong to this part's segment tokens
        mask = mac_mask(n_p, m_all, m_all, memory_causal=cfg.memory_causal)[n_p + m_all + pos:]
        y = x[:, part] + linear(attn["W_O"], multi_head_attention(
            QKV[0][0][:, part], K, V, cfg.num_heads, mask=mask))  # Eq. 23
        # Eq. 24; at the segment's end its last chunk is closed, as memory_core does
        m, memory = memory_stream(mem, y, cfg, memory, fresh=fresh, flush=m_all == C)
        outs.append(combine(p["combine"], y, m))  # Eq. 25
        fresh = False
        if m_all == C:  # a new segment: retrieve from the memory it starts with
            M_seg = memory_weights(mem["M0"], memory["M"], fresh=False)
            cache = {name: z[:, :0] for name, z in cache.items()}
        start, pos = start + n, m_all % C
    new_state = {"conv_q": conv_dict({"q": cq}),
                 "conv_attn": conv_dict(dict(zip("qkv", (c for _, c in QKV)))),
                 "M_segment": [anp.stack([M[j] for M in M_seg]) for j in range(len(M_seg[0]))],
                 **cache, "memory": memory}
    return h + linear(p["W_O"], anp.concatenate(outs, axis=1)), new_state
