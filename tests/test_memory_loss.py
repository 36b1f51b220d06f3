"""Eq. 12 (the associative loss) and Eq. 8 (its gradient, the momentary surprise)."""

import numpy as np
import pytest
from autograd.test_util import check_grads
from naive_memory import linear_grad, naive_grad, naive_loss

import minititans as mt
from minititans.memory.models import MemoryParams


def _linear(W):
    return MemoryParams([np.asarray(W, dtype=float)])


def test_eq12_loss_hand_computed():
    # M(k) = k W = [1, 2]; r = M(k) - v = [1, 1]; ℓ = 1² + 1² = 2 (no ½, no mean)
    params = _linear([[1.0, 0.0], [0.0, 2.0]])
    assert mt.associative_loss(params, np.array([1.0, 1.0]), np.array([0.0, 1.0])) == 2.0


def test_eq12_loss_is_summed_over_tokens(rng):
    params = mt.init_memory(rng, 3, 2, depth=2)
    k, v = rng.standard_normal((4, 3)), rng.standard_normal((4, 2))
    total = sum(naive_loss(list(params), k[i], v[i]) for i in range(4))
    np.testing.assert_allclose(mt.associative_loss(params, k, v), total, rtol=1e-13)


def test_eq8_surprise_linear_hand_computed():
    # ∇ = 2 kᵀ(kW - v) = 2 [1, 1]ᵀ [1, 1] = all twos
    params = _linear([[1.0, 0.0], [0.0, 2.0]])
    (g,) = mt.surprise(params, np.array([[1.0, 1.0]]), np.array([[0.0, 1.0]]))
    np.testing.assert_array_equal(g, np.full((2, 2), 2.0))


def test_eq8_surprise_linear_matches_closed_form(rng):
    params = mt.init_memory(rng, 5, 3, depth=1)
    k, v = rng.standard_normal(5), rng.standard_normal(3)
    (g,) = mt.surprise(params, k[None], v[None])
    np.testing.assert_allclose(g, linear_grad(params[0], k, v), rtol=1e-13)


@pytest.mark.parametrize("activation", ["gelu", "silu"])
@pytest.mark.parametrize("depth,residual_norm", [(2, False), (3, False), (2, True)])
def test_eq8_surprise_deep_matches_naive_gradient(rng, activation, depth, residual_norm):
    params = mt.init_memory(rng, 4, 4, depth=depth, expansion=2, activation=activation,
                            residual_norm=residual_norm)
    k, v = rng.standard_normal(4), rng.standard_normal(4)
    g = mt.surprise(params, k[None], v[None])
    expected = naive_grad(list(params), k, v, activation, residual_norm)
    for gi, ei in zip(g, expected):
        np.testing.assert_allclose(gi, ei, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("loss", ["l2", "dot", "huber", "lp"])
def test_eq8_surprise_passes_finite_difference_check(rng, loss):
    params = mt.init_memory(rng, 3, 3, depth=2, expansion=2)
    k, v = rng.standard_normal((2, 3)), rng.standard_normal((2, 3))
    check_grads(lambda p: mt.associative_loss(p, k, v, loss, delta=0.3), modes=["rev"],
                order=2)(params)


def test_dot_loss_gives_the_linear_attention_write(rng):
    # ∇ of -<kW, v> is -kᵀv, so one step of size θ=1 adds kᵀv (Eq. 4)
    params = mt.init_memory(rng, 4, 2, depth=1)
    k, v = rng.standard_normal(4), rng.standard_normal(2)
    (g,) = mt.surprise(params, k[None], v[None], "dot")
    np.testing.assert_allclose(g, -np.outer(k, v), rtol=1e-14)


def test_huber_loss_hand_computed_and_gradient_capped():
    params = _linear(np.zeros((1, 2)))
    k, v = np.array([[1.0]]), np.array([[0.25, -3.0]])  # residuals -0.25 and 3.0, δ = 1
    # 0.25² inside δ; 2·1·3 - 1 outside
    np.testing.assert_allclose(mt.associative_loss(params, k, v, "huber", delta=1.0),
                               0.0625 + 5.0, rtol=1e-14)
    (g,) = mt.surprise(params, k, v, "huber", delta=1.0)
    np.testing.assert_allclose(g, [[-0.5, 2.0]], rtol=1e-14)  # 2r inside, 2δ·sign(r) outside


def test_lp_loss_hand_computed():
    params = _linear(np.zeros((1, 2)))
    k, v = np.array([[1.0]]), np.array([[2.0, -1.0]])
    np.testing.assert_allclose(mt.associative_loss(params, k, v, "lp", p=3.0), 9.0, rtol=1e-14)
    (g,) = mt.surprise(params, k, v, "lp", p=3.0)
    np.testing.assert_allclose(g, [[-12.0, 3.0]], rtol=1e-14)  # p |r|^{p-1} sign(r)


def test_per_token_surprise_equals_one_surprise_per_token(rng):
    params = mt.init_memory(rng, 3, 3, depth=2, expansion=2, residual_norm=True)
    k, v = rng.standard_normal((5, 3)), rng.standard_normal((5, 3))
    u = mt.per_token_surprise(params, k, v)
    for i in range(5):
        gi = mt.surprise(params, k[i:i + 1], v[i:i + 1])
        for a, b in zip(u, gi):
            np.testing.assert_allclose(a[i], b, rtol=1e-12, atol=1e-14)
