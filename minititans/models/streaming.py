r"""What a layer carries from one :func:`~minititans.models.stream` call to the next.

A stream is cut into pieces; each layer keeps, per sequence of the batch, exactly what the
next piece needs to continue as if the sequence had been read in one call:

* a causal convolution (Section 4.4): its last $K - 1$ inputs;
* attention (Eq. 2): the keys and values of the persistent prefix and of the last $w - 1$
  tokens of the window (all tokens without a window: the KV cache of the transformer);
* the neural memory (Eqs. 13–18): the weights and momentum $(\mathcal{M}_{t'}, S_{t'})$ at
  the start of the current chunk, and the keys, values, queries and gates of the tokens of
  that chunk already read. A piece that ends inside a chunk is therefore still exact: the
  next call replays the partial chunk from $\mathcal{M}_{t'}$, so every gradient of the chunk
  is taken at $\mathcal{M}_{t'}$ as Eqs. 16–18 say (at most ``chunk_size - 1`` tokens are
  recomputed, their outputs discarded).

Every state is a dict of arrays with the batch on the first axis; ``*_state(..., n)``
returns the zeros of the shapes a state has after ``n`` tokens, which is what
:func:`minititans.models.initial_state` returns (``n = 0``) and what a state is checked
against. While the model has read nothing (``fresh``), a memory's weights are taken from
the parameters (the learned $\mathcal{M}_0$), not from the zeros of the state.
"""

from __future__ import annotations

import autograd.numpy as anp
import numpy as np

from ..layers import linear
from ..memory import MemoryState, memory_scan
from .blocks import alpha_columns, attend, gates, proj, qkv, theta_columns

# --- the convolutions ----------------------------------------------------------------------


def conv_state(cfg, batch_size, names=("q", "k", "v")) -> dict:
    """The last ``K - 1`` inputs of each projection's convolution, ``(B, K - 1, d)``."""
    if not cfg.conv_kernel:
        return {}
    return {n: np.zeros((batch_size, cfg.conv_kernel - 1, cfg.d_model)) for n in names}


def conv_dict(states) -> dict:
    """The states returned by :func:`~minititans.models.blocks.qkv` (None without a conv)."""
    return {n: s for n, s in states.items() if s is not None}


# --- attention with a KV cache -------------------------------------------------------------


def attention_state(cfg, batch_size, n, *, window, prefix) -> dict:
    """The KV cache after ``n`` tokens of the stream past the ``prefix`` rows."""
    L = 0 if n == 0 else prefix + (n if window is None else min(n, window - 1))
    zeros = np.zeros((batch_size, L, cfg.d_model))
    return {"conv": conv_state(cfg, batch_size), "k": zeros, "v": zeros.copy()}


def attention_stream(p, x, cfg, state, *, window, prefix):
    r""":func:`~minititans.models.blocks.attention` on the next rows ``x`` ``(B, T, d)``.

    The new queries attend to the cached keys and values and to their own (Eq. 2 with a KV
    cache, :func:`minititans.attention.causal_attention`); on the first call ``x`` starts
    with the ``prefix`` rows (the persistent tokens), which stay visible to every later token.

    Returns:
        ``(y (B, T, d), state)``.
    """
    conv = state["conv"]
    (q, cq), (k, ck), (v, cv) = (proj(p["qkv"][n], x, conv.get(n)) for n in ("q", "k", "v"))
    K = anp.concatenate([state["k"], k], axis=1)  # (B, L + T, d): cache, then the new rows
    V = anp.concatenate([state["v"], v], axis=1)
    y = linear(p["W_O"], attend(q, K, V, cfg, window=window, prefix=prefix))
    if window is not None:  # keep the prefix and the last w - 1 rows
        start = max(prefix, K.shape[1] - (window - 1))
        K = anp.concatenate([K[:, :prefix], K[:, start:]], axis=1)
        V = anp.concatenate([V[:, :prefix], V[:, start:]], axis=1)
    return y, {"conv": conv_dict({"q": cq, "k": ck, "v": cv}), "k": K, "v": V}


# --- the neural memory ---------------------------------------------------------------------


def memory_state(p, cfg, batch_size, n_buffered) -> dict:
    """$(\\mathcal{M}_{t'}, S_{t'})$ per sequence and the ``n_buffered`` tokens of the chunk."""
    B, d = batch_size, cfg.d_model
    weights = [np.zeros((B,) + np.shape(W)) for W in p["M0"]]
    return {"conv": conv_state(cfg, B), "M": weights, "S": [w.copy() for w in weights],
            "k": np.zeros((B, n_buffered, d)), "v": np.zeros((B, n_buffered, d)),
            "q": np.zeros((B, n_buffered, d)),
            "gates": np.zeros((B, n_buffered, alpha_columns(cfg) + 1 + theta_columns(cfg)))}


def memory_stream(p, x, cfg, state, *, fresh, flush=False, read="after"):
    r""":func:`~minititans.models.blocks.memory_core` continued from ``state``.

    ``x`` ``(B, T, d)`` are the next tokens written into the memory. The buffered tokens of
    the current chunk are replayed before them from the chunk-start state, so the chunks are
    those of one call on the whole stream. ``flush=True`` (the end of a MAC segment, where
    ``memory_core`` is called anew) closes the last chunk: the state then holds the final
    weights and no buffered tokens.

    Returns:
        ``(y (B, T, d), state)``.
    """
    q, k, v, conv = qkv(p["qkv"], x, state["conv"])
    alpha, eta, theta = gates(p, x, cfg)
    n_buf = state["k"].shape[1]
    Q, K, V = (anp.concatenate([state[n], z], axis=1) for n, z in (("q", q), ("k", k),
                                                                 ("v", v)))
    # alpha's column(s) (one, or one per output channel), eta, then theta's (one, or one per
    # memory layer)
    BT = np.shape(eta)
    G = anp.concatenate([state["gates"], anp.concatenate(
        [anp.reshape(alpha, BT + (-1,)), eta[..., None], anp.reshape(theta, BT + (-1,))],
        axis=-1)], axis=1)
    n_a, per_layer = alpha_columns(cfg), theta_columns(cfg) > 1
    total, b = n_buf + x.shape[1], cfg.chunk_size
    cut = total if flush else total - total % b  # tokens in whole chunks
    spec = p["M0"]
    ys, Ms, Ss = [], [], []
    for i in range(x.shape[0]):
        if fresh:
            st = MemoryState.initial(spec, anchored=cfg.anchored_memory)
        else:
            st = MemoryState(spec.like(W[i] for W in state["M"]),
                             spec.like(S[i] for S in state["S"]),
                             spec if cfg.anchored_memory else None)
        parts = []
        for lo, hi in ((0, cut), (cut, total)):
            if hi == lo:
                continue
            y, new = memory_scan(st, K[i, lo:hi], V[i, lo:hi], Q[i, lo:hi],
                                 alpha=G[i, lo:hi, :n_a] if n_a > 1 else G[i, lo:hi, 0],
                                 eta=G[i, lo:hi, n_a],
                                 theta=G[i, lo:hi, n_a + 1:] if per_layer else G[i, lo:hi, n_a + 1],
                                 chunk_size=b, read=read,
                                 backend=cfg.backend, max_grad_norm=cfg.max_grad_norm or None)
            parts.append(y)
            if hi == cut:
                st = new  # the weights at the start of the next chunk
        ys.append(anp.concatenate(parts)[n_buf:])
        Ms.append(st.params)
        Ss.append(st.momentum)
    depth = len(spec)
    new_state = {"conv": conv_dict(conv),
                 "M": [anp.stack([M[j] for M in Ms]) for j in range(depth)],
                 "S": [anp.stack([S[j] for S in Ss]) for j in range(depth)],
                 "k": K[:, cut:], "v": V[:, cut:], "q": Q[:, cut:], "gates": G[:, cut:]}
    return anp.stack(ys), new_state


def memory_weights(spec, weights, fresh) -> list:
    """Each sequence's memory from stacked ``weights`` ``[(B, ...), ...]`` (``spec`` if ``fresh``).

    ``spec`` is the learned $\\mathcal{M}_0$, whose structure (activation, residual form) the
    weights take.
    """
    B = np.shape(weights[0])[0]
    if fresh:
        return [spec] * B
    return [spec.like(W[i] for W in weights) for i in range(B)]
