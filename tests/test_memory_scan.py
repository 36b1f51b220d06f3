"""memory_scan: the token loop (Eqs. 13–14) and the chunked form (Eqs. 16–18), streaming."""

import numpy as np
import pytest
from autograd import grad
from autograd.test_util import check_grads
from naive_memory import linear_grad, naive_chunked, naive_token_loop, unit_rows

import minititans as mt
from minititans.memory.scan import _chunked


def _sequence(rng, T, d, d_out=None):
    d_out = d if d_out is None else d_out
    K = unit_rows(rng, T, d)
    V = rng.standard_normal((T, d_out)) / np.sqrt(d_out)
    Q = unit_rows(rng, T, d)
    alpha = rng.uniform(0.0, 0.1, T)
    eta = rng.uniform(0.5, 0.95, T)
    theta = rng.uniform(0.0, 0.1, T)
    return K, V, Q, alpha, eta, theta


CONFIGS = [  # (depth, activation, residual_norm)
    (1, "gelu", False), (2, "gelu", False), (2, "silu", False), (2, "gelu", True),
    (3, "silu", False),
]


@pytest.mark.parametrize("read", ["after", "before"])
@pytest.mark.parametrize("depth,activation,residual_norm", CONFIGS)
def test_eq13_eq14_token_loop_matches_naive_loop(rng, depth, activation, residual_norm, read):
    K, V, Q, a, e, th = _sequence(rng, 11, 4)
    params = mt.init_memory(rng, 4, 4, depth=depth, expansion=2, activation=activation,
                            residual_norm=residual_norm)
    out, state = mt.memory_scan(mt.MemoryState.initial(params), K, V, Q, alpha=a, eta=e,
                                theta=th, read=read)
    y, M, S = naive_token_loop(list(params), K, V, Q, a, e, th, activation=activation,
                               residual_norm=residual_norm, read=read)
    np.testing.assert_allclose(out, y, rtol=1e-10, atol=1e-12)
    for got, want in zip(list(state.params) + list(state.momentum), M + S):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_eq13_eq14_linear_token_loop_closed_form_gradient(rng):
    # the same loop written with the closed-form gradient 2kᵀ(kW - v), no autograd at all
    K, V, Q, a, e, th = _sequence(rng, 9, 3, 2)
    params = mt.init_memory(rng, 3, 2, depth=1)
    W, S, ys = params[0].copy(), np.zeros((3, 2)), []
    for t in range(9):
        S = e[t] * S - th[t] * linear_grad(W, K[t], V[t])
        W = (1 - a[t]) * W + S
        ys.append(Q[t] @ W)
    out, state = mt.memory_scan(mt.MemoryState.initial(params), K, V, Q, alpha=a, eta=e,
                                theta=th)
    np.testing.assert_allclose(out, np.array(ys), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(state.params[0], W, rtol=1e-12)


def test_read_before_is_the_previous_memory(rng):
    K, V, Q, a, e, th = _sequence(rng, 6, 3)
    state = mt.MemoryState.initial(mt.init_memory(rng, 3, 3, depth=2))
    after, _ = mt.memory_scan(state, K, V, Q, alpha=a, eta=e, theta=th, read="after")
    before, _ = mt.memory_scan(state, K, V, Q, alpha=a, eta=e, theta=th, read="before")
    # y_t(before) = M_{t-1}(q_t): token 0 reads M_0; token t reads what token t-1 wrote
    np.testing.assert_allclose(before[0], mt.memory_forward(state.params, Q[0]), rtol=1e-14)
    _, s1 = mt.memory_scan(state, K[:3], V[:3], Q[:3], alpha=a[:3], eta=e[:3], theta=th[:3])
    np.testing.assert_allclose(before[3], mt.memory_forward(s1.params, Q[3]), rtol=1e-12)
    np.testing.assert_allclose(after[2], mt.memory_forward(s1.params, Q[2]), rtol=1e-12)


@pytest.mark.parametrize("read", ["after", "before"])
@pytest.mark.parametrize("depth,activation,residual_norm", CONFIGS)
def test_eq16_18_chunk_size_one_is_the_token_loop(rng, depth, activation, residual_norm, read):
    K, V, Q, a, e, th = _sequence(rng, 10, 4)
    params = mt.init_memory(rng, 4, 4, depth=depth, expansion=2, activation=activation,
                            residual_norm=residual_norm)
    state = mt.MemoryState.initial(params)
    loop, s_loop = mt.memory_scan(state, K, V, Q, alpha=a, eta=e, theta=th, read=read)
    opts = dict(loss="l2", p=3.0, delta=1.0, max_grad_norm=None, on_nonfinite="raise", read=read)
    chunk, s_chunk = _chunked(state, K, V, Q, a, e, th, 1, **opts)  # the chunked code, b = 1
    np.testing.assert_allclose(chunk, loop, rtol=1e-12, atol=1e-14)
    for x, y in zip(s_chunk.params, s_loop.params):
        np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("b", [2, 4, 16])
@pytest.mark.parametrize("read", ["after", "before"])
@pytest.mark.parametrize("depth,activation,residual_norm", CONFIGS[:4])
def test_eq16_18_chunked_matches_naive_chunked_loop(rng, b, read, depth, activation,
                                                     residual_norm):
    T = 19  # a partial last chunk for every b
    K, V, Q, a, e, th = _sequence(rng, T, 4)
    params = mt.init_memory(rng, 4, 4, depth=depth, expansion=2, activation=activation,
                            residual_norm=residual_norm)
    out, state = mt.memory_scan(mt.MemoryState.initial(params), K, V, Q, alpha=a, eta=e,
                                theta=th, chunk_size=b, read=read)
    y, M, S = naive_chunked(list(params), K, V, Q, a, e, th, b, activation=activation,
                            residual_norm=residual_norm, read=read)
    np.testing.assert_allclose(out, y, rtol=1e-10, atol=1e-12)
    for got, want in zip(list(state.params) + list(state.momentum), M + S):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_eq16_no_momentum_closed_form_within_one_chunk(rng):
    # η = 0: M_t = β_t M_0 - Σ_{i≤t} θ_i (β_t/β_i) ∇ℓ(M_0; x_i), β_i = Π_{j≤i} (1 - α_j)
    b = 6
    K, V, Q, a, _, th = _sequence(rng, b, 3)
    W0 = mt.init_memory(rng, 3, 3, depth=1)[0]
    beta = np.cumprod(1 - a)
    grads = [linear_grad(W0, K[i], V[i]) for i in range(b)]
    M_t = [beta[t] * W0 - sum(th[i] * beta[t] / beta[i] * grads[i] for i in range(t + 1))
           for t in range(b)]
    out, state = mt.memory_scan(mt.MemoryState.initial(mt.MemoryParams([W0])), K, V, Q,
                                alpha=a, eta=0.0, theta=th, chunk_size=b)
    np.testing.assert_allclose(state.params[0], M_t[-1], rtol=1e-12)
    np.testing.assert_allclose(out, np.array([Q[t] @ M_t[t] for t in range(b)]), rtol=1e-12)


def test_eq17_linear_chunk_update_is_one_matrix_product(rng):
    # Erratum-corrected Eq. 17: Σ_i θ_i (β_b/β_i) ∇ℓ(W_0; x_i) = 2 Kᵀ Θ B (K W_0 - V)
    b = 5
    K, V, Q, a, _, th = _sequence(rng, b, 4, 3)
    W0 = mt.init_memory(rng, 4, 3, depth=1)[0]
    beta = np.cumprod(1 - a)
    Theta_B = np.diag(th * beta[-1] / beta)
    update = 2 * K.T @ Theta_B @ (K @ W0 - V)
    _, state = mt.memory_scan(mt.MemoryState.initial(mt.MemoryParams([W0])), K, V, Q,
                              alpha=a, eta=0.0, theta=th, chunk_size=b)
    np.testing.assert_allclose(state.params[0], beta[-1] * W0 - update, rtol=1e-12)


def test_eq18_momentum_closed_form_within_one_chunk(rng):
    # S_t = (Π_{j≤t} η_j) S_0 - Σ_i θ_i (Π_{i<j≤t} η_j) u_i ;  M_t = β_t M_0 + Σ_i (β_t/β_i) S_i
    b = 6
    K, V, Q, a, e, th = _sequence(rng, b, 3)
    W0 = mt.init_memory(rng, 3, 3, depth=1)[0]
    S0 = rng.standard_normal((3, 3)) * 0.1
    u = [linear_grad(W0, K[i], V[i]) for i in range(b)]
    S = [np.prod(e[:t + 1]) * S0 - sum(th[i] * np.prod(e[i + 1:t + 1]) * u[i]
                                       for i in range(t + 1)) for t in range(b)]
    beta = np.cumprod(1 - a)
    M = beta[-1] * W0 + sum(beta[-1] / beta[i] * S[i] for i in range(b))
    state = mt.MemoryState(mt.MemoryParams([W0]), mt.MemoryParams([S0]))
    _, final = mt.memory_scan(state, K, V, Q, alpha=a, eta=e, theta=th, chunk_size=b)
    np.testing.assert_allclose(final.momentum[0], S[-1], rtol=1e-12)
    np.testing.assert_allclose(final.params[0], M, rtol=1e-12)


@pytest.mark.parametrize("b,cut", [(1, 7), (1, 1), (4, 8), (3, 9)])
def test_streaming_two_calls_equal_one_call(rng, b, cut):
    K, V, Q, a, e, th = _sequence(rng, 17, 4)
    state = mt.MemoryState.initial(mt.init_memory(rng, 4, 4, depth=2, expansion=2))
    whole, s_whole = mt.memory_scan(state, K, V, Q, alpha=a, eta=e, theta=th, chunk_size=b)
    y1, s1 = mt.memory_scan(state, K[:cut], V[:cut], Q[:cut], alpha=a[:cut], eta=e[:cut],
                            theta=th[:cut], chunk_size=b)
    y2, s2 = mt.memory_scan(s1, K[cut:], V[cut:], Q[cut:], alpha=a[cut:], eta=e[cut:],
                            theta=th[cut:], chunk_size=b)
    np.testing.assert_allclose(np.concatenate([y1, y2]), whole, rtol=1e-12, atol=1e-14)
    for x, y in zip(list(s2.params) + list(s2.momentum),
                    list(s_whole.params) + list(s_whole.momentum)):
        np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-14)


def test_empty_sequence_returns_empty_output_and_the_same_state(rng):
    state = mt.MemoryState.initial(mt.init_memory(rng, 3, 2, depth=2))
    empty = np.zeros((0, 3))
    out, new = mt.memory_scan(state, empty, np.zeros((0, 2)), empty, alpha=0.1, eta=0.9,
                              theta=0.1)
    assert out.shape == (0, 2)
    assert new is state


@pytest.mark.parametrize("b", [1, 4])
def test_scan_divergence_names_the_first_bad_token(rng, b):
    K = np.ones((10, 2))
    V = np.zeros((10, 2))
    V[6] = 1e155  # the l2 gradient at token 6 is ~1e155; θ = 1e160 overflows at token 6
    state = mt.MemoryState.initial(mt.MemoryParams([np.zeros((2, 2))]))
    with pytest.raises(mt.MemoryDivergenceError, match="token 6") as info:
        mt.memory_scan(state, K, V, K, alpha=0.0, eta=0.0, theta=1e160, chunk_size=b)
    assert info.value.token == 6


def test_on_nonfinite_warn_warns_and_continues(rng):
    K = np.ones((4, 2))
    V = np.zeros((4, 2))
    V[2] = 1e155
    state = mt.MemoryState.initial(mt.MemoryParams([np.zeros((2, 2))]))
    with pytest.warns(RuntimeWarning, match="token 2"):
        out, _ = mt.memory_scan(state, K, V, K, alpha=0.0, eta=0.0, theta=1e160,
                                on_nonfinite="warn")
    assert out.shape == (4, 2)


@pytest.mark.parametrize("b", [1, 3])
def test_max_grad_norm_bounds_every_token_step(rng, b):
    K, V, Q, _, _, _ = _sequence(rng, 7, 3)
    V = 100 * V  # large surprises
    state = mt.MemoryState.initial(mt.MemoryParams([np.zeros((3, 3))]))
    out, final = mt.memory_scan(state, K, V, Q, alpha=0.0, eta=0.0, theta=1.0, chunk_size=b,
                                max_grad_norm=0.5)
    # each token moves W by θ·(clipped surprise): total norm at most 7 · 0.5
    assert np.linalg.norm(final.params[0]) <= 3.5 + 1e-12
    _, s1 = mt.memory_scan(state, K[:1], V[:1], Q[:1], alpha=0.0, eta=0.0, theta=1.0,
                           max_grad_norm=0.5)
    np.testing.assert_allclose(np.linalg.norm(s1.params[0]), 0.5, rtol=1e-12)


@pytest.mark.parametrize("b", [1, 3])
def test_outer_gradients_through_the_scan_pass_finite_differences(rng, b):
    K, V, Q, a, e, th = _sequence(rng, 5, 3)
    params = mt.init_memory(rng, 3, 3, depth=2, expansion=2)

    def f(K, V, Q, a, e, th, params):
        out, s = mt.memory_scan(mt.MemoryState.initial(params), K, V, Q, alpha=a, eta=e,
                                theta=th, chunk_size=b)
        return np.sum(out**2) + np.sum(s.params[0] ** 2)

    for argnum in range(7):
        check_grads(lambda x, i=argnum: f(*[x if j == i else arg for j, arg in
                                            enumerate((K, V, Q, a, e, th, params))]),
                    modes=["rev"], order=1)((K, V, Q, a, e, th, params)[argnum])


def test_outer_gradient_is_the_same_for_token_loop_and_chunk_one(rng):
    K, V, Q, a, e, th = _sequence(rng, 6, 3)
    params = mt.init_memory(rng, 3, 3, depth=2, expansion=2)
    state = mt.MemoryState.initial(params)
    opts = dict(loss="l2", p=3.0, delta=1.0, max_grad_norm=None, on_nonfinite="raise",
                read="after")
    g_loop = grad(lambda k: np.sum(mt.memory_scan(state, k, V, Q, alpha=a, eta=e,
                                                  theta=th)[0] ** 2))(K)
    g_chunk = grad(lambda k: np.sum(_chunked(state, k, V, Q, a, e, th, 1, **opts)[0] ** 2))(K)
    np.testing.assert_allclose(g_chunk, g_loop, rtol=1e-10, atol=1e-13)


def test_float32_scan_stays_float32_and_close_to_float64(rng):
    K, V, Q, a, e, th = _sequence(rng, 8, 4)
    p64 = mt.init_memory(rng, 4, 4, depth=2, expansion=2)
    p32 = mt.MemoryParams([w.astype(np.float32) for w in p64])
    f32 = [x.astype(np.float32) for x in (K, V, Q)]
    out32, s32 = mt.memory_scan(mt.MemoryState.initial(p32), *f32, alpha=a.astype(np.float32),
                                eta=e.astype(np.float32), theta=th.astype(np.float32))
    out64, _ = mt.memory_scan(mt.MemoryState.initial(p64), K, V, Q, alpha=a, eta=e, theta=th)
    assert out32.dtype == np.float32 and s32.params[0].dtype == np.float32
    np.testing.assert_allclose(out32, out64, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 4])
@pytest.mark.parametrize("read", ["after", "before"])
def test_eq14_surprise_clip_below_and_above_the_cap_matches_a_naive_clip(chunk, read):
    from naive_memory import naive_clipped_chunked

    rng = np.random.default_rng(11)
    K, V, Q, a, e, th = _sequence(rng, 12, 4)
    V = 3.0 * V  # large errors: some surprises well above the cap, some below
    params = mt.init_memory(rng, 4, 4, depth=2, expansion=2)
    state = mt.MemoryState.initial(params)
    _, _, _, free = naive_clipped_chunked(list(params), K, V, Q, a, e, th, chunk, np.inf,
                                          read=read)
    cap = float(np.median(free))
    y, M, S, norms = naive_clipped_chunked(list(params), K, V, Q, a, e, th, chunk, cap,
                                           read=read)
    assert (norms > cap).sum() >= 3 and (norms < cap).sum() >= 3  # clipped and not clipped
    out, st = mt.memory_scan(state, K, V, Q, alpha=a, eta=e, theta=th, chunk_size=chunk,
                             read=read, max_grad_norm=cap, backend="reference")
    np.testing.assert_allclose(out, y, rtol=1e-10, atol=1e-12)
    for got, want in zip(list(st.params) + list(st.momentum), M + S):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    # a cap above every surprise changes nothing: the same as no clipping at all
    high = 2.0 * float(free.max())
    out_high, _ = mt.memory_scan(state, K, V, Q, alpha=a, eta=e, theta=th, chunk_size=chunk,
                                 read=read, max_grad_norm=high, backend="reference")
    out_none, _ = mt.memory_scan(state, K, V, Q, alpha=a, eta=e, theta=th, chunk_size=chunk,
                                 read=read, backend="reference")
    np.testing.assert_allclose(out_high, out_none, rtol=1e-13, atol=1e-15)
