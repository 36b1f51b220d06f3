"""The numba attention twins against the reference: Eq. 2 (windowed, prefix), Eqs. 4–5, App. C."""

import sys

import numpy as np
import pytest

import minititans.linear_attention  # noqa: F401  (the module; the package exports the function)
from minititans.attention import causal_attention
from minititans.kernels import attention as fast

ref_lin = sys.modules["minititans.linear_attention"]
TOL = {np.float64: 1e-10, np.float32: 1e-4}


def _close(got, want, dtype):
    assert got.dtype == want.dtype and got.shape == want.shape
    tol = TOL[dtype]
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("T,window,prefix", [
    (1, None, 0), (5, None, 0), (70, None, 0), (70, 8, 0), (130, 20, 5), (130, 1, 3),
    (200, None, 7), (10, 3, 10), (150, 64, 0), (150, 300, 1), (129, 65, 64),
])
def test_eq2_numba_window_attention_matches_reference(rng, dtype, T, window, prefix):
    # blocks of 64 queries: lengths and windows on both sides of the block size
    q, k, v = (rng.standard_normal((2, 3, T, 8)).astype(dtype) for _ in range(3))
    want = causal_attention(q, k, v, window=window, prefix=prefix)
    _close(fast.causal_attention(q, k, v, window=window, prefix=prefix), want, dtype)


def test_eq2_numba_window_attention_large_logits_and_value_width(rng):
    # logits of 1e4 stay finite (row max subtracted); d_v differs from d; 2-D input
    q = rng.standard_normal((40, 4)) * 100
    k = rng.standard_normal((40, 4)) * 100
    v = rng.standard_normal((40, 3))
    got = fast.causal_attention(q, k, v, window=6, prefix=2)
    assert np.all(np.isfinite(got))
    _close(got, causal_attention(q, k, v, window=6, prefix=2), np.float64)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(window=0), ValueError, "window must be >= 1"),
    (dict(prefix=9), ValueError, "prefix must be <="),
    (dict(prefix=-1), ValueError, "prefix must be >= 0"),
    (dict(window=2.5), TypeError, "window must be an int"),
])
def test_eq2_bad_arguments_same_errors_as_reference(rng, kwargs, error, match):
    q = rng.standard_normal((8, 4))
    for f in (causal_attention, fast.causal_attention):
        with pytest.raises(error, match=match):
            f(q, q, q, **kwargs)
    for f in (causal_attention, fast.causal_attention):
        with pytest.raises(ValueError, match="k must have the shape of q"):
            f(q, q[:, :3], q)
        with pytest.raises(TypeError, match="float32 or float64"):
            f(q.astype(np.int32), q, q)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("feature_map,normalize", [("identity", False), ("elu1", False),
                                                   ("elu1", True)])
def test_eq4_eq5_numba_linear_attention_matches_both_reference_forms(rng, dtype, feature_map,
                                                                     normalize):
    q, k, v = (rng.standard_normal((2, 30, 5)).astype(dtype) for _ in range(3))
    want, (M, z) = ref_lin.linear_attention_recurrent(q, k, v, feature_map, normalize)
    got, (M2, z2) = fast.linear_attention_recurrent(q, k, v, feature_map, normalize)
    _close(got, want, dtype)
    _close(M2, M, dtype)
    _close(z2, z, dtype)
    _close(got, ref_lin.linear_attention(q, k, v, feature_map, normalize), dtype)
    # streaming: two calls passing (M, z) on equal one call
    y1, state = fast.linear_attention_recurrent(q[:, :13], k[:, :13], v[:, :13], feature_map,
                                                normalize)
    y2, _ = fast.linear_attention_recurrent(q[:, 13:], k[:, 13:], v[:, 13:], feature_map,
                                            normalize, state=state)
    np.testing.assert_allclose(np.concatenate([y1, y2], axis=1), got, rtol=1e-12 * 1e6 ** (
        dtype == np.float32), atol=0)


def test_eq4_eq5_numba_linear_attention_state_is_not_mutated_and_checked(rng):
    q = rng.standard_normal((6, 3))
    _, (M, z) = fast.linear_attention_recurrent(q, q, q)
    M0, z0 = M.copy(), z.copy()
    fast.linear_attention_recurrent(q, q, q, state=(M, z))
    np.testing.assert_array_equal(M, M0)
    np.testing.assert_array_equal(z, z0)
    for f in (ref_lin.linear_attention_recurrent, fast.linear_attention_recurrent):
        with pytest.raises(ValueError, match="state must be"):
            f(q, q, q, state=(M[:2], z))
        with pytest.raises(ValueError, match="feature_map must be one of"):
            f(q, q, q, feature_map="relu")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("gated", [False, True])
def test_appendix_c_numba_delta_rule_matches_reference(rng, dtype, gated):
    q, k, v = (rng.standard_normal((50, 6)).astype(dtype) / 2 for _ in range(3))
    beta = rng.uniform(0, 0.5, 50)
    alpha = rng.uniform(0, 0.3, 50)
    W0 = rng.standard_normal((6, 6)).astype(dtype)
    ref_f = ref_lin.gated_delta_rule if gated else ref_lin.delta_rule
    fast_f = fast.gated_delta_rule if gated else fast.delta_rule
    y, W = ref_f(q, k, v, beta, alpha, state=W0, return_state=True)
    y2, W2 = fast_f(q, k, v, beta, alpha, state=W0, return_state=True)
    _close(y2, y, dtype)
    _close(W2, W, dtype)
    if not gated:  # alpha = None means no forgetting, from W_0 = 0
        _close(fast.delta_rule(q, k, v, 0.3), ref_lin.delta_rule(q, k, v, 0.3), dtype)


def test_appendix_c_delta_rule_bad_arguments_same_errors(rng):
    q = rng.standard_normal((5, 3))
    for f in (ref_lin.delta_rule, fast.delta_rule):
        with pytest.raises(ValueError, match="beta must be >= 0"):
            f(q, q, q, -0.1)
        with pytest.raises(ValueError, match="alpha must be <= 1"):
            f(q, q, q, 0.1, 1.5)
        with pytest.raises(ValueError, match="state must have shape"):
            f(q, q, q, 0.1, state=np.zeros((2, 3)))
