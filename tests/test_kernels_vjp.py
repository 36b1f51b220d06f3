"""The VJP of the numba memory scan (Titans Eqs. 13–18): gradients for the outer loop.

The oracle is autograd through the reference scan (``backend="reference"``); the numba
primitive must give the same gradients for every input: keys, values, queries, the gates
and the initial memory (weights and momentum), through the outputs and the final state.
"""

import autograd.numpy as anp
import numpy as np
import pytest
from autograd import grad
from autograd.test_util import check_grads
from naive_memory import unit_rows

import minititans as mt
from minititans.memory.scan import numba_memory_scan
from minititans.memory.update import MemoryDivergenceError

CONFIGS = [  # (depth, activation, residual_norm)
    (1, "gelu", False), (2, "gelu", False), (2, "silu", False), (2, "gelu", True),
    (3, "silu", False),
]
ARGS = ("keys", "values", "queries", "alpha", "eta", "theta", "params", "momentum")


def _problem(rng, T, d, depth, activation, residual_norm, dtype=np.float64):
    params = mt.init_memory(rng, d, d, depth=depth, expansion=2, activation=activation,
                            residual_norm=residual_norm, dtype=dtype)
    S0 = params.like([0.1 * rng.standard_normal(w.shape).astype(dtype) for w in params])
    K, Q = unit_rows(rng, T, d).astype(dtype), unit_rows(rng, T, d).astype(dtype)
    V = rng.standard_normal((T, d)).astype(dtype)
    gates = [rng.uniform(0.0, 0.2, T), rng.uniform(0.5, 0.95, T), rng.uniform(0.0, 0.3, T)]
    return [K, V, Q, *(g.astype(dtype) for g in gates), params, S0]


def _objective(rng, problem, scan):
    """A random scalar function of (out, final weights, final momentum) through ``scan``."""
    K, params = problem[0], problem[6]
    c_out = rng.standard_normal(K.shape)
    c_M = [rng.standard_normal(w.shape) for w in params]
    c_S = [rng.standard_normal(w.shape) for w in params]

    def f(K, V, Q, alpha, eta, theta, W0, S0):
        out, state = scan(mt.MemoryState(W0, S0), K, V, Q, alpha, eta, theta)
        total = anp.sum(c_out * anp.tanh(out))
        for w, c in zip(state.params, c_M):
            total = total + anp.sum(c * w)
        for s, c in zip(state.momentum, c_S):
            total = total + anp.sum(c * s * s)
        return total

    return f


def _reference(**options):
    return lambda state, K, V, Q, a, e, th: mt.memory_scan(
        state, K, V, Q, alpha=a, eta=e, theta=th, backend="reference", **options)


def _numba(**options):
    options = {"chunk_size": 1, "read": "after", "loss": "l2", "p": 3.0, "delta": 1.0,
               "max_grad_norm": None, "on_nonfinite": "raise", **options}
    return lambda state, K, V, Q, a, e, th: numba_memory_scan(state, K, V, Q, a, e, th, **options)


def _all_grads(f, problem):
    return grad(f, list(range(len(problem))))(*problem)


def _assert_grads_close(got, want, rtol):
    for name, g, w in zip(ARGS, got, want):
        for gi, wi in zip(g if isinstance(g, tuple) else [g], w if isinstance(w, tuple) else [w]):
            assert gi.shape == wi.shape and gi.dtype == np.asarray(wi).dtype, name
            np.testing.assert_allclose(gi, wi, rtol=rtol, atol=rtol * np.abs(wi).max(),
                                       err_msg=name)


@pytest.mark.parametrize("loss", ["l2", "dot"])
@pytest.mark.parametrize("read,chunk_size", [("after", 1), ("before", 1), ("after", 4),
                                             ("before", 4)])
@pytest.mark.parametrize("depth,activation,residual_norm", CONFIGS)
def test_eq13_eq14_vjp_matches_autograd_through_reference(rng, depth, activation,
                                                         residual_norm, read, chunk_size, loss):
    # T = 10 with chunks of 4: the last chunk is partial (Eqs. 16–18)
    problem = _problem(rng, 10, 3, depth, activation, residual_norm)
    options = dict(chunk_size=chunk_size, read=read, loss=loss)
    f_ref = _objective(np.random.default_rng(7), problem, _reference(**options))
    f_nb = _objective(np.random.default_rng(7), problem, _numba(**options))
    np.testing.assert_allclose(f_nb(*problem), f_ref(*problem), rtol=1e-12)
    _assert_grads_close(_all_grads(f_nb, problem), _all_grads(f_ref, problem), rtol=1e-8)


@pytest.mark.parametrize("options", [
    dict(loss="huber", delta=0.3), dict(loss="lp", p=3.0, chunk_size=4),
    dict(max_grad_norm=0.2), dict(max_grad_norm=0.2, chunk_size=3, read="before"),
], ids=["huber", "lp", "clip", "clip-chunked"])
def test_eq12_other_losses_and_clipped_surprise_vjp_matches_reference(rng, options):
    problem = _problem(rng, 9, 3, 2, "gelu", True)
    f_ref = _objective(np.random.default_rng(3), problem, _reference(**options))
    f_nb = _objective(np.random.default_rng(3), problem, _numba(**options))
    _assert_grads_close(_all_grads(f_nb, problem), _all_grads(f_ref, problem), rtol=1e-8)


@pytest.mark.parametrize("chunk_size", [1, 4])
def test_eq13_eq14_vjp_float32_close_to_float64_reference(rng, chunk_size):
    problem = _problem(rng, 10, 4, 2, "gelu", False)
    problem32 = [x.astype(np.float32) if isinstance(x, np.ndarray) else
                 x.like([w.astype(np.float32) for w in x]) for x in problem]
    f_ref = _objective(np.random.default_rng(5), problem, _reference(chunk_size=chunk_size))
    f_nb = _objective(np.random.default_rng(5), problem32, _numba(chunk_size=chunk_size))
    got = _all_grads(f_nb, problem32)
    for g in got:
        for gi in (g if isinstance(g, tuple) else [g]):
            assert gi.dtype == np.float32
    want = _all_grads(f_ref, problem)
    got64 = [tuple(x.astype(np.float64) for x in g) if isinstance(g, tuple)
             else g.astype(np.float64) for g in got]
    _assert_grads_close(got64, want, rtol=2e-3)


@pytest.mark.parametrize("chunk_size,read", [(1, "after"), (3, "before")])
def test_eq13_eq14_vjp_check_grads_numba_path(rng, chunk_size, read):
    problem = _problem(rng, 7, 3, 2, "silu", True)
    f = _objective(rng, problem, _numba(chunk_size=chunk_size, read=read))
    check_grads(lambda xs: f(*xs), modes=["rev"], order=1)(tuple(problem))


@pytest.mark.parametrize("chunk_size,cut", [(1, 5), (4, 8)])
def test_streaming_two_calls_have_the_gradients_of_one_call(rng, chunk_size, cut):
    # the final state of the first call is differentiable: gradients flow back through it
    problem = _problem(rng, 12, 3, 2, "gelu", False)
    scan = _numba(chunk_size=chunk_size)

    def two_calls(state, K, V, Q, a, e, th):
        out1, mid = scan(state, K[:cut], V[:cut], Q[:cut], a[:cut], e[:cut], th[:cut])
        out2, end = scan(mid, K[cut:], V[cut:], Q[cut:], a[cut:], e[cut:], th[cut:])
        return anp.concatenate([out1, out2]), end

    f_one = _objective(np.random.default_rng(11), problem, scan)
    f_two = _objective(np.random.default_rng(11), problem, two_calls)
    _assert_grads_close(_all_grads(f_two, problem), _all_grads(f_one, problem), rtol=1e-10)


@pytest.mark.parametrize("chunk_size,every", [(1, 1), (1, 3), (1, 11), (2, 2), (2, 6)])
def test_checkpoint_interval_does_not_change_the_gradients(rng, chunk_size, every):
    # the backward recomputes each segment from its checkpoint: any interval, same numbers
    problem = _problem(rng, 11, 3, 3, "gelu", True)
    f_ref = _objective(np.random.default_rng(2), problem, _numba(chunk_size=chunk_size))
    f = _objective(np.random.default_rng(2), problem,
                   _numba(chunk_size=chunk_size, checkpoint_every=every))
    _assert_grads_close(_all_grads(f, problem), _all_grads(f_ref, problem), rtol=1e-12)


def test_memory_scan_numba_backend_is_differentiable(rng):
    problem = _problem(rng, 8, 3, 2, "gelu", False)

    def scan(backend):
        return lambda state, K, V, Q, a, e, th: mt.memory_scan(
            state, K, V, Q, alpha=a, eta=e, theta=th, backend=backend)

    f_ref = _objective(np.random.default_rng(4), problem, scan("reference"))
    f_nb = _objective(np.random.default_rng(4), problem, scan("numba"))
    _assert_grads_close(_all_grads(f_nb, problem), _all_grads(f_ref, problem), rtol=1e-8)


@pytest.mark.parametrize("chunk_size", [1, 4])
def test_divergence_is_reported_at_the_reference_token(rng, chunk_size):
    problem = _problem(rng, 12, 3, 2, "gelu", False)
    K, V, Q, a, e, theta, W0, S0 = problem
    theta = theta.copy()
    theta[6] = 1e305  # the surprise step overflows at token 6
    state = mt.MemoryState(W0, S0)
    with pytest.raises(MemoryDivergenceError) as want:
        mt.memory_scan(state, K, V, Q, alpha=a, eta=e, theta=theta, chunk_size=chunk_size)
    f = _objective(rng, problem, _numba(chunk_size=chunk_size, checkpoint_every=chunk_size))
    with pytest.raises(MemoryDivergenceError) as got:
        grad(f, 5)(K, V, Q, a, e, theta, W0, S0)
    assert got.value.token == want.value.token
    f_warn = _objective(rng, problem, _numba(chunk_size=chunk_size, on_nonfinite="warn"))
    with pytest.warns(RuntimeWarning, match=f"token {want.value.token}"):
        grad(f_warn, 5)(K, V, Q, a, e, theta, W0, S0)


def test_vjp_is_first_order_only(rng):
    problem = _problem(rng, 4, 2, 1, "gelu", False)
    f = _objective(rng, problem, _numba())
    with pytest.raises(NotImplementedError, match="backend='reference'"):
        grad(lambda K: anp.sum(grad(f)(K, *problem[1:]) ** 2))(problem[0])
