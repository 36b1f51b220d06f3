r"""The parts every model is built from (Titans Section 4.4).

* :func:`qkv` — Section 4.4's projections: $x W$, a depthwise causal convolution, SiLU, and
  $\ell_2$-normalised $q$ and $k$.
* :func:`memory_core` — the neural memory run over a sequence (Eqs. 11–15 with Eqs. 13–14 as
  the update), with data-dependent gates $\alpha_t, \eta_t, \theta_t$ and a learned
  $\mathcal{M}_0$.
* :func:`attention` — projections and multi-head softmax attention (Eq. 2), window or mask.
* :func:`combine` — the gate $\otimes$ of Eqs. 25 and 28.
* embedding, pre-norm residual blocks, the feed-forward layer and the language-model head.

Every function is pure and works on a batch ``(B, T, d)``; only the memory scan, which is
one recurrence per sequence, loops over the batch.
"""

from __future__ import annotations

import autograd.numpy as anp
import numpy as np
from autograd.tracer import Box

from .._checks import first_nonfinite_token, report_divergence
from ..activations import gelu, sigmoid, silu
from ..attention import merge_heads, multi_head_attention, split_heads
from ..errors import MEMORY_HINT
from ..layers import (
    depthwise_conv,
    init_depthwise_conv,
    init_layer_norm,
    init_linear,
    init_output_gate,
    init_persistent,
    init_rms_norm,
    l2_normalize,
    layer_norm,
    linear,
    output_gate,
    rms_norm,
)
from ..memory import MemoryState, compute_gates, init_gates, init_memory, memory_scan
from ..memory.models import forward_batched, memory_forward
from ..memory.scan import numba_memory_scan_batched

# --- projections with Section 4.4's convolution -------------------------------------------


def init_proj(rng, cfg, d_in=None):
    """A projection ``d_in -> d_model`` followed (if ``conv_kernel``) by a depthwise conv."""
    d_in = cfg.d_model if d_in is None else d_in
    p = {"lin": init_linear(rng, d_in, cfg.d_model)}
    if cfg.conv_kernel:
        p["conv"] = init_depthwise_conv(rng, cfg.d_model, cfg.conv_kernel)
    return p


def proj(p, x, conv_state=None):
    """$x W$ then the causal conv: ``x`` ``(B, T, d_in)`` -> ``((B, T, d), conv_state)``.

    ``conv_state`` ``(B, K - 1, d)`` holds the previous inputs of the convolution
    (:func:`minititans.layers.depthwise_conv`); None means zeros.
    """
    z = linear(p["lin"], x)
    if "conv" not in p:
        return z, None
    return depthwise_conv(p["conv"], z, conv_state)


def init_qkv(rng, cfg):
    """The three projections of Section 4.4 (each as :func:`init_proj`).

    Returns:
        ``{"q": proj, "k": proj, "v": proj}``, each ``{"lin": {"W": (d, d)}, "conv":
        {"w": (K, d), "b": (d,)}}`` (no ``"conv"`` when ``conv_kernel`` is 0).
    """
    return {name: init_proj(rng, cfg) for name in ("q", "k", "v")}


def qkv(p, x, states=None):
    r"""Section 4.4: $q = \ell_2(\mathrm{SiLU}(\mathrm{conv}(xW_Q)))$, same for $k$;
    $v = \mathrm{SiLU}(\mathrm{conv}(xW_V))$.

    ``states`` carries the three convolutions' states between calls (MAC's segments).

    Returns:
        ``(q, k, v, states)``, each ``(B, T, d)``.
    """
    states = states or {}
    out, new = {}, {}
    for name in ("q", "k", "v"):
        z, new[name] = proj(p[name], x, states.get(name))
        out[name] = silu(z)
    return l2_normalize(out["q"]), l2_normalize(out["k"]), out["v"], new


# --- the neural memory ----------------------------------------------------------------------


def init_memory_core(rng, cfg):
    """W_Q, W_K, W_V (+ convs), the gate projections and the learned initial memory M_0.

    Returns:
        ``{"qkv": init_qkv(...), "gates": init_gates(...) (each ``w_*`` ``(d,)``, each
        ``b_*`` a scalar), "M0": MemoryParams}``: ``M0`` holds ``memory_depth`` matrices,
        ``(d, d)`` at depth 1, else ``(d, h), ..., (h, d)`` with ``h = memory_expansion * d``.
    """
    d = cfg.d_model
    return {
        "qkv": init_qkv(rng, cfg),
        "gates": init_gates(rng, d, alpha_init=cfg.alpha_init, theta_init=cfg.theta_init,
                            theta_max=cfg.theta_max, theta_columns=theta_columns(cfg),
                            alpha_columns=alpha_columns(cfg)),
        # M_0 is an outer-loop parameter; its last matrix starts at zero so M_0(k) = 0
        "M0": init_memory(rng, d, d, depth=cfg.memory_depth, expansion=cfg.memory_expansion,
                          activation=cfg.memory_activation, init="zero_out"),
    }


def theta_columns(cfg) -> int:
    """1 (a step per token), or ``memory_depth`` with ``theta_per_layer`` (Appendix B.3)."""
    return cfg.memory_depth if cfg.theta_per_layer else 1


def alpha_columns(cfg) -> int:
    """1 (a rate per token), or with ``alpha_per_channel`` the memory's output channels: its
    layers' output widths summed, ``(L_M - 1) h + d``
    (:func:`minititans.memory.scan.output_channels`)."""
    if not cfg.alpha_per_channel:
        return 1
    return (cfg.memory_depth - 1) * cfg.memory_expansion * cfg.d_model + cfg.d_model


def gates(p, x, cfg):
    r"""$(\alpha_t, \eta_t, \theta_t)$, each ``(B, T)``, from the tokens ``x`` ``(B, T, d)``;
    with ``cfg.theta_per_layer`` $\theta$ is ``(B, T, L)``, one step per memory layer, and with
    ``cfg.alpha_per_channel`` $\alpha$ is ``(B, T, C)``, one rate per output channel.

    The ablations replace $\eta$ by 0 ("w/o momentum") or $\alpha$ by 0 ("w/o weight decay").
    """
    B, T, d = np.shape(x)
    cols = [() if n == 1 else (n,) for n in (alpha_columns(cfg), 1, theta_columns(cfg))]
    alpha, eta, theta = (anp.reshape(g, (B, T) + shape) for g, shape in
                         zip(compute_gates(p["gates"], anp.reshape(x, (B * T, d)),
                                           theta_max=cfg.theta_max), cols))
    zero = np.zeros((B, T))
    return ((alpha if cfg.forgetting else np.zeros(anp.shape(alpha))),
            (eta if cfg.momentum else zero), theta)


def initial_states(p, batch_size, anchored=False, batched=False):
    r"""One fresh memory per sequence: $(\mathcal{M}_0, S_0 = 0)$, forgetting towards
    $\mathcal{M}_0$ when ``anchored`` (``ModelConfig.anchored_memory``).

    A list of MemoryState, or with ``batched`` one MemoryState whose weights (and momentum
    and anchor) have a leading batch axis, ``W_i`` ``(B, fan_in, fan_out)``.
    """
    if not batched:
        return [MemoryState.initial(p["M0"], anchored=anchored) for _ in range(batch_size)]
    M0 = p["M0"]
    W = M0.like(anp.stack([w] * batch_size) for w in M0)
    return MemoryState(W, M0.like(np.zeros((batch_size,) + np.shape(w)) for w in M0),
                       W if anchored else None)


def batched_scan(cfg, x) -> bool:
    """Whether :func:`memory_core` scans the batch in one call (the numba backend): its
    states are then one batched MemoryState instead of a list."""
    return cfg.backend == "numba" and np.shape(x)[1] > 0


def read_memories(states, q):
    r"""$\mathcal{M}(q)$ of each sequence's memory: ``q`` ``(B, n, d)`` → ``(B, n, d)``.

    ``states``: a list of MemoryState (one per sequence) or one batched MemoryState (as
    :func:`memory_core` keeps them on the numba backend); the same numbers either way.
    """
    if isinstance(states, MemoryState):
        return forward_batched(states.params, q)
    return anp.stack([memory_forward(s.params, q[b]) for b, s in enumerate(states)])


def memory_core(p, x, cfg, states=None, conv_states=None, read="after"):
    r"""Write ``x`` ``(B, T, d)`` into the memory and read it back: Titans Eqs. 11–15.

    $k_t, v_t, q_t$ come from :func:`qkv`; the update is Eqs. 13–14 with the gates of
    :func:`gates`, chunked as in Eqs. 16–18 with ``cfg.chunk_size``; the read is
    $\mathcal{M}_t(q_t)$ (``read="after"``). Each sequence of the batch has its own memory.

    On the numba backend the whole batch is one differentiable scan
    (:func:`~minititans.memory.scan.numba_memory_scan_batched`), the states one batched
    MemoryState; otherwise one ``memory_scan`` per sequence, the states a list. Both give
    the same numbers (a test checks outputs and gradients).

    Returns:
        ``(y (B, T, d), states, conv_states)`` so a caller can continue the stream (MAC).
    """
    q, k, v, conv_states = qkv(p["qkv"], x, conv_states)
    B = np.shape(x)[0]
    alpha, eta, theta = gates(p, x, cfg)
    if batched_scan(cfg, x) and not isinstance(states, list):
        if states is None:
            states = initial_states(p, B, cfg.anchored_memory, batched=True)
        y, state = numba_memory_scan_batched(
            states, k, v, q, alpha, eta, theta, chunk_size=cfg.chunk_size, read=read,
            max_grad_norm=cfg.max_grad_norm or None)
        return y, state, conv_states
    if states is None:
        states = initial_states(p, B, cfg.anchored_memory)
    ys, new_states = [], []
    for b, state in enumerate(states):
        y, state = memory_scan(state, k[b], v[b], q[b], alpha=alpha[b], eta=eta[b],
                               theta=theta[b], chunk_size=cfg.chunk_size, read=read,
                               backend=cfg.backend,
                               max_grad_norm=cfg.max_grad_norm or None,
                               partial_chunk="ok")  # MAC restarts the chunks every segment
        ys.append(y)
        new_states.append(state)
    return anp.stack(ys), new_states, conv_states


# --- attention under a mask -----------------------------------------------------------------


def init_attention(rng, cfg):
    """W_Q, W_K, W_V (each with the conv of Section 4.4) and the output projection W_O.

    Returns:
        ``{"qkv": {"q", "k", "v"} (each as :func:`init_qkv`), "W_O": {"W": (d, d)}}``.
    """
    return {"qkv": {n: init_proj(rng, cfg) for n in ("q", "k", "v")},
            "W_O": init_linear(rng, cfg.d_model, cfg.d_model)}


# the numba attention costs ~20 ms a call on a busy 2-core machine whatever the length;
# the NumPy banded form is faster below about this many keys
NUMBA_ATTENTION_MIN_KEYS = 2048


def attend(q, k, v, cfg, *, window=None, prefix=0, mask=None):
    """:func:`minititans.attention.multi_head_attention` in ``cfg.num_heads`` heads.

    With ``cfg.backend == "numba"``, a window, plain arrays (nothing to differentiate) and
    at least ``NUMBA_ATTENTION_MIN_KEYS`` keys, its numba twin
    :func:`minititans.kernels.attention.causal_attention` computes the same numbers;
    ``k``, ``v`` may hold more (cached) rows than ``q``.
    """
    if (cfg.backend == "numba" and window is not None and mask is None
            and np.shape(k)[1] >= NUMBA_ATTENTION_MIN_KEYS
            and not any(isinstance(z, Box) for z in (q, k, v))):
        from ..kernels.attention import causal_attention as numba_causal_attention

        n_cached = np.shape(k)[1] - np.shape(q)[1]
        # the kernel wants one query per key: the cached rows get zero queries, dropped after
        q = np.concatenate([np.zeros(np.shape(q)[:1] + (n_cached,) + np.shape(q)[2:]), q],
                            axis=1)
        heads = [split_heads(z, cfg.num_heads) for z in (q, k, v)]  # (B, H, T_k, d_h)
        y = numba_causal_attention(*heads, window=window, prefix=prefix)
        return merge_heads(y[..., n_cached:, :])
    return multi_head_attention(q, k, v, cfg.num_heads, window=window, prefix=prefix,
                                mask=mask)


def attention(p, x, cfg, *, window=None, prefix=0, mask=None):
    """Project ``x`` ``(B, T, d)``, attend (Eq. 2, ``cfg.num_heads`` heads), project: ``(B, T, d)``.

    ``window``, ``prefix`` and ``mask`` are those of
    :func:`minititans.attention.multi_head_attention`.
    """
    q, k, v = (proj(p["qkv"][n], x)[0] for n in ("q", "k", "v"))
    return linear(p["W_O"], attend(q, k, v, cfg, window=window, prefix=prefix, mask=mask))


# --- the gate ⊗ of Eqs. 25 and 28 -----------------------------------------------------------


def init_combine(rng, d):
    """The two LayerNorms of the gate of Eqs. 25 and 28.

    Returns:
        ``{"ln_y": {"g": (d,), "b": (d,)}, "ln_m": {"g": (d,), "b": (d,)}}``.
    """
    ln_y = init_layer_norm(rng, d)
    # bias 1: at the start o = (1 + LN(y)) ⊙ σ(LN(m)), so the memory branch is not muted
    # wherever LN(y) happens to be near zero
    ln_y["b"] = np.ones(d)
    return {"ln_y": ln_y, "ln_m": init_layer_norm(rng, d)}


def combine(p, y, m):
    r"""$y \otimes m = \mathrm{LN}_y(y) \odot \sigma(\mathrm{LN}_m(m))$ (Eqs. 25, 28).

    "Normalise both branches with learnable vector-valued weights, then a non-linearity":
    each branch gets a LayerNorm with its own gain and bias vectors, and the memory branch
    passes through a sigmoid and gates the attention branch channel by channel. A zero gain
    and unit bias on ``ln_y`` let the memory alone through, so neither branch is forced.
    """
    # a memory whose finite weights read ~1e160 overflows in its LayerNorm: that is the
    # memory diverging, and it is said so, naming the token, not as a NaN a layer later
    with np.errstate(over="ignore", invalid="ignore"):
        gate = sigmoid(layer_norm(p["ln_m"], m))
    bad = first_nonfinite_token(gate)
    if bad >= 0:
        report_divergence(bad, "raise", what="the memory branch (Eqs. 25, 28)",
                          hint=MEMORY_HINT)
    return layer_norm(p["ln_y"], y) * gate


# --- embedding, blocks and head ---------------------------------------------------------------


def init_embedding(rng, cfg):
    """Token embeddings ``{"E": (vocab_size, d_model)}``, rows ~ N(0, I)."""
    return {"E": rng.standard_normal((cfg.vocab_size, cfg.d_model))}


def init_ffn(rng, cfg):
    """The feed-forward layer after each block.

    Returns:
        ``{"norm": {"g": (d,)}, "W1": {"W": (d, h)}, "W2": {"W": (h, d)}}``,
        ``h = ffn_expansion * d``.
    """
    h = cfg.ffn_expansion * cfg.d_model
    return {"norm": init_rms_norm(rng, cfg.d_model), "W1": init_linear(rng, cfg.d_model, h),
            "W2": init_linear(rng, h, cfg.d_model)}


def ffn(p, x):
    """Pre-norm feed-forward with a residual: $x + \\mathrm{GELU}(\\mathrm{RMS}(x) W_1) W_2$."""
    return x + linear(p["W2"], gelu(linear(p["W1"], rms_norm(p["norm"], x))))


def init_head(rng, cfg):
    """The final norm and output projection ``{"norm": {"g": (d,)}, "W": {"W": (d, V)}}``."""
    return {"norm": init_rms_norm(rng, cfg.d_model),
            "W": init_linear(rng, cfg.d_model, cfg.vocab_size)}


def head(p, h):
    """Logits ``(B, T, vocab)`` from the last hidden states ``(B, T, d)``."""
    return linear(p["W"], rms_norm(p["norm"], h))


def init_persistent_tokens(rng, cfg):
    """The persistent memory of Eq. 19: ``{"P": (num_persistent, d)}``."""
    return init_persistent(rng, cfg.num_persistent, cfg.d_model)


def init_gated_output(rng, cfg):
    """Section 4.4's output normalisation + linear gate, then W_O.

    Returns:
        ``{"gate": {"norm": {"g": (d,)}, "W_g": (d, d)}, "W_O": {"W": (d, d)}}``.
    """
    return {"gate": init_output_gate(rng, cfg.d_model),
            "W_O": init_linear(rng, cfg.d_model, cfg.d_model)}


def gated_output(p, y, x):
    r"""$(\mathrm{RMS}(y) \odot \sigma(x W_g))\, W_O$ (Section 4.4)."""
    return linear(p["W_O"], output_gate(p["gate"], y, x))


def init_norm(rng, cfg):
    """A pre-norm RMSNorm gain ``{"g": (d_model,)}``."""
    return init_rms_norm(rng, cfg.d_model)


def embed(p, tokens):
    """Rows of the embedding matrix: ``(B, T)`` integer tokens -> ``(B, T, d)``."""
    tokens = np.asarray(tokens)
    if tokens.dtype.kind not in "iu":
        raise TypeError(f"tokens must be integers, got dtype {tokens.dtype}")
    return p["E"][tokens]
