"""Titans Eqs. 3–5 (linear attention) and Appendix C (delta rule, gated delta rule)."""

import math

import numpy as np
import pytest
from autograd.test_util import check_grads
from naive_attention import naive_delta_rule, naive_linear_attention

from minititans.linear_attention import (
    apply_feature_map,
    delta_rule,
    gated_delta_rule,
    linear_attention,
    linear_attention_parallel,
    linear_attention_recurrent,
)
from minititans.memory.models import init_memory
from minititans.memory.scan import memory_scan
from minititans.memory.update import MemoryState

RTOL, ATOL = 1e-12, 1e-12
FORMS = [("identity", False), ("identity", True), ("elu1", False), ("elu1", True)]


def qkv(T=8, d=4, d_v=3, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal((T, n)).astype(dtype) for n in (d, d, d_v))


def positive_qkv(T=8, d=4, d_v=3, seed=0):
    # identity features with normalize=True need a denominator that stays away from 0
    q, k, v = qkv(T, d, d_v, seed)
    return np.abs(q) + 0.1, np.abs(k) + 0.1, v


def gates(T=8, seed=1):
    rng = np.random.default_rng(seed)
    return rng.uniform(0.05, 0.5, T), rng.uniform(0.0, 0.3, T)


def test_eq4_linear_attention_hand_computed_three_tokens():
    q = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    k = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    v = np.array([[1.0], [2.0], [3.0]])
    # M_1 = [1, 0]^T, M_2 = M_1 + 2 [1, 1]^T = [3, 2]^T, M_3 = M_2 + 3 [0, 2]^T = [3, 8]^T
    expected = np.array([[1.0], [2.0], [3.0 + 8.0]])
    for f in (linear_attention, lambda *a: linear_attention_recurrent(*a)[0]):
        np.testing.assert_allclose(f(q, k, v), expected, rtol=1e-15, atol=0)


def test_eq3_normalized_linear_attention_hand_computed_three_tokens():
    q = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    k = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    v = np.array([[1.0], [2.0], [3.0]])
    # z_1 = [1, 0], z_2 = [2, 1], z_3 = [2, 3]; denominators q_t z_t = 1, 1, 5
    expected = np.array([[1.0 / 1.0], [2.0 / 1.0], [11.0 / 5.0]])
    np.testing.assert_allclose(linear_attention(q, k, v, normalize=True), expected,
                               rtol=1e-15, atol=0)


def test_eq3_elu1_feature_map_hand_computed_three_tokens():
    # phi(0) = 1, phi(1) = 2, phi(-1) = e^-1; d = 1
    q = np.array([[0.0], [1.0], [-1.0]])
    k = np.array([[0.0], [0.0], [1.0]])
    v = np.array([[3.0], [1.0], [2.0]])
    cum = [1 * 3.0, 1 * 3.0 + 1 * 1.0, 1 * 3.0 + 1 * 1.0 + 2 * 2.0]  # sum phi(k_j) v_j
    zs = [1.0, 2.0, 4.0]  # sum phi(k_j)
    phi_q = [1.0, 2.0, math.exp(-1.0)]
    expected = np.array([[p * c] for p, c in zip(phi_q, cum, strict=True)])
    np.testing.assert_allclose(linear_attention(q, k, v, "elu1"), expected, rtol=1e-15)
    expected_n = np.array([[c / z] for c, z in zip(cum, zs, strict=True)])
    np.testing.assert_allclose(linear_attention(q, k, v, "elu1", normalize=True), expected_n,
                               rtol=1e-15)
    np.testing.assert_allclose(apply_feature_map(np.array([-1.0, 0.0, 2.0]), "elu1"),
                               [math.exp(-1.0), 1.0, 3.0], rtol=1e-15)


@pytest.mark.parametrize("feature_map,normalize", FORMS)
def test_eq3_linear_attention_matches_naive_double_sum(feature_map, normalize):
    q, k, v = positive_qkv()
    np.testing.assert_allclose(linear_attention(q, k, v, feature_map, normalize),
                               naive_linear_attention(q, k, v, feature_map, normalize),
                               rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("feature_map,normalize", FORMS)
def test_eq5_parallel_equals_recurrent(feature_map, normalize):
    q, k, v = positive_qkv()
    y_rec, _ = linear_attention_recurrent(q, k, v, feature_map, normalize)
    np.testing.assert_allclose(linear_attention_parallel(q, k, v, feature_map, normalize),
                               y_rec, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("feature_map,normalize", FORMS)
def test_eq5_recurrent_streams_in_two_calls(feature_map, normalize):
    q, k, v = positive_qkv()
    y, (M, z) = linear_attention_recurrent(q, k, v, feature_map, normalize)
    y1, state = linear_attention_recurrent(q[:3], k[:3], v[:3], feature_map, normalize)
    y2, (M2, z2) = linear_attention_recurrent(q[3:], k[3:], v[3:], feature_map, normalize,
                                              state=state)
    np.testing.assert_allclose(np.concatenate([y1, y2]), y, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(M2, M, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(z2, z, rtol=RTOL, atol=ATOL)


def test_eq5_linear_attention_with_heads_axis():
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((2, 5, 3)) for _ in range(3))
    y_par = linear_attention(q, k, v)
    y_rec, (M, z) = linear_attention_recurrent(q, k, v)
    assert M.shape == (2, 3, 3) and z.shape == (2, 3)
    for h in range(2):
        np.testing.assert_allclose(y_par[h], naive_linear_attention(q[h], k[h], v[h]),
                                   rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(y_rec, y_par, rtol=RTOL, atol=ATOL)


def causality_check(f, n_inputs, T=8):
    rng = np.random.default_rng(5)
    xs = [rng.standard_normal((T, 3)) for _ in range(n_inputs)]
    y = f(*xs)
    for t in range(T - 1):
        changed = [x.copy() for x in xs]
        for x in changed:
            x[t + 1:] = rng.standard_normal(x[t + 1:].shape)
        np.testing.assert_array_equal(f(*changed)[:t + 1], y[:t + 1])


@pytest.mark.parametrize("feature_map", ["identity", "elu1"])
def test_eq4_linear_attention_is_causal(feature_map):
    causality_check(lambda q, k, v: linear_attention(q, k, v, feature_map), 3)
    causality_check(lambda q, k, v: linear_attention_recurrent(q, k, v, feature_map)[0], 3)
    causality_check(lambda q, k, v: linear_attention(q, k, v, "elu1", normalize=True), 3)


def test_appendix_c_delta_rule_and_gated_are_causal():
    beta, alpha = gates()
    causality_check(lambda q, k, v: delta_rule(q, k, v, beta, alpha), 3)
    causality_check(lambda q, k, v: gated_delta_rule(q, k, v, beta, alpha), 3)


@pytest.mark.parametrize("gated", [False, True])
def test_appendix_c_delta_rule_matches_naive_loop(gated):
    q, k, v = qkv()
    beta, alpha = gates()
    f = gated_delta_rule if gated else delta_rule
    y, W = f(q, k, v, beta, alpha, return_state=True)
    y_naive, W_naive = naive_delta_rule(q, k, v, beta, alpha, gated=gated)
    np.testing.assert_allclose(y, y_naive, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(W, W_naive, rtol=RTOL, atol=ATOL)
    # alpha = None means no forgetting; scalar gates broadcast
    np.testing.assert_allclose(delta_rule(q, k, v, 0.3),
                               naive_delta_rule(q, k, v, [0.3] * 8, [0.0] * 8)[0],
                               rtol=RTOL, atol=ATOL)


def test_appendix_c_delta_rule_hand_computed_two_tokens():
    # d = d_v = 1, k = q = 1, v = 2, beta = alpha = 1/2
    q = k = np.ones((2, 1))
    v = np.full((2, 1), 2.0)
    # Titans: W_1 = 0 - 0.5 (0 - 2) = 1;      W_2 = 0.5 * 1 - 0.5 (1 - 2) = 1
    np.testing.assert_allclose(delta_rule(q, k, v, 0.5, 0.5), [[1.0], [1.0]], rtol=1e-15)
    # Gated: W' = 0.5;  W_2 = 0.5 - 0.5 (0.5 - 2) = 1.25 = Titans + alpha beta k^2 W_1
    np.testing.assert_allclose(gated_delta_rule(q, k, v, 0.5, 0.5), [[1.0], [1.25]],
                               rtol=1e-15)


def test_appendix_c_gated_minus_titans_is_alpha_beta_kTk_W():
    rng = np.random.default_rng(4)
    W = rng.standard_normal((4, 3))
    q, k, v = qkv(T=1)
    a, b = 0.3, 0.7
    _, W_titans = delta_rule(q, k, v, b, a, state=W, return_state=True)
    _, W_gated = gated_delta_rule(q, k, v, b, a, state=W, return_state=True)
    np.testing.assert_allclose(W_gated - W_titans, a * b * k.T @ k @ W, rtol=1e-12, atol=1e-13)
    # from W_0 = 0 the first step cannot tell them apart
    np.testing.assert_allclose(gated_delta_rule(q, k, v, b, a), delta_rule(q, k, v, b, a),
                               rtol=0, atol=0)


def test_appendix_c_delta_rule_streams_with_state():
    q, k, v = qkv()
    beta, alpha = gates()
    for f in (delta_rule, gated_delta_rule):
        y, W = f(q, k, v, beta, alpha, return_state=True)
        y1, W1 = f(q[:5], k[:5], v[:5], beta[:5], alpha[:5], return_state=True)
        y2, W2 = f(q[5:], k[5:], v[5:], beta[5:], alpha[5:], state=W1, return_state=True)
        np.testing.assert_allclose(np.concatenate([y1, y2]), y, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(W2, W, rtol=RTOL, atol=ATOL)


def test_appendix_c_delta_rule_equals_memory_scan():
    q, k, v = qkv(T=6, d=4, d_v=3)
    beta, alpha = gates(T=6)
    params = init_memory(np.random.default_rng(0), d_in=4, d_out=3, depth=1, init="zero_out")
    out, state = memory_scan(MemoryState.initial(params), k, v, q, alpha=alpha, eta=0.0,
                             theta=beta / 2, chunk_size=1, read="after", backend="reference")
    y, W = delta_rule(q, k, v, beta, alpha, return_state=True)
    np.testing.assert_allclose(y, out, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(W, state.params[0], rtol=1e-12, atol=1e-12)


def test_appendix_c_dot_loss_memory_scan_equals_linear_attention():
    # loss -<kW, v>, theta = 1, alpha = eta = 0: the update W += k^T v is Eq. 4
    q, k, v = qkv(T=6, d=4, d_v=3)
    params = init_memory(np.random.default_rng(0), d_in=4, d_out=3, depth=1, init="zero_out")
    out, _ = memory_scan(MemoryState.initial(params), k, v, q, alpha=0.0, eta=0.0, theta=1.0,
                         loss="dot", backend="reference")
    np.testing.assert_allclose(linear_attention(q, k, v), out, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("feature_map,normalize", [("identity", False), ("elu1", True)])
def test_eq3_linear_attention_gradient(feature_map, normalize):
    q, k, v = qkv(T=4, d=3, d_v=2)
    # check_grads differentiates its first argument: q, k and v go in as one tuple
    check_grads(lambda a: linear_attention(*a, feature_map, normalize),
                modes=["rev"], order=1)((q, k, v))
    check_grads(lambda a: linear_attention_recurrent(*a, feature_map, normalize)[0],
                modes=["rev"], order=1)((q, k, v))


@pytest.mark.parametrize("f", [delta_rule, gated_delta_rule])
def test_appendix_c_delta_rule_gradient(f):
    q, k, v = qkv(T=4, d=3, d_v=2)
    beta, alpha = gates(T=4)
    check_grads(lambda a: f(*a), modes=["rev"], order=1)((q, k, v, beta, alpha))


def test_eq4_and_delta_rule_float32_in_float32_out():
    q, k, v = qkv(dtype=np.float32)
    beta, alpha = gates()
    q64, k64, v64 = (x.astype(np.float64) for x in (q, k, v))
    cases = [
        (lambda q, k, v: linear_attention(q, k, v, "elu1", True)),
        (lambda q, k, v: linear_attention_recurrent(q, k, v, "elu1", True)[0]),
        (lambda q, k, v: delta_rule(q, k, v, beta, alpha)),
        (lambda q, k, v: gated_delta_rule(q, k, v, 0.2, 0.1)),
    ]
    for f in cases:
        y = f(q, k, v)
        assert y.dtype == np.float32
        np.testing.assert_allclose(y, f(q64, k64, v64), rtol=1e-5, atol=1e-5)


def test_eq3_and_delta_rule_bad_inputs():
    q, k, v = qkv(T=4)
    with pytest.raises(ValueError, match="k must have the shape of q"):
        linear_attention(q, k[:, :2], v)
    with pytest.raises(ValueError, match="v must have shape"):
        linear_attention_recurrent(q, k, v[:3])
    with pytest.raises(ValueError, match="feature_map must be one of"):
        linear_attention(q, k, v, feature_map="relu")
    with pytest.raises(ValueError, match="feature_map must be one of"):
        linear_attention_recurrent(q, k, v, feature_map="softmax")
    with pytest.raises(ValueError, match="state must be"):
        linear_attention_recurrent(q, k, v, state=(np.zeros((4, 4)), np.zeros(4)))
    with pytest.raises(TypeError, match="q must be a float32 or float64 array"):
        linear_attention(q.astype(np.int32), k, v)
    with pytest.raises(ValueError, match="beta must be a float or have shape"):
        delta_rule(q, k, v, np.ones(3))
    with pytest.raises(ValueError, match="beta contains NaN or inf"):
        delta_rule(q, k, v, np.array([0.1, np.nan, 0.1, 0.1]))
    with pytest.raises(ValueError, match="alpha must be a float or have shape"):
        gated_delta_rule(q, k, v, 0.1, np.ones(5) * 0.1)
    with pytest.raises(ValueError, match="alpha contains NaN or inf"):
        delta_rule(q, k, v, 0.1, np.array([0.1, np.inf, 0.1, 0.1]))
    with pytest.raises(ValueError, match="alpha must be <= 1"):
        delta_rule(q, k, v, 0.1, 1.5)
    with pytest.raises(ValueError, match="state must have shape"):
        delta_rule(q, k, v, 0.1, state=np.zeros((3, 3)))
    with pytest.raises(ValueError, match="k must have the shape of q"):
        delta_rule(q, k[:3], v, 0.1)
