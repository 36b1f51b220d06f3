r"""Causal softmax attention, its sliding window and the persistent prefix (Titans Eqs. 1–2).

Attention is the short-term memory of every Titans variant. With $Q = xW_Q$, $K = xW_K$,
$V = xW_V$ (Eq. 1, see :func:`minititans.layers.linear`) token $i$ reads

$$y_i = \frac{\sum_{j \le i} \exp(Q_i K_j^\top / \sqrt{d})\, V_j}
             {\sum_{l \le i} \exp(Q_i K_l^\top / \sqrt{d})} \qquad \text{(Eq. 2)}$$

which is ``softmax(scores masked by attention_mask(T)) @ V``. The two restrictions used by
the architectures of Section 4 are mask options: ``window=w`` (sliding-window attention,
MAG Eq. 27 and MAL Eq. 31: token $i$ sees $i - w < j \le i$) and ``prefix=p`` (the $N_p$
persistent tokens of Eq. 19, visible to every token whatever the window). :func:`mac_mask`
and :func:`sliding_window_mask` are the masks of the paper's Figure 3; :func:`plot_mask` draws them.
"""

from __future__ import annotations

import math

import autograd.numpy as anp
import numpy as np

from ._checks import check_array, check_int


def attention_mask(T: int, window=None, prefix: int = 0, *, num_queries=None):
    r"""Which keys each query may see: ``mask[i, j]`` is True when token $i$ attends to $j$.

    $$\mathrm{mask}_{ij} = \big(j \le i \;\wedge\; (w = \text{None} \vee j > i - w)\big)
      \;\vee\; j < p$$

    The prefix block is visible to *every* row, prefix rows included: the persistent tokens
    (Eq. 19) do not depend on the input, so letting persistent token 0 see persistent token 1
    leaks nothing, and it makes the prefix a fully visible block as in Figure 3.

    Args:
        T: sequence length (prefix included).
        window: ``None`` (full causal) or an int $w \ge 1$, the number of most recent tokens
            (itself included) a token sees.
        prefix: $p$, with $0 \le p \le T$.
        num_queries: ``None`` (every token is a query), or $n \le T$: only the rows of the
            last $n$ tokens (the new tokens of a stream whose earlier keys are cached).

    Returns:
        Boolean array ``(T, T)``, or ``(num_queries, T)``.
    """
    T = check_int("T", T, minimum=0)
    prefix = check_int("prefix", prefix, minimum=0)
    if prefix > T:
        raise ValueError(f"prefix must be <= the sequence length {T}, got {prefix}")
    if window is not None:
        window = check_int("window", window, minimum=1)
    n = T if num_queries is None else check_int("num_queries", num_queries, minimum=0)
    if n > T:
        raise ValueError(f"num_queries must be <= the sequence length {T}, got {n}")
    return _visible(np.arange(T - n, T), np.arange(T), window, prefix)


def _visible(rows, cols, window, prefix):
    """:func:`attention_mask` for query positions ``rows`` and key positions ``cols``."""
    i, j = rows[:, None], cols[None, :]
    mask = j <= i  # (len(rows), len(cols))
    if window is not None:
        mask &= j > i - window
    return mask | (j < prefix)


def mac_mask(num_persistent: int, num_memory: int, segment_len: int, *,
             memory_causal: bool = False):
    r"""The attention mask of MAC over $[p_1 \dots p_{N_p}] \,\|\, h \,\|\, S$ (Eqs. 22–23).

    Persistent and memory tokens are fully visible (to every row); inside the segment the
    mask is causal. This is :func:`attention_mask` with ``prefix = N_p + N_m``.

    Caveat: $h_t = \mathcal{M}^*_{t-1}(q_t)$ (Eq. 21) is read with the queries of the segment
    itself, so with a fully visible memory block segment token $s$ sees memory tokens read
    from later tokens $s' > s$. ``memory_causal=True`` (needs ``num_memory == segment_len``)
    restricts memory token $m$ to rows at or after segment token $m$ (and memory rows to
    memory tokens $\le m$), which keeps next-token prediction strictly causal.

    Returns:
        Boolean array ``(L, L)`` with ``L = num_persistent + num_memory + segment_len``.
    """
    n_p = check_int("num_persistent", num_persistent, minimum=0)
    n_m = check_int("num_memory", num_memory, minimum=0)
    C = check_int("segment_len", segment_len, minimum=1)
    mask = attention_mask(n_p + n_m + C, prefix=n_p + n_m)
    if not memory_causal:
        return mask
    if n_m != C:
        raise ValueError(
            f"memory_causal=True needs num_memory == segment_len, got {n_m} and {C}"
        )
    m = np.arange(n_m)
    visible = m[None, :] <= m[:, None]  # (C, C): memory/segment token s sees memory m <= s
    mask[n_p:n_p + n_m, n_p:n_p + n_m] = visible
    mask[n_p + n_m:, n_p:n_p + n_m] = visible
    return mask


def sliding_window_mask(num_persistent: int, T: int, window: int):
    r"""The sliding-window mask with the persistent prefix: MAG's Eq. 27 and MAL's Eq. 31.

    SW-Attn$^*$ over $[p_1 \dots p_{N_p}] \,\|\, x$: every token sees the $N_p$ persistent
    tokens and the ``window`` most recent tokens of the extended sequence (itself
    included). This is :func:`attention_mask` with ``prefix = N_p`` on the extended sequence.

    Returns:
        Boolean array ``(N_p + T, N_p + T)``.
    """
    n_p = check_int("num_persistent", num_persistent, minimum=0)
    T = check_int("T", T, minimum=0)
    return attention_mask(n_p + T, window=window, prefix=n_p)




def plot_mask(mask, ax=None, title=None):
    """Draw a boolean attention mask (rows: queries, columns: keys); returns the Axes."""
    import matplotlib.pyplot as plt  # lazily: plotting is optional for the maths

    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.dtype != bool:
        raise ValueError(f"mask must be a 2-D boolean array, got {mask.dtype} {mask.shape}")
    if ax is None:
        _, ax = plt.subplots(figsize=(3, 3))
    ax.imshow(mask, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xlabel("key j")
    ax.set_ylabel("query i")
    if title is not None:
        ax.set_title(title)
    return ax


def causal_attention(q, k, v, window=None, prefix: int = 0, *, mask=None):
    r"""Titans Eq. 2: causal softmax attention, optionally windowed, with a visible prefix.

    $$y_i = \sum_{j \in \mathcal{V}(i)}
            \mathrm{softmax}_j\!\Big(\frac{q_i k_j^\top}{\sqrt d}\Big) v_j$$

    where $\mathcal{V}(i)$ is row $i$ of :func:`attention_mask` ``(T, window, prefix)``, or
    of ``mask`` when one is given (MAC's :func:`mac_mask`), and $d$ is ``q.shape[-1]``. The
    softmax subtracts each row's maximum, so logits of $10^4$ stay finite. Every row must
    see at least one key (the default masks let every row see itself).

    **A KV cache.** ``k`` and ``v`` may have more rows than ``q``: then the $T_q$ queries are
    the *last* $T_q$ of the $T_k$ tokens (the earlier keys and values were kept from previous
    calls), and the mask is ``attention_mask(T_k, window, prefix, num_queries=T_q)``.

    **No** $T \times T$ **matrix for a window.** With ``window=w`` and a long sequence the
    queries go in blocks of 64; a block sees the prefix and one run of $w + 63$ keys, so the
    cost is $O(T (w + p) d)$ and 16,384 tokens need megabytes, not gigabytes. Without a
    window, past $2^{22}$ scores the queries go in blocks too (each sees all earlier keys:
    the cost stays $O(T^2 d)$, the memory $O(64\, T)$). The result is that of the dense
    formula (the masked-out terms are exact zeros either way).

    Args:
        q: ``(..., T_q, d)``; leading axes (batch, heads) are carried along.
        k: ``(..., T_k, d)`` with ``T_k >= T_q``; v: ``(..., T_k, d_v)``.
        window, prefix: see :func:`attention_mask`.
        mask: ``None``, or a boolean ``(T_q, T_k)`` array used instead of ``window`` and
            ``prefix`` (which must then be left at their defaults).

    Returns:
        ``(..., T_q, d_v)``, in the dtype of the inputs.
    """
    q_, k_, v_ = _check_cached_qkv(q, k, v)
    T_q, d = q_.shape[-2:]
    T_k = k_.shape[-2]
    if mask is not None:
        mask = _check_mask(mask, (T_q, T_k), window, prefix)
        if T_q == 0:
            return anp.zeros(q_.shape[:-1] + v_.shape[-1:], dtype=anp.result_type(q_, k_, v_))
        return _attend(q, k, v, mask)
    if T_q == 0:  # an empty sequence attends to nothing (and a max over no keys is undefined)
        attention_mask(T_k, window=window, prefix=prefix)  # still check the arguments
        return anp.zeros(q_.shape[:-1] + v_.shape[-1:], dtype=anp.result_type(q_, k_, v_))
    if (T_q * T_k <= _DENSE_MAX if window is None
            else T_k <= 2 * (_BLOCK + check_int("window", window, minimum=1) + prefix)):
        mask = attention_mask(T_k, window=window, prefix=prefix, num_queries=T_q)  # (T_q, T_k)
        return _attend(q, k, v, mask)
    prefix = check_int("prefix", prefix, minimum=0)
    if prefix > T_k:
        raise ValueError(f"prefix must be <= the sequence length {T_k}, got {prefix}")
    # blocks of queries, each against the prefix and its run of keys (all earlier ones
    # without a window)
    outs = []
    for i0 in range(0, T_q, _BLOCK):
        i1 = min(i0 + _BLOCK, T_q)
        a0, a1 = T_k - T_q + i0, T_k - T_q + i1  # the block's positions among the keys
        lo = prefix if window is None else max(prefix, a0 - window + 1)
        cols = np.concatenate([np.arange(prefix), np.arange(lo, a1)])
        kb = anp.concatenate([k[..., :prefix, :], k[..., lo:a1, :]], axis=-2)
        vb = anp.concatenate([v[..., :prefix, :], v[..., lo:a1, :]], axis=-2)
        outs.append(_attend(q[..., i0:i1, :], kb, vb,
                            _visible(np.arange(a0, a1), cols, window, prefix)))
    return anp.concatenate(outs, axis=-2)  # (..., T_q, d_v)


_BLOCK = 64  # queries per block of the banded (windowed) form
_DENSE_MAX = 2**22  # without a window, one (T_q, T_k) score matrix up to 4M entries (32 MB)


def _attend(q, k, v, mask):
    """Eq. 2 under a boolean ``mask`` ``(T_q, T_k)``: softmax of the scaled, masked scores."""
    scores = anp.matmul(q, anp.swapaxes(k, -1, -2)) / math.sqrt(q.shape[-1])  # (..., T_q, T_k)
    scores = anp.where(mask, scores, -anp.inf)
    # softmax is shift-invariant; subtracting the row max keeps exp() <= 1
    e = anp.exp(scores - anp.max(scores, axis=-1, keepdims=True))
    weights = e / anp.sum(e, axis=-1, keepdims=True)
    return anp.matmul(weights, v)  # (..., T_q, d_v)


def _check_cached_qkv(q, k, v):
    """``check_qkv``, except that ``k`` and ``v`` may hold more (earlier, cached) rows."""
    q_ = check_array("q", q)
    k_ = check_array("k", k)
    v_ = check_array("v", v)
    if q_.ndim < 2:
        raise ValueError(f"q must have shape (..., T, d), got shape {q_.shape}")
    if (k_.ndim != q_.ndim or k_.shape[:-2] != q_.shape[:-2] or k_.shape[-1] != q_.shape[-1]
            or k_.shape[-2] < q_.shape[-2]):
        raise ValueError(f"k must have the shape of q {q_.shape} (or, as a KV cache, more "
                         f"rows), got {k_.shape}")
    if v_.ndim != k_.ndim or v_.shape[:-1] != k_.shape[:-1]:
        raise ValueError(f"v must have shape {k_.shape[:-1] + ('d_v',)}, got {v_.shape}")
    return q_, k_, v_


def _check_mask(mask, shape, window, prefix):
    if window is not None or prefix != 0:
        raise ValueError("pass either mask or window/prefix, not both")
    m = np.asarray(mask)
    if m.dtype != bool or m.shape != shape:
        raise ValueError(f"mask must be a boolean array of shape {shape}, got {m.dtype} "
                         f"{m.shape}")
    if m.size and not m.any(axis=-1).all():
        raise ValueError("mask must let every query row see at least one key")
    return m


def split_heads(x, num_heads: int):
    """``(..., T, H * d_h)`` -> ``(..., H, T, d_h)``: one attention per head."""
    H = check_int("num_heads", num_heads, minimum=1)
    x_ = check_array("x", x)
    if x_.ndim < 2 or x_.shape[-1] % H:
        raise ValueError(f"x must have shape (..., T, d) with d divisible by num_heads={H}, "
                         f"got shape {x_.shape}")
    *lead, T, d = x_.shape
    return anp.swapaxes(anp.reshape(x, tuple(lead) + (T, H, d // H)), -2, -3)


def merge_heads(x):
    """``(..., H, T, d_h)`` -> ``(..., T, H * d_h)``, the inverse of :func:`split_heads`."""
    x_ = check_array("x", x)
    if x_.ndim < 3:
        raise ValueError(f"x must have shape (..., H, T, d_h), got shape {x_.shape}")
    *lead, H, T, dh = x_.shape
    return anp.reshape(anp.swapaxes(x, -2, -3), tuple(lead) + (T, H * dh))


def multi_head_attention(q, k, v, num_heads: int, window=None, prefix: int = 0, *,
                         mask=None):
    r"""Eq. 2 in each of ``num_heads`` heads, concatenated: $[y^{(1)} \| \dots \| y^{(H)}]$.

    ``q``, ``k``, ``v`` are already projected (Eq. 1); head $h$ uses channels
    $h\,d_h \dots (h+1)\,d_h - 1$ and scales by $1/\sqrt{d_h}$.

    Args:
        q, k: ``(..., T, d)``; v: ``(..., T, d_v)``, both widths divisible by ``num_heads``.
        window, prefix, mask: as in :func:`causal_attention` (one mask for every head).

    Returns:
        ``(..., T, d_v)``.
    """
    heads = [split_heads(x, num_heads) for x in (q, k, v)]  # (..., H, T, d_h)
    return merge_heads(causal_attention(*heads, window=window, prefix=prefix, mask=mask))
