"""Forgetting towards an anchor (memory/update.py): Eq. 13 for M - M̄, and why it is there.

Eq. 13 decays the memory towards 0, an absorbing state of a bias-free deep memory: after a
long stream the weights reach 0 and no surprise can move them again. A state built with
``MemoryState.initial(params, anchored=True)`` forgets towards its initial weights instead.
"""

import numpy as np
import pytest
from autograd.test_util import check_grads
from naive_memory import naive_chunked, naive_token_loop, unit_rows

import minititans as mt

D = 6


def _stream(rng, T, d=D):
    K, V, Q = (unit_rows(rng, T, d) for _ in range(3))
    return K, V, Q


def _gates(rng, T):
    return (rng.uniform(0.0, 0.2, T), rng.uniform(0.5, 0.95, T), rng.uniform(0.01, 0.1, T))


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("read", ["after", "before"])
def test_eq13_anchored_token_loop_matches_naive(depth, read):
    rng = np.random.default_rng(depth)
    params = mt.init_memory(rng, D, D, depth=depth, expansion=2)
    K, V, Q = _stream(rng, 23)
    a, e, th = _gates(rng, 23)
    out, state = mt.memory_scan(mt.MemoryState.initial(params, anchored=True), K, V, Q,
                                alpha=a, eta=e, theta=th, read=read)
    ys, M, S = naive_token_loop(list(params), K, V, Q, a, e, th, read=read,
                                anchor=list(params))
    np.testing.assert_allclose(out, ys, rtol=1e-11, atol=1e-13)
    for w, m in zip(state.params, M):
        np.testing.assert_allclose(w, m, rtol=1e-11, atol=1e-13)
    for s, m in zip(state.momentum, S):
        np.testing.assert_allclose(s, m, rtol=1e-11, atol=1e-13)
    # the anchor rides along in the state, unchanged
    assert all(x is y for x, y in zip(state.anchor, params))


@pytest.mark.parametrize("b", [2, 4, 16])
@pytest.mark.parametrize("depth", [1, 2])
def test_eqs16_18_anchored_chunked_matches_naive_chunked(b, depth):
    rng = np.random.default_rng(10 * b + depth)
    params = mt.init_memory(rng, D, D, depth=depth, expansion=2)
    T = 2 * b + 3  # a partial last chunk
    K, V, Q = _stream(rng, T)
    a, e, th = _gates(rng, T)
    out, state = mt.memory_scan(mt.MemoryState.initial(params, anchored=True), K, V, Q,
                                alpha=a, eta=e, theta=th, chunk_size=b)
    ys, M, _ = naive_chunked(list(params), K, V, Q, a, e, th, b, anchor=list(params))
    np.testing.assert_allclose(out, ys, rtol=1e-10, atol=1e-12)
    for w, m in zip(state.params, M):
        np.testing.assert_allclose(w, m, rtol=1e-10, atol=1e-12)


def test_eq13_a_zero_anchor_is_eq13_as_printed():
    rng = np.random.default_rng(3)
    params = mt.init_memory(rng, D, D, depth=2, expansion=2)
    K, V, Q = _stream(rng, 17)
    a, e, th = _gates(rng, 17)
    zero = params.like(np.zeros_like(w) for w in params)
    plain = mt.MemoryState.initial(params)
    at_zero = mt.MemoryState(plain.params, plain.momentum, zero)
    for b in (1, 4):
        out0, s0 = mt.memory_scan(plain, K, V, Q, alpha=a, eta=e, theta=th, chunk_size=b)
        out1, s1 = mt.memory_scan(at_zero, K, V, Q, alpha=a, eta=e, theta=th, chunk_size=b)
        np.testing.assert_allclose(out1, out0, rtol=1e-13, atol=1e-15)
    # and with forgetting the anchor matters: the two forms differ
    anchored = mt.MemoryState.initial(params, anchored=True)
    out2, _ = mt.memory_scan(anchored, K, V, Q, alpha=a, eta=e, theta=th)
    assert np.max(np.abs(out2 - out0)) > 1e-3


def test_eq13_anchored_memory_step_equals_one_token_of_the_scan():
    rng = np.random.default_rng(4)
    params = mt.init_memory(rng, D, D, depth=2, expansion=2)
    state = mt.MemoryState.initial(params, anchored=True)
    k, v = unit_rows(rng, 1, D)[0], unit_rows(rng, 1, D)[0]
    stepped = mt.memory_step(state, k, v, alpha=0.3, eta=0.5, theta=0.05)
    _, scanned = mt.memory_scan(state, k[None], v[None], k[None], alpha=0.3, eta=0.5,
                                theta=0.05)
    for x, y in zip(stepped.params, scanned.params):
        np.testing.assert_allclose(x, y, rtol=1e-14)
    assert stepped.anchor is state.anchor


@pytest.mark.parametrize("b", [1, 4])
def test_anchored_streamed_equals_whole(b):
    rng = np.random.default_rng(5)
    params = mt.init_memory(rng, D, D, depth=2, expansion=2)
    K, V, Q = _stream(rng, 24)
    a, e, th = _gates(rng, 24)
    s0 = mt.MemoryState.initial(params, anchored=True)
    whole, s_whole = mt.memory_scan(s0, K, V, Q, alpha=a, eta=e, theta=th, chunk_size=b)
    first, s1 = mt.memory_scan(s0, K[:12], V[:12], Q[:12], alpha=a[:12], eta=e[:12],
                               theta=th[:12], chunk_size=b)
    second, s2 = mt.memory_scan(s1, K[12:], V[12:], Q[12:], alpha=a[12:], eta=e[12:],
                                theta=th[12:], chunk_size=b)
    np.testing.assert_allclose(np.concatenate([first, second]), whole, rtol=1e-12, atol=1e-14)
    for x, y in zip(s2.params, s_whole.params):
        np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-14)


def test_anchored_scan_gradient_reaches_the_initial_weights_through_the_anchor():
    # M_0 enters twice (start and anchor), as in a model whose M_0 is trained: check_grads
    # compares autograd's gradient with finite differences
    rng = np.random.default_rng(6)
    params = mt.init_memory(rng, 4, 4, depth=2, expansion=2)
    K, V, Q = _stream(rng, 9, 4)

    def loss(p):
        out, _ = mt.memory_scan(mt.MemoryState.initial(p, anchored=True), K, V, Q,
                                alpha=0.2, eta=0.8, theta=0.05, chunk_size=3)
        return np.sum(out**2)

    check_grads(loss, modes=["rev"], order=1)(params)


def test_anchored_state_is_refused_where_it_does_not_fit():
    rng = np.random.default_rng(7)
    p2 = mt.init_memory(rng, D, D, depth=2, expansion=2)
    p1 = mt.init_memory(rng, D, D, depth=1)
    plain = mt.MemoryState.initial(p2)
    with pytest.raises(ValueError, match="anchor shapes"):
        mt.MemoryState(plain.params, plain.momentum, p2.like([p2[0], p2[0]]))
    with pytest.raises(ValueError, match="anchor shapes"):
        mt.MemoryState(plain.params, plain.momentum, p1)
    with pytest.raises(TypeError, match="anchored must be True or False"):
        mt.MemoryState.initial(p2, anchored="yes")
