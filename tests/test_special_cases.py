"""Appendix C (PAPER.md §6): one update rule contains linear attention, the delta rule, the
gated delta rule and TTT-Linear; α = 1 wipes the memory and θ = 0 freezes it."""

import numpy as np
import pytest
from naive_memory import linear_grad, naive_linear_attention, unit_rows

import minititans as mt


def _kvq(rng, T=12, d=4, dv=3):
    return unit_rows(rng, T, d), rng.standard_normal((T, dv)), rng.standard_normal((T, d))


def _empty(d, dv):
    return mt.MemoryState.initial(mt.MemoryParams([np.zeros((d, dv))]))


def test_appendix_c_dot_loss_theta_one_is_linear_attention(rng):
    K, V, Q = _kvq(rng)
    out, _ = mt.memory_scan(_empty(4, 3), K, V, Q, alpha=0.0, eta=0.0, theta=1.0, loss="dot")
    np.testing.assert_allclose(out, naive_linear_attention(Q, K, V), rtol=1e-12, atol=1e-13)


def test_appendix_c_linear_attention_preset(rng):
    K, V, Q = _kvq(rng)
    rule = mt.preset("linear_attention")
    out, _ = rule.scan(rule.init_state(rng, 4, 3), K, V, Q)
    np.testing.assert_allclose(out, naive_linear_attention(Q, K, V), rtol=1e-12, atol=1e-13)


def _naive_delta(K, V, Q, beta, alpha):
    W, ys = np.zeros((K.shape[1], V.shape[1])), []
    for t in range(len(K)):
        # W_t = (1 - α_t) W_{t-1} - β_t k_tᵀ (k_t W_{t-1} - v_t)
        W = (1 - alpha[t]) * W - beta[t] * np.outer(K[t], K[t] @ W - V[t])
        ys.append(Q[t] @ W)
    return np.array(ys), W


def test_appendix_c_l2_loss_no_momentum_is_the_delta_rule(rng):
    K, V, Q = _kvq(rng)
    beta = rng.uniform(0.1, 1.0, 12)
    out, state = mt.memory_scan(_empty(4, 3), K, V, Q, alpha=0.0, eta=0.0, theta=beta / 2)
    y, W = _naive_delta(K, V, Q, beta, np.zeros(12))
    np.testing.assert_allclose(out, y, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(state.params[0], W, rtol=1e-12, atol=1e-13)


def test_appendix_c_delta_rule_with_beta_one_writes_the_value_exactly(rng):
    # with a unit key and β = 1 (θ = 1/2) the delta rule replaces M(k_t) by v_t
    K, V, Q = _kvq(rng, T=5)
    rule = mt.preset("delta_rule")
    for t in range(5):
        _, state = rule.scan(rule.init_state(rng, 4, 3), K[: t + 1], V[: t + 1], Q[: t + 1])
        np.testing.assert_allclose(mt.memory_forward(state.params, K[t]), V[t], rtol=1e-12)


def test_appendix_c_forgetting_gives_the_gated_delta_rule(rng):
    K, V, Q = _kvq(rng)
    beta = rng.uniform(0.1, 1.0, 12)
    alpha = rng.uniform(0.0, 0.3, 12)
    out, _ = mt.memory_scan(_empty(4, 3), K, V, Q, alpha=alpha, eta=0.0, theta=beta / 2)
    np.testing.assert_allclose(out, _naive_delta(K, V, Q, beta, alpha)[0], rtol=1e-12,
                               atol=1e-13)


@pytest.mark.parametrize("b", [4, 5])
def test_appendix_c_theta_only_chunked_is_ttt_linear(rng, b):
    # TTT-Linear (no LayerNorm): mini-batch GD, every gradient of a chunk at the chunk start;
    # token i reads W' - Σ_{j≤i in chunk} θ_j ∇ℓ(W'; x_j)
    K, V, Q = _kvq(rng, T=13)
    theta = rng.uniform(0.05, 0.3, 13)
    W, ys = np.zeros((4, 3)), []
    for start in range(0, 13, b):
        W_start = W.copy()
        for i in range(start, min(start + b, 13)):
            W = W - theta[i] * linear_grad(W_start, K[i], V[i])
            ys.append(Q[i] @ W)
    out, state = mt.memory_scan(_empty(4, 3), K, V, Q, alpha=0.0, eta=0.0, theta=theta,
                                chunk_size=b)
    np.testing.assert_allclose(out, np.array(ys), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(state.params[0], W, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("b", [1, 3])
def test_appendix_c_alpha_one_wipes_the_memory(rng, b):
    K, V, Q = _kvq(rng, T=6)
    state = mt.MemoryState.initial(mt.init_memory(rng, 4, 3, depth=2))
    # α = 1 and θ = 0 with S_0 = 0: M_t = 0·M_{t-1} + 0, everything is forgotten at once
    out, final = mt.memory_scan(state, K, V, Q, alpha=1.0, eta=0.5, theta=0.0, chunk_size=b)
    for w in final.params:
        np.testing.assert_array_equal(w, 0.0)
    np.testing.assert_array_equal(out, 0.0)


def test_appendix_c_alpha_one_keeps_only_the_last_write(rng):
    # α_t = 1 at token 3: what tokens 0-2 wrote is gone, M_3 = S_3 = -θ ∇ℓ(M_2; x_3) (η = 0)
    K, V, Q = _kvq(rng, T=4)
    alpha = np.array([0.0, 0.0, 0.0, 1.0])
    _, s2 = mt.memory_scan(_empty(4, 3), K[:3], V[:3], Q[:3], alpha=0.0, eta=0.0, theta=0.5)
    _, s3 = mt.memory_scan(_empty(4, 3), K, V, Q, alpha=alpha, eta=0.0, theta=0.5)
    np.testing.assert_allclose(s3.params[0], -0.5 * linear_grad(s2.params[0], K[3], V[3]),
                               rtol=1e-12)


@pytest.mark.parametrize("b", [1, 4])
def test_appendix_c_theta_zero_freezes_the_memory(rng, b):
    K, V, Q = _kvq(rng, T=9)
    params = mt.init_memory(rng, 4, 3, depth=2)
    out, final = mt.memory_scan(mt.MemoryState.initial(params), K, V, Q, alpha=0.0, eta=0.9,
                                theta=0.0, chunk_size=b)
    for w, w0 in zip(final.params, params):
        np.testing.assert_array_equal(w, w0)
    np.testing.assert_allclose(out, mt.memory_forward(params, Q), rtol=1e-14)


@pytest.mark.parametrize("name", sorted(mt.PRESETS))
def test_every_preset_writes_a_pair_in_the_direction_of_its_value(rng, name):
    # from the empty memory (last layer zero) one write moves only the last layer, by a
    # multiple of hᵀv: the read-out M(k) is then exactly parallel to v
    rule = mt.preset(name)
    k = unit_rows(rng, 1, 6)
    v = rng.standard_normal((1, 6)) / np.sqrt(6)
    _, state = rule.scan(rule.init_state(rng, 6, 6), k, v, k)
    read = mt.memory_forward(state.params, k)[0]
    cosine = read @ v[0] / (np.linalg.norm(read) * np.linalg.norm(v))
    if rule.loss in ("l2", "dot"):
        np.testing.assert_allclose(cosine, 1.0, rtol=1e-12)
    else:
        # Huber and l_p reshape the residual elementwise (clip, power): still towards v
        assert cosine > 0.7
        assert np.sum((read - v[0]) ** 2) < np.sum(v**2)


def test_preset_unknown_name_is_a_clear_error():
    with pytest.raises(ValueError, match="name must be one of"):
        mt.preset("titans_huge")
