"""What the tests of gates with columns share: a step per memory layer (``theta`` ``(T, L)``,
tests/test_theta_per_layer.py) and a forgetting rate per output channel (``alpha``
``(T, C)``, tests/test_alpha_per_channel.py). Each helper asserts; the tests name the
equation and choose the problem."""

import copy

import autograd.numpy as anp
import numpy as np
import pytest
from autograd import grad
from naive_memory import naive_chunked, naive_token_loop, unit_rows

import minititans as mt
from minititans.memory.scan import numba_memory_scan, output_channels
from minititans.models import ravel
from minititans.training import cross_entropy, numba_available

needs_numba = pytest.mark.skipif(not numba_available(),
                                 reason="the numba memory scan has no gradient here")


def problem(rng, T=9, d=3, depth=2, anchored=False, *, alpha_per_channel=False,
            theta_per_layer=False):
    """A memory scan's inputs ``(state, K, V, Q, alpha, eta, theta)``: unit keys and queries,
    momentum and (``anchored``) an anchor; ``alpha`` ``(T, C)`` with a different rate for
    every output channel, or ``(T,)``; ``theta`` ``(T, L)`` with a different step for every
    layer, or ``(T,)``."""
    params = mt.init_memory(rng, d, d, depth=depth, expansion=2)
    S0 = params.like([0.1 * rng.standard_normal(w.shape) for w in params])
    anchor = params.like([0.3 * rng.standard_normal(w.shape) for w in params]) \
        if anchored else None
    K, Q, V = unit_rows(rng, T, d), unit_rows(rng, T, d), rng.standard_normal((T, d))
    alpha = (rng.uniform(0.0, 0.4, (T, output_channels(params))) if alpha_per_channel
             else rng.uniform(0.0, 0.2, T))
    eta = rng.uniform(0.5, 0.95, T)
    theta = rng.uniform(0.0, 0.15, (T, depth) if theta_per_layer else T)
    return mt.MemoryState(params, S0, anchor), K, V, Q, alpha, eta, theta


def scan_matches_plain_loops(state, K, V, Q, alpha, eta, theta, *, backend, chunk_size, read):
    """``memory_scan`` equals the plain loops of tests/naive_memory.py (the chunked loops
    start from zero momentum, so then does the scan). Returns ``(state, out)``."""
    anchor = None if state.anchor is None else list(state.anchor)
    if chunk_size == 1:
        want, M, S = naive_token_loop(list(state.params), K, V, Q, alpha, eta, theta,
                                      read=read, momentum=list(state.momentum), anchor=anchor)
    else:
        state = mt.MemoryState(state.params, state.params.like(
            [np.zeros_like(w) for w in state.params]), state.anchor)
        want, M, S = naive_chunked(list(state.params), K, V, Q, alpha, eta, theta, chunk_size,
                                   read=read, anchor=anchor)
    out, new = mt.memory_scan(state, K, V, Q, alpha=alpha, eta=eta, theta=theta,
                              chunk_size=chunk_size, read=read, backend=backend)
    np.testing.assert_allclose(out, want, rtol=1e-10, atol=1e-12)
    for got, ref in zip([*new.params, *new.momentum], [*M, *S]):
        np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-12)
    return state, out


def objective(rng, problem, scan):
    """A random scalar function of (out, final weights, final momentum) through ``scan``."""
    state, K = problem[0], problem[1]
    c_out = rng.standard_normal(K.shape)
    c_M = [rng.standard_normal(w.shape) for w in state.params]

    def f(K, V, Q, alpha, eta, theta, W0, S0):
        out, new = scan(mt.MemoryState(W0, S0, state.anchor), K, V, Q, alpha, eta, theta)
        total = anp.sum(c_out * anp.tanh(out))
        for w, s, c in zip(new.params, new.momentum, c_M):
            total = total + anp.sum(c * w) + anp.sum(c * s * s)
        return total

    return f


def vjp_matches_reference(problem, **options):
    """The numba scan's value and gradients with respect to every input (keys, values,
    queries, the three gates, the weights and the momentum) equal autograd's through the
    reference, to 1e-8."""
    state, rest = problem[0], problem[1:]
    args = [*rest, state.params, state.momentum]
    f_ref = objective(np.random.default_rng(3), problem, lambda s, K, V, Q, a, e, th:
                      mt.memory_scan(s, K, V, Q, alpha=a, eta=e, theta=th,
                                     backend="reference", **options))
    f_nb = objective(np.random.default_rng(3), problem, lambda s, K, V, Q, a, e, th:
                     numba_memory_scan(s, K, V, Q, a, e, th, **options))
    np.testing.assert_allclose(f_nb(*args), f_ref(*args), rtol=1e-12)
    got = grad(f_nb, list(range(len(args))))(*args)
    want = grad(f_ref, list(range(len(args))))(*args)
    for name, g, w in zip(("K", "V", "Q", "alpha", "eta", "theta", "W", "S"), got, want):
        for gi, wi in zip(g if isinstance(g, tuple) else [g], w if isinstance(w, tuple) else [w]):
            assert np.shape(gi) == np.shape(wi), name
            np.testing.assert_allclose(gi, wi, rtol=1e-8, atol=1e-8 * np.abs(wi).max(),
                                       err_msg=name)


def batched_is_one_by_one(rng, batched, one_by_one, x):
    """``batched(x)`` equals ``one_by_one(x)``, and so do their gradients in ``x``."""
    out = batched(x)
    np.testing.assert_allclose(out, one_by_one(x), rtol=1e-13, atol=1e-14)
    c = rng.standard_normal(out.shape)
    g_batch = grad(lambda z: anp.sum(c * batched(z)))(x)
    g_each = grad(lambda z: anp.sum(c * one_by_one(z)))(x)
    np.testing.assert_allclose(g_batch, g_each, rtol=1e-12, atol=1e-14)


def dicts_with(tree, key):
    """Every dict of a parameter tree that has ``key``."""
    if isinstance(tree, dict):
        if key in tree:
            yield tree
        for v in tree.values():
            yield from dicts_with(v, key)
    elif isinstance(tree, list):
        for v in tree:
            yield from dicts_with(v, key)


def gate_dicts(tree):
    """Every gate-parameter dict (``w_alpha`` ... ``b_theta``) of a model's parameters."""
    return dicts_with(tree, "b_theta")


def matches_the_hand_assembled_forward(m, params, gate: str, flag: str):
    """``m.apply`` equals the hand-assembled forward of tests/naive_models.py, and taking
    the first column of ``gate``'s projection for every column (the config without
    ``flag``) gives other logits: the columns matter."""
    from naive_models import naive_forward

    from minititans.models import Model

    tokens = np.random.default_rng(1).integers(0, m.config.vocab_size, 11)
    got = m.apply(params, tokens)
    np.testing.assert_allclose(got, naive_forward(params, tokens, m.config), rtol=1e-9,
                               atol=1e-10)
    one = copy.deepcopy(params)
    for g in gate_dicts(one):
        g[f"w_{gate}"], g[f"b_{gate}"] = g[f"w_{gate}"][:, 0], float(g[f"b_{gate}"][0])
    assert np.abs(Model(m.config.with_(**{flag: False})).apply(one, tokens) - got).max() > 1e-6


def streams_as_one_apply(m, params):
    """``m.stream`` in pieces (5, 1 and 7 tokens) gives the logits of one ``m.apply``."""
    tokens = np.random.default_rng(2).integers(0, m.config.vocab_size, (2, 13))
    state, outs = m.initial_state(2), []
    for lo, hi in ((0, 5), (5, 6), (6, 13)):
        y, state = m.stream(params, tokens[:, lo:hi], state)
        outs.append(y)
    np.testing.assert_allclose(np.concatenate(outs, axis=1), m.apply(params, tokens),
                               rtol=1e-10, atol=1e-12)


def numba_model_gradients_equal_reference(make):
    """The loss and its gradient of ``make(backend) -> (model, params)`` agree between the
    numba and the reference backend."""
    grads = {}
    for backend in ("reference", "numba"):
        m, params = make(backend)
        tokens = np.random.default_rng(5).integers(0, m.config.vocab_size, (2, 9))
        mask = np.ones(tokens.shape, bool)
        flat, unravel = ravel(params)

        def loss(f, m=m, unravel=unravel, tokens=tokens, mask=mask):
            return cross_entropy(m.apply(unravel(f), tokens), tokens, mask)

        grads[backend] = loss(flat), grad(loss)(flat)
    np.testing.assert_allclose(grads["numba"][0], grads["reference"][0], rtol=1e-10)
    np.testing.assert_allclose(grads["numba"][1], grads["reference"][1], rtol=1e-7,
                               atol=1e-10)


def stacked(problems):
    """Problems ``(state, K, V, Q, alpha, eta, theta)`` of one shape as one batch:
    ``(batch state, [K, V, Q, alpha, eta, theta] each with a leading batch axis)``."""
    depth = len(problems[0][0].params)
    rows = [np.stack(x) for x in zip(*[p[1:] for p in problems])]
    params = problems[0][0].params.like(
        [np.stack([p[0].params[i] for p in problems]) for i in range(depth)])
    momentum = params.like([np.stack([p[0].momentum[i] for p in problems])
                            for i in range(depth)])
    return mt.MemoryState(params, momentum), rows


def bad_columns_are_refused(scan, gate, name: str):
    """``scan(g, **options)`` refuses a negative ``gate``, one with a NaN, and the chunked
    numba kernels (which take one value per token), each with a ``ValueError`` naming it."""
    with pytest.raises(ValueError, match=f"{name} must be >= 0"):
        scan(-gate)
    bad = gate.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match=f"{name} contains NaN"):
        scan(bad)
    with pytest.raises(ValueError, match=f"{name} per .* needs chunk_size=1 on the numba "
                                         "backend"):
        scan(gate, backend="numba", chunk_size=3)
