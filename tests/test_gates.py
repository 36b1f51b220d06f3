"""Data-dependent gates α_t, η_t, θ_t: a sigmoid of a linear map (our design decision)."""

import numpy as np
import pytest
from autograd.test_util import check_grads

import minititans as mt
from minititans.memory.gates import ALPHA_INIT, ETA_INIT, THETA_INIT, THETA_MAX


def test_gates_start_at_their_init_values_for_zero_weights(rng):
    g = mt.init_gates(rng, 5, scale=0.0)
    alpha, eta, theta = mt.compute_gates(g, rng.standard_normal((7, 5)))
    np.testing.assert_allclose(alpha, ALPHA_INIT, rtol=1e-12)
    np.testing.assert_allclose(eta, ETA_INIT, rtol=1e-12)
    np.testing.assert_allclose(theta, THETA_INIT, rtol=1e-12)


def test_gates_are_sigmoids_of_linear_maps(rng):
    g = mt.init_gates(rng, 3, scale=1.0)
    x = rng.standard_normal((4, 3))
    alpha, eta, theta = mt.compute_gates(g, x, theta_max=0.5)
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    np.testing.assert_allclose(alpha, sig(x @ g["w_alpha"] + g["b_alpha"]), rtol=1e-13)
    np.testing.assert_allclose(eta, sig(x @ g["w_eta"] + g["b_eta"]), rtol=1e-13)
    np.testing.assert_allclose(theta, 0.5 * sig(x @ g["w_theta"] + g["b_theta"]), rtol=1e-13)


def test_gates_stay_in_range_for_extreme_inputs(rng):
    g = mt.init_gates(rng, 2, scale=1.0)
    x = np.array([[1e4, -1e4], [-1e4, 1e4]])
    alpha, eta, theta = mt.compute_gates(g, x)
    for gate, hi in ((alpha, 1), (eta, 1), (theta, THETA_MAX)):
        assert np.all((gate >= 0) & (gate <= hi)) and np.all(np.isfinite(gate))


def test_gates_feed_memory_scan_and_are_differentiable(rng):
    g = mt.init_gates(rng, 3, scale=0.5)
    x = rng.standard_normal((5, 3))
    state = mt.MemoryState.initial(mt.init_memory(rng, 3, 3, depth=2, expansion=2))

    def f(g):
        alpha, eta, theta = mt.compute_gates(g, x)
        out, _ = mt.memory_scan(state, x, x, x, alpha=alpha, eta=eta, theta=theta)
        return np.sum(out**2)

    check_grads(f, modes=["rev"], order=1)(g)


def test_gate_init_rejects_out_of_range_values(rng):
    with pytest.raises(ValueError, match="eta_init"):
        mt.init_gates(rng, 3, eta_init=1.0)
    with pytest.raises(ValueError, match="theta_init"):
        mt.init_gates(rng, 3, theta_init=0.5, theta_max=0.1)
