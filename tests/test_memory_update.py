"""Eqs. 8–14: one step of the update, MemoryState, the special cases α = 1 and θ = 0."""

import numpy as np
import pytest
from naive_memory import linear_grad, naive_grad

import minititans as mt
from minititans.memory.models import MemoryParams


def _state(W, S=None):
    W = np.asarray(W, dtype=float)
    params = MemoryParams([W])
    S = np.zeros_like(W) if S is None else np.asarray(S, dtype=float)
    return mt.MemoryState(params, MemoryParams([S]))


def test_eq13_eq14_memory_step_hand_computed():
    # W = I, S = 0.5·1, k = [1, 0], v = [0, 1]:  ∇ = 2 kᵀ(kW - v) = 2 [1,0]ᵀ[1,-1]
    state = _state(np.eye(2), np.full((2, 2), 0.5))
    new = mt.memory_step(state, np.array([1.0, 0.0]), np.array([0.0, 1.0]),
                         alpha=0.1, eta=0.5, theta=0.25)
    grad = np.array([[2.0, -2.0], [0.0, 0.0]])
    S = 0.5 * np.full((2, 2), 0.5) - 0.25 * grad  # Eq. 14
    W = 0.9 * np.eye(2) + S  # Eq. 13
    np.testing.assert_allclose(new.momentum[0], S, rtol=1e-15)
    np.testing.assert_allclose(new.params[0], W, rtol=1e-15)
    np.testing.assert_allclose(new.params[0], [[0.65, 0.75], [0.25, 1.15]], rtol=1e-15)


def test_eq8_plain_surprise_step_is_alpha_eta_zero(rng):
    params = mt.init_memory(rng, 4, 3, depth=1)
    k, v = rng.standard_normal(4), rng.standard_normal(3)
    new = mt.memory_step(mt.MemoryState.initial(params), k, v, alpha=0.0, eta=0.0, theta=0.3)
    expected = params[0] - 0.3 * linear_grad(params[0], k, v)  # Eq. 8
    np.testing.assert_allclose(new.params[0], expected, rtol=1e-14)


def test_eq9_eq10_momentum_carries_past_surprise(rng):
    params = mt.init_memory(rng, 3, 3, depth=2, expansion=2)
    k1, v1, k2, v2 = (rng.standard_normal(3) for _ in range(4))
    s = mt.MemoryState.initial(params)
    s1 = mt.memory_step(s, k1, v1, alpha=0.0, eta=0.8, theta=0.1)
    s2 = mt.memory_step(s1, k2, v2, alpha=0.0, eta=0.8, theta=0.1)
    g1 = naive_grad(list(params), k1, v1)
    M1 = [w - 0.1 * g for w, g in zip(params, g1)]
    g2 = naive_grad(M1, k2, v2)
    S2 = [0.8 * (-0.1 * a) - 0.1 * b for a, b in zip(g1, g2)]  # Eq. 10
    for m1, s_, got_w, got_s in zip(M1, S2, s2.params, s2.momentum):
        np.testing.assert_allclose(got_s, s_, rtol=1e-11, atol=1e-14)
        np.testing.assert_allclose(got_w, m1 + s_, rtol=1e-11, atol=1e-14)  # Eq. 9


def test_eq13_alpha_one_wipes_the_memory(rng):
    params = mt.init_memory(rng, 4, 4, depth=2)
    new = mt.memory_step(mt.MemoryState.initial(params), rng.standard_normal(4),
                         rng.standard_normal(4), alpha=1.0, eta=0.0, theta=0.0)
    for w in new.params:
        np.testing.assert_array_equal(w, 0.0)


def test_eq14_theta_zero_and_no_momentum_freezes_the_memory(rng):
    params = mt.init_memory(rng, 4, 4, depth=2)
    state = mt.MemoryState.initial(params)
    K = rng.standard_normal((6, 4))
    _, final = mt.memory_scan(state, K, K, K, alpha=0.0, eta=0.9, theta=0.0)
    for a, b in zip(final.params, params):
        np.testing.assert_array_equal(a, b)


def test_memory_step_does_not_mutate_its_arguments(rng):
    params = mt.init_memory(rng, 3, 3, depth=2)
    copies = [w.copy() for w in params]
    state = mt.MemoryState.initial(params)
    k = rng.standard_normal(3)
    k_copy = k.copy()
    mt.memory_step(state, k, k, alpha=0.1, eta=0.9, theta=0.1)
    for w, c in zip(state.params, copies):
        np.testing.assert_array_equal(w, c)
    np.testing.assert_array_equal(state.momentum[0], 0.0)
    np.testing.assert_array_equal(k, k_copy)
    with pytest.raises(AttributeError):
        state.params = params  # frozen dataclass


def test_memory_step_divergence_raises_instead_of_nan():
    state = _state(np.full((2, 2), 1e300))  # k W = 2e310 overflows to inf
    with pytest.raises(mt.MemoryDivergenceError, match="token 0"):
        mt.memory_step(state, np.full(2, 1e10), np.ones(2), alpha=0.0, eta=0.0, theta=1.0)


def test_max_grad_norm_clips_the_surprise():
    state = _state(np.zeros((2, 2)))
    k, v = np.array([1.0, 0.0]), np.array([0.0, 10.0])  # ∇ = [[0, -20], [0, 0]], norm 20
    new = mt.memory_step(state, k, v, alpha=0.0, eta=0.0, theta=0.5, max_grad_norm=2.0)
    np.testing.assert_allclose(new.params[0], [[0.0, 1.0], [0.0, 0.0]], rtol=1e-14)


def test_state_momentum_must_match_params(rng):
    params = mt.init_memory(rng, 3, 3, depth=2)
    other = mt.init_memory(rng, 3, 3, depth=1)
    with pytest.raises(ValueError, match="momentum shapes"):
        mt.MemoryState(params, other)
