"""Titans Eqs. 1–2: causal softmax attention, sliding window, persistent prefix, masks."""

import math

import matplotlib
import numpy as np
import pytest
from autograd.test_util import check_grads
from naive_attention import naive_causal_attention

from minititans import attention
from minititans.attention import (
    attention_mask,
    causal_attention,
    mac_mask,
    merge_heads,
    multi_head_attention,
    plot_mask,
    sliding_window_mask,
    split_heads,
)

matplotlib.use("Agg")

RTOL, ATOL = 1e-12, 1e-12
SETTINGS = [(None, 0), (1, 0), (2, 0), (3, 0), (None, 2), (1, 2), (3, 3), (2, 5)]


def qkv(T=8, d=4, d_v=3, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal((T, n)).astype(dtype) for n in (d, d, d_v))


def test_eq2_causal_attention_hand_computed_three_tokens():
    # d = 1 so the scale is 1; q_i k_j = j ln 2, so exp(scores) = 1, 2, 4
    q = np.full((3, 1), math.log(2.0))
    k = np.array([[0.0], [1.0], [2.0]])
    v = np.array([[1.0], [2.0], [3.0]])
    expected = np.array([[1.0], [(1 * 1 + 2 * 2) / 3], [(1 * 1 + 2 * 2 + 4 * 3) / 7]])
    np.testing.assert_allclose(causal_attention(q, k, v), expected, rtol=1e-14, atol=0)
    # window 2: token 2 sees tokens 1 and 2 only
    expected[2] = (2 * 2 + 4 * 3) / 6
    np.testing.assert_allclose(causal_attention(q, k, v, window=2), expected, rtol=1e-14)
    # window 1 plus a prefix of 1: token 2 sees tokens 0 and 2
    expected = np.array([[1.0], [(1 * 1 + 2 * 2) / 3], [(1 * 1 + 4 * 3) / 5]])
    np.testing.assert_allclose(causal_attention(q, k, v, window=1, prefix=1), expected,
                               rtol=1e-14)


def test_eq2_scores_scaled_by_inverse_sqrt_d():
    # d = 4: the logit of (2,2,2,2)·(1,1,1,1)/2 = 4 against 0 for the zero key
    q = np.full((2, 4), 2.0)
    k = np.array([[0.0] * 4, [1.0] * 4])
    v = np.array([[0.0], [1.0]])
    w1 = math.exp(4.0) / (1.0 + math.exp(4.0))
    np.testing.assert_allclose(causal_attention(q, k, v)[1, 0], w1, rtol=1e-14)


@pytest.mark.parametrize("window,prefix", SETTINGS)
def test_eq2_causal_attention_matches_naive_loop(window, prefix):
    q, k, v = qkv()
    np.testing.assert_allclose(causal_attention(q, k, v, window=window, prefix=prefix),
                               naive_causal_attention(q, k, v, window, prefix),
                               rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("window,prefix", [(5, 0), (7, 3), (1, 2), (30, 1), (None, 0),
                                           (None, 3)])
def test_eq2_banded_window_for_long_sequences_matches_naive_loop(window, prefix, monkeypatch):
    """Past 2 (64 + w + p) tokens the window is computed in blocks of 64 queries (without a
    window past _DENSE_MAX scores, lowered here so 200 tokens are enough)."""
    monkeypatch.setattr(attention, "_DENSE_MAX", 1000)
    q, k, v = qkv(T=200, d=3, d_v=2, seed=4)
    np.testing.assert_allclose(causal_attention(q, k, v, window=window, prefix=prefix),
                               naive_causal_attention(q, k, v, window, prefix),
                               rtol=RTOL, atol=ATOL)


def test_eq2_banded_window_gradient():
    q, k, v = qkv(T=150, d=2, d_v=2, seed=5)
    check_grads(lambda a: causal_attention(*a, 3, 1), modes=["rev"], order=1)((q, k, v))


@pytest.mark.parametrize("window,prefix,T", [(None, 0, 9), (3, 2, 9), (4, 1, 200)])
def test_eq2_kv_cache_queries_are_the_last_rows(window, prefix, T):
    """k, v longer than q: the queries stand at the last positions (a cache holds the rest)."""
    q, k, v = qkv(T=T, seed=6)
    full = naive_causal_attention(q, k, v, window, prefix)
    for n in (1, 4, T - prefix):
        np.testing.assert_allclose(causal_attention(q[-n:], k, v, window, prefix), full[-n:],
                                   rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(attention_mask(T, window, prefix, num_queries=4),
                                  attention_mask(T, window, prefix)[-4:])


@pytest.mark.parametrize("window,prefix", SETTINGS)
def test_eq2_causal_attention_is_causal(window, prefix):
    q, k, v = qkv()
    y = causal_attention(q, k, v, window=window, prefix=prefix)
    rng = np.random.default_rng(1)
    T = q.shape[0]
    for t in range(T - 1):
        start = max(t + 1, prefix)  # prefix tokens are visible to all, so keep them
        if start >= T:
            continue
        changed = [x.copy() for x in (q, k, v)]
        for x in changed:
            x[start:] = rng.standard_normal(x[start:].shape)
        y2 = causal_attention(*changed, window=window, prefix=prefix)
        np.testing.assert_array_equal(y2[:t + 1], y[:t + 1])


def test_eq2_window_at_least_T_equals_full_attention():
    q, k, v = qkv()
    full = causal_attention(q, k, v)
    for w in (8, 9, 100):
        np.testing.assert_allclose(causal_attention(q, k, v, window=w), full, rtol=0, atol=0)


def test_eq2_window_one_returns_v():
    q, k, v = qkv()
    np.testing.assert_allclose(causal_attention(q, k, v, window=1), v, rtol=1e-15, atol=0)


def test_eq27_prefix_visible_past_the_window():
    q, k, v = qkv(T=8)
    y = causal_attention(q, k, v, window=2, prefix=2)
    # token 7 sees persistent tokens 0, 1 and its window 6, 7
    s = np.array([q[7] @ k[j] / 2.0 for j in (0, 1, 6, 7)])
    w = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
    expected = w @ v[[0, 1, 6, 7]]
    np.testing.assert_allclose(y[7], expected, rtol=1e-12, atol=1e-14)
    # and without the prefix it would not see them
    assert not np.allclose(causal_attention(q, k, v, window=2)[7], expected)


def test_eq2_large_logits_stay_finite():
    # d = 1: logits 1e4 and 1e4 - 1 for token 1; exp(1e4) overflows without the shift
    q = np.array([[100.0], [100.0]])
    k = np.array([[100.0], [99.99]])
    v = np.array([[1.0], [0.0]])
    y = causal_attention(q, k, v)
    assert np.all(np.isfinite(y))
    np.testing.assert_allclose(y[1, 0], math.e / (1.0 + math.e), rtol=1e-10)


def test_eq2_attention_mask_definition():
    m = attention_mask(6, window=2, prefix=2)
    for i in range(6):
        for j in range(6):
            assert m[i, j] == (j < 2 or (i - 2 < j <= i))
    # the prefix block is fully visible, prefix rows included
    assert m[0, 1]
    assert m.dtype == bool and m.shape == (6, 6)


def test_eq23_mac_mask_full_prefix_and_memory_causal_segment():
    m = mac_mask(num_persistent=2, num_memory=3, segment_len=4)
    assert m.shape == (9, 9)
    assert m[:, :5].all()  # persistent and memory tokens fully visible
    seg = m[5:, 5:]
    np.testing.assert_array_equal(seg, np.tril(np.ones((4, 4), dtype=bool)))
    mc = mac_mask(2, 4, 4, memory_causal=True)
    np.testing.assert_array_equal(mc[6:, 2:6], np.tril(np.ones((4, 4), dtype=bool)))
    assert mc[:, :2].all()


def test_eq27_sliding_window_mask_is_window_plus_prefix():
    """Eqs. 27 and 31 share one mask (MAG and MAL): the window plus the persistent prefix."""
    m = sliding_window_mask(num_persistent=2, T=6, window=3)
    np.testing.assert_array_equal(m, attention_mask(8, window=3, prefix=2))
    assert m[7, :2].all() and not m[7, 4] and m[7, 5:].all()


def test_eq2_explicit_mask_equals_window_and_prefix_and_mac_mask_matches_naive():
    q, k, v = qkv(T=9, d=4, d_v=3)
    np.testing.assert_array_equal(
        causal_attention(q, k, v, mask=attention_mask(9, window=3, prefix=2)),
        causal_attention(q, k, v, window=3, prefix=2))
    mask = mac_mask(1, 4, 4, memory_causal=True)  # segment row s sees memory m <= s
    y = multi_head_attention(q, k, v[:, :2], num_heads=2, mask=mask)
    for h in range(2):  # each head: softmax over the keys its row may see, written out
        qh, kh, vh = q[:, 2 * h:2 * h + 2], k[:, 2 * h:2 * h + 2], v[:, h:h + 1]
        for i in range(9):
            js = np.flatnonzero(mask[i])
            s = np.array([qh[i] @ kh[j] for j in js]) / math.sqrt(2)
            w = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
            np.testing.assert_allclose(y[i, h], w @ vh[js, 0], rtol=RTOL, atol=ATOL)
    with pytest.raises(ValueError, match="either mask or window"):
        causal_attention(q, k, v, window=2, mask=mask)
    with pytest.raises(ValueError, match=r"mask must be a boolean array of shape \(9, 9\)"):
        causal_attention(q, k, v, mask=mask[:8])
    with pytest.raises(ValueError, match="at least one key"):
        causal_attention(q, k, v, mask=np.zeros((9, 9), dtype=bool))


def test_plot_mask_draws_the_mask():
    import matplotlib.pyplot as plt

    m = sliding_window_mask(2, 6, 3)
    ax = plot_mask(m, title="MAG")
    np.testing.assert_array_equal(np.asarray(ax.images[0].get_array()), m)
    assert ax.get_title() == "MAG"
    plt.close(ax.figure)


def test_eq2_multi_head_equals_attention_per_head():
    q, k, v = qkv(T=6, d=8, d_v=4)
    y = multi_head_attention(q, k, v, num_heads=2, window=3, prefix=1)
    for h in range(2):
        sq, sv = slice(4 * h, 4 * h + 4), slice(2 * h, 2 * h + 2)
        np.testing.assert_allclose(y[:, sv], naive_causal_attention(q[:, sq], k[:, sq],
                                                                    v[:, sv], 3, 1),
                                   rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(merge_heads(split_heads(q, 4)), q)


def test_eq2_leading_axes_carried_along():
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((2, 3, 5, 4)) for _ in range(3))
    y = causal_attention(q, k, v, window=2)
    np.testing.assert_allclose(y[1, 2], naive_causal_attention(q[1, 2], k[1, 2], v[1, 2], 2),
                               rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("window,prefix", [(None, 0), (2, 1)])
def test_eq2_causal_attention_gradient(window, prefix):
    q, k, v = qkv(T=5, d=3, d_v=2)
    check_grads(lambda a: causal_attention(*a, window, prefix),  # all three arguments
                modes=["rev"], order=1)((q, k, v))


def test_eq2_float32_in_float32_out():
    q, k, v = qkv(dtype=np.float32)
    y = causal_attention(q, k, v, window=3, prefix=1)
    assert y.dtype == np.float32
    y64 = causal_attention(*(x.astype(np.float64) for x in (q, k, v)), window=3, prefix=1)
    np.testing.assert_allclose(y, y64, rtol=1e-5, atol=1e-5)


def test_eq2_bad_inputs():
    q, k, v = qkv(T=4)
    with pytest.raises(ValueError, match="k must have the shape of q"):
        causal_attention(q, k[:3], v)
    with pytest.raises(ValueError, match="v must have shape"):
        causal_attention(q, k, v[:3])
    with pytest.raises(ValueError, match="window must be >= 1"):
        causal_attention(q, k, v, window=0)
    with pytest.raises(TypeError, match="window must be an int"):
        causal_attention(q, k, v, window=2.5)
    with pytest.raises(ValueError, match="prefix must be >= 0"):
        causal_attention(q, k, v, prefix=-1)
    with pytest.raises(ValueError, match="prefix must be <= the sequence length"):
        causal_attention(q, k, v, prefix=5)
    with pytest.raises(TypeError, match="q must be a float32 or float64 array"):
        causal_attention(q.astype(np.int64), k, v)
    with pytest.raises(ValueError, match="q must have shape"):
        causal_attention(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="num_heads"):
        multi_head_attention(q, k, v, num_heads=3)
    with pytest.raises(ValueError, match="memory_causal=True needs num_memory == segment_len"):
        mac_mask(1, 2, 3, memory_causal=True)


def _naive_mac_mask(n_p, n_m, C, memory_causal):
    """Eqs. 22–23's mask written out entry by entry: who may read whom."""
    L = n_p + n_m + C
    mask = np.zeros((L, L), dtype=bool)
    for i in range(L):
        for j in range(L):
            if j < n_p:  # persistent tokens: visible to every row
                mask[i, j] = True
            elif j < n_p + n_m:  # memory token m = j - n_p
                m = j - n_p
                if not memory_causal:
                    mask[i, j] = True
                elif i < n_p:  # persistent rows (their outputs are not used) read them all
                    mask[i, j] = True
                else:  # memory row r or segment row s reads memory tokens m <= r (or s)
                    r = i - n_p if i < n_p + n_m else i - n_p - n_m
                    mask[i, j] = m <= r
            else:  # segment token s = j - n_p - n_m: causal, only for segment rows
                mask[i, j] = i >= n_p + n_m and j <= i
    return mask


@pytest.mark.parametrize("n_p,n_m,C,memory_causal", [
    (0, 3, 3, False), (2, 4, 4, False), (1, 2, 5, False), (3, 0, 2, False),
    (0, 3, 3, True), (2, 4, 4, True), (1, 1, 1, True)])
def test_eq23_mac_mask_memory_rows_and_every_block_match_a_naive_mask(n_p, n_m, C,
                                                                     memory_causal):
    got = mac_mask(n_p, n_m, C, memory_causal=memory_causal)
    np.testing.assert_array_equal(got, _naive_mac_mask(n_p, n_m, C, memory_causal))
    rows = slice(n_p, n_p + n_m)  # the memory rows themselves
    assert not got[rows, n_p + n_m:].any()  # a memory token never reads the segment
    want = np.tril(np.ones((n_m, n_m), bool)) if memory_causal else np.ones((n_m, n_m), bool)
    np.testing.assert_array_equal(got[rows, n_p:n_p + n_m], want)
    assert got[rows, :n_p].all()
