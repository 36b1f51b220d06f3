"""Eq. 18's linear recurrence S_i = η_i S_{i-1} - θ_i u_i, by the parallel associative scan."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from naive_memory import naive_sequential_recurrence

from minititans.memory.parallel_scan import (
    associative_scan,
    linear_recurrence,
    linear_recurrence_loop,
)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 8, 16, 33])
def test_eq18_associative_scan_matches_sequential_recurrence(rng, n):
    a = rng.uniform(0, 1, n)
    x = rng.standard_normal((n, 3, 2))
    h0 = rng.standard_normal((3, 2))
    expected = naive_sequential_recurrence(a, x, h0)
    np.testing.assert_allclose(linear_recurrence(a, x, h0), expected, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(linear_recurrence_loop(a, x, h0), expected, rtol=1e-13)


def test_eq18_scan_prefix_products_and_sums(rng):
    a = np.array([0.5, 2.0, 0.25])
    x = np.array([[1.0], [1.0], [1.0]])
    A, X = associative_scan(a, x)
    np.testing.assert_allclose(A, [0.5, 1.0, 0.25])
    # X_1 = 1; X_2 = 2·1 + 1 = 3; X_3 = 0.25·3 + 1 = 1.75
    np.testing.assert_allclose(X[:, 0], [1.0, 3.0, 1.75])


def test_eq16_scan_is_exact_when_a_gate_is_zero(rng):
    # α = 1 makes a = 1 - α = 0; Eq. 16's β_t/β_i would divide by zero, the scan does not
    a = np.array([0.9, 0.0, 0.9, 0.9])
    x = rng.standard_normal((4, 2))
    h = linear_recurrence(a, x, rng.standard_normal(2))
    np.testing.assert_allclose(h[1], x[1], rtol=1e-15)
    assert np.all(np.isfinite(h))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 40), seed=st.integers(0, 10_000))
def test_eq18_scan_property_random_lengths(n, seed):
    r = np.random.default_rng(seed)
    a, x, h0 = r.uniform(0, 1.2, n), r.standard_normal((n, 2)), r.standard_normal(2)
    np.testing.assert_allclose(linear_recurrence(a, x, h0), naive_sequential_recurrence(a, x, h0),
                               rtol=1e-11, atol=1e-12)
