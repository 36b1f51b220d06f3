"""A step size per memory layer: the per-layer data-dependent theta of the NeurIPS version's
Appendix B.3, ``theta`` of shape ``(T, L)`` in Eq. 14 (S_t = eta_t S_{t-1} - theta_{t,i} u_{t,i}
for layer i). Checked against plain loops, against the per-token theta it generalises, and
the numba gradients against autograd through the reference."""

import copy

import autograd.numpy as anp
import numpy as np
import pytest
from autograd import grad
from naive_memory import naive_chunked, naive_token_loop, unit_rows

import minititans as mt
from minititans.memory.scan import numba_memory_scan, numba_memory_scan_batched
from minititans.training import numba_available

needs_numba = pytest.mark.skipif(not numba_available(),
                                 reason="the numba memory scan has no gradient here")


def _problem(rng, T=9, d=3, depth=2, anchored=False):
    params = mt.init_memory(rng, d, d, depth=depth, expansion=2)
    S0 = params.like([0.1 * rng.standard_normal(w.shape) for w in params])
    anchor = params.like([0.3 * rng.standard_normal(w.shape) for w in params]) \
        if anchored else None
    K, Q, V = unit_rows(rng, T, d), unit_rows(rng, T, d), rng.standard_normal((T, d))
    alpha, eta = rng.uniform(0.0, 0.2, T), rng.uniform(0.5, 0.95, T)
    theta = rng.uniform(0.0, 0.15, (T, depth))  # a different step for every layer
    return mt.MemoryState(params, S0, anchor), K, V, Q, alpha, eta, theta


@pytest.mark.parametrize("backend,chunk_size", [("reference", 1), ("numba", 1),
                                                ("reference", 4)])
@pytest.mark.parametrize("read", ["after", "before"])
@pytest.mark.parametrize("depth,anchored", [(2, False), (3, False), (2, True)])
def test_appendix_b3_eq14_theta_per_layer_matches_plain_loops(rng, backend, chunk_size, read,
                                                             depth, anchored):
    state, K, V, Q, alpha, eta, theta = _problem(rng, depth=depth, anchored=anchored)
    anchor = None if state.anchor is None else list(state.anchor)
    if chunk_size == 1:
        want, M, S = naive_token_loop(list(state.params), K, V, Q, alpha, eta, theta,
                                      read=read, momentum=list(state.momentum), anchor=anchor)
    else:  # the chunked loops start from zero momentum
        state = mt.MemoryState(state.params, state.params.like(
            [np.zeros_like(w) for w in state.params]), state.anchor)
        want, M, S = naive_chunked(list(state.params), K, V, Q, alpha, eta, theta, chunk_size,
                                   read=read, anchor=anchor)
    out, new = mt.memory_scan(state, K, V, Q, alpha=alpha, eta=eta, theta=theta,
                              chunk_size=chunk_size, read=read, backend=backend)
    np.testing.assert_allclose(out, want, rtol=1e-10, atol=1e-12)
    for got, ref in zip([*new.params, *new.momentum], [*M, *S]):
        np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-12)
    # the layers' steps differ, so one step per token would not give this
    per_token, _ = mt.memory_scan(state, K, V, Q, alpha=alpha, eta=eta, theta=theta[:, 0],
                                  chunk_size=chunk_size, read=read, backend=backend)
    assert np.abs(per_token - out).max() > 1e-4


@pytest.mark.parametrize("backend", ["reference", "numba"])
def test_appendix_b3_equal_columns_are_one_theta_per_token(rng, backend):
    state, K, V, Q, alpha, eta, theta = _problem(rng, depth=3)
    one = theta[:, 0]
    both = [mt.memory_scan(state, K, V, Q, alpha=alpha, eta=eta, theta=th, backend=backend,
                           max_grad_norm=0.5) for th in (one, np.repeat(one[:, None], 3, 1))]
    np.testing.assert_array_equal(both[0][0], both[1][0])  # the same arithmetic, exactly
    for a, b in zip(both[0][1].params, both[1][1].params):
        np.testing.assert_array_equal(a, b)


def _objective(rng, problem, scan):
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


@needs_numba
@pytest.mark.parametrize("max_grad_norm", [None, 0.3], ids=["unclipped", "clipped"])
@pytest.mark.parametrize("read", ["after", "before"])
@pytest.mark.parametrize("depth,anchored", [(2, False), (3, True)])
def test_appendix_b3_theta_per_layer_vjp_matches_autograd_through_reference(
        rng, max_grad_norm, read, depth, anchored):
    problem = _problem(rng, depth=depth, anchored=anchored)
    state, rest = problem[0], problem[1:]
    args = [*rest, state.params, state.momentum]
    options = dict(read=read, max_grad_norm=max_grad_norm)
    if max_grad_norm is not None:  # the clip must be active on most tokens
        problem_scale = [np.linalg.norm(np.concatenate([g.ravel() for g in u]))
                         for u in [mt.surprise(state.params, K[None], V[None])
                                   for K, V in zip(rest[0], rest[1])]]
        assert np.mean(np.array(problem_scale) > max_grad_norm) > 0.5
    f_ref = _objective(np.random.default_rng(3), problem, lambda s, K, V, Q, a, e, th:
                       mt.memory_scan(s, K, V, Q, alpha=a, eta=e, theta=th,
                                      backend="reference", **options))
    f_nb = _objective(np.random.default_rng(3), problem, lambda s, K, V, Q, a, e, th:
                      numba_memory_scan(s, K, V, Q, a, e, th, **options))
    np.testing.assert_allclose(f_nb(*args), f_ref(*args), rtol=1e-12)
    got = grad(f_nb, list(range(len(args))))(*args)
    want = grad(f_ref, list(range(len(args))))(*args)
    for name, g, w in zip(("K", "V", "Q", "alpha", "eta", "theta", "W", "S"), got, want):
        for gi, wi in zip(g if isinstance(g, tuple) else [g], w if isinstance(w, tuple) else [w]):
            assert np.shape(gi) == np.shape(wi), name
            np.testing.assert_allclose(gi, wi, rtol=1e-8, atol=1e-8 * np.abs(wi).max(),
                                       err_msg=name)


@needs_numba
def test_appendix_b3_batched_scan_with_theta_per_layer_is_each_sequences_own(rng):
    B, T, d, depth = 3, 7, 3, 2
    problems = [_problem(rng, T, d, depth) for _ in range(B)]
    stack = [np.stack(x) for x in zip(*[p[1:] for p in problems])]
    params = problems[0][0].params.like(
        [np.stack([p[0].params[i] for p in problems]) for i in range(depth)])
    momentum = params.like([np.stack([p[0].momentum[i] for p in problems])
                            for i in range(depth)])
    theta = stack[5]
    assert theta.shape == (B, T, depth)

    def batched(theta):
        out, _ = numba_memory_scan_batched(mt.MemoryState(params, momentum), *stack[:5], theta)
        return out

    def one_by_one(theta):
        return anp.stack([numba_memory_scan(p[0], *p[1:6], theta[s])[0]
                          for s, p in enumerate(problems)])

    np.testing.assert_allclose(batched(theta), one_by_one(theta), rtol=1e-13, atol=1e-14)
    c = rng.standard_normal((B, T, d))
    g_batch = grad(lambda th: anp.sum(c * batched(th)))(theta)
    g_each = grad(lambda th: anp.sum(c * one_by_one(th)))(theta)
    np.testing.assert_allclose(g_batch, g_each, rtol=1e-12, atol=1e-14)


def test_theta_per_layer_bad_input_is_a_clear_error(rng):
    state, K, V, Q, alpha, eta, theta = _problem(rng, depth=2)
    scan = lambda th, **k: mt.memory_scan(state, K, V, Q, alpha=alpha, eta=eta,  # noqa: E731
                                          theta=th, **k)
    with pytest.raises(ValueError, match=r"theta must be a float, have shape \(9,\), or have "
                                         r"shape \(9, 2\)"):
        scan(np.full((9, 3), 0.1))  # three columns for a two-layer memory
    with pytest.raises(ValueError, match="theta must be >= 0"):
        scan(-theta)
    bad = theta.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="theta contains NaN"):
        scan(bad)
    with pytest.raises(ValueError, match="chunk_size=1 on the numba backend"):
        scan(theta, backend="numba", chunk_size=3)


# --- in the models: ModelConfig(theta_per_layer=True) ---------------------------------------

from naive_models import naive_forward  # noqa: E402

from minititans.models import Model, ModelConfig, ravel  # noqa: E402

TINY = dict(vocab_size=12, d_model=8, num_heads=2, ffn_expansion=2, conv_kernel=3,
            num_persistent=2, window=3, segment_len=4, memory_depth=2, memory_expansion=2,
            chunk_size=1, theta_init=0.05, theta_max=0.2, theta_per_layer=True)


def _gate_dicts(tree):
    if isinstance(tree, dict):
        if "b_theta" in tree:
            yield tree
        for v in tree.values():
            yield from _gate_dicts(v)
    elif isinstance(tree, list):
        for v in tree:
            yield from _gate_dicts(v)


def _model(model, **changes):
    """A model with theta per layer whose layers' steps start apart (-2 and +1 logits)."""
    m = Model(ModelConfig(model=model, **{**TINY, **changes}))
    params = m.init(np.random.default_rng(0))
    for g in _gate_dicts(params):
        assert np.shape(g["w_theta"]) == (8, m.config.memory_depth)
        g["b_theta"] = g["b_theta"] + np.linspace(-2.0, 1.0, m.config.memory_depth)
        g["w_theta"] = g["w_theta"] * 30  # and depend on the token
    return m, params


@pytest.mark.parametrize("chunk_size", [1, 4])
@pytest.mark.parametrize("model", ["lmm", "mac", "mag", "mal"])
def test_appendix_b3_models_with_theta_per_layer_match_the_hand_assembled_forward(
        model, chunk_size):
    m, params = _model(model, chunk_size=chunk_size, memory_depth=3)
    tokens = np.random.default_rng(1).integers(0, 12, 11)
    got = m.apply(params, tokens)
    np.testing.assert_allclose(got, naive_forward(params, tokens, m.config), rtol=1e-9,
                               atol=1e-10)
    # one step per token (the first column for every layer) gives other logits
    one = copy.deepcopy(params)
    for g in _gate_dicts(one):
        g["w_theta"], g["b_theta"] = g["w_theta"][:, 0], float(g["b_theta"][0])
    assert np.abs(Model(m.config.with_(theta_per_layer=False)).apply(one, tokens)
                  - got).max() > 1e-6


@pytest.mark.parametrize("model", ["lmm", "mac"])
def test_theta_per_layer_models_stream_in_pieces_as_one_apply(model):
    m, params = _model(model, chunk_size=3)
    tokens = np.random.default_rng(2).integers(0, 12, (2, 13))
    state, outs = m.initial_state(2), []
    for lo, hi in ((0, 5), (5, 6), (6, 13)):
        y, state = m.stream(params, tokens[:, lo:hi], state)
        outs.append(y)
    np.testing.assert_allclose(np.concatenate(outs, axis=1), m.apply(params, tokens),
                               rtol=1e-10, atol=1e-12)


@needs_numba
@pytest.mark.parametrize("model", ["lmm", "mac", "mag", "mal"])
def test_theta_per_layer_models_numba_gradients_equal_the_reference(model):
    from minititans.training import cross_entropy

    grads = {}
    tokens = np.random.default_rng(5).integers(0, 12, (2, 9))
    mask = np.ones(tokens.shape, bool)
    for backend in ("reference", "numba"):
        m, params = _model(model, backend=backend, max_grad_norm=0.5)
        flat, unravel = ravel(params)

        def loss(f, m=m, unravel=unravel):
            return cross_entropy(m.apply(unravel(f), tokens), tokens, mask)

        grads[backend] = loss(flat), grad(loss)(flat)
    np.testing.assert_allclose(grads["numba"][0], grads["reference"][0], rtol=1e-10)
    np.testing.assert_allclose(grads["numba"][1], grads["reference"][1], rtol=1e-7,
                               atol=1e-10)


def test_theta_per_layer_config_is_checked():
    with pytest.raises(ValueError, match="theta_per_layer needs a deep memory"):
        ModelConfig(memory_depth=1, theta_per_layer=True)
    with pytest.raises(ValueError, match="chunk_size=1 on the numba backend"):
        ModelConfig(theta_per_layer=True, backend="numba", chunk_size=16)
    cfg = ModelConfig(theta_per_layer=True, chunk_size=1)
    assert ModelConfig.from_json(cfg.to_json()) == cfg
