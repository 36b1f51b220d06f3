"""The row kernels the numba scans call, against the naive memory of tests/naive_memory.py.

Each test runs the kernel the token loop and the chunked scan run — the forward of n rows
(``memory_forward_rows`` + ``output_rows``), the hand-derived surprise (Eq. 8,
``surprise_rows``), its clip, the update (Eqs. 13–14, ``apply_update``), the first-bad-token
search and the Hessian-vector product of the VJP — and compares numbers with explicit
tolerances: float64 to about 1e-12 relative.
"""

import autograd.numpy as anp
import numba
import numpy as np
import pytest
from autograd import grad
from naive_memory import gelu_exact, naive_grad, naive_mlp, silu
from scipy.special import erf

import minititans as mt
from minititans.kernels import hvp, layout, rows, scalars
from minititans.memory.loss import per_token_surprise

CONFIGS = [(1, "gelu", False), (1, "silu", True), (2, "gelu", True), (2, "silu", False),
           (3, "gelu", False), (3, "silu", True)]


def _setup(rng, n, d, depth, activation, residual_norm, loss="l2", clip=-1.0):
    params = mt.init_memory(rng, d, d, depth=depth, expansion=2, activation=activation,
                            residual_norm=residual_norm)
    W, shapes, offsets = layout.pack_weights(list(params), np.float64)
    spec = layout.make_spec(shapes, offsets, np.float64, scalars.ACTIVATION_CODES[activation],
                            residual_norm, scalars.LOSS_CODES[loss], 3.0, 0.5, clip, True)
    X, V = rng.standard_normal((n, d)), rng.standard_normal((n, d))
    z, h = int(shapes[:, 1].sum()), max(int(shapes[:-1, 1].sum()), 1)
    key = layout.KeyRows(X, V, np.zeros(n * z), np.zeros(n * h), np.zeros(n * h),
                         np.zeros((n, 2)), np.zeros((n, d)), np.zeros(n * z), np.zeros(n * h))
    rows.memory_forward_rows(W, spec, X, key.Z, key.H, key.HD1, True)
    rows.output_rows(key.Z[-n * d:].reshape(n, d), X, residual_norm, key.ln, key.y)
    rows.surprise_rows(W, spec, key)
    return params, W, spec, key


def _blocks(tape, n, widths):
    """The per-layer blocks ``(n, w)`` of a flat tape."""
    starts = np.concatenate([[0], np.cumsum(widths)]) * n
    return [tape[a:b].reshape(n, w) for a, b, w in zip(starts[:-1], starts[1:], widths)]


def _surprises(spec, key):
    """u_i = h_{i-1}ᵀ δ_i of every row, from the tapes: a list (n, fan_in, fan_out) per layer."""
    n = key.X.shape[0]
    hs = [key.X] + _blocks(key.H, n, spec.shapes[:-1, 1])
    ds = _blocks(key.D, n, spec.shapes[:, 1])
    return [np.einsum("ra,rb->rab", h, d) for h, d in zip(hs, ds)]


@pytest.mark.parametrize("n", [1, 4])  # one row (the token loop: a loop, not BLAS), a chunk
@pytest.mark.parametrize("depth,activation,residual_norm", CONFIGS)
def test_eq15_forward_rows_match_naive_memory(rng, n, depth, activation, residual_norm):
    params, _, _, key = _setup(rng, n, 5, depth, activation, residual_norm)
    want = np.stack([naive_mlp(list(params), x, activation, residual_norm) for x in key.X])
    np.testing.assert_allclose(key.y, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("depth,activation,residual_norm", CONFIGS)
def test_eq8_surprise_rows_match_naive_gradient(rng, depth, activation, residual_norm):
    # the l2 loss of Eq. 12: δ's from the kernel, u_i = h_{i-1}ᵀ δ_i, against autograd
    # through the naive memory, one token at a time
    params, _, spec, key = _setup(rng, 4, 5, depth, activation, residual_norm)
    got = _surprises(spec, key)
    for r in range(4):
        want = naive_grad(list(params), key.X[r], key.V[r], activation, residual_norm)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g[r], w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss", ["dot", "huber", "lp"])
def test_eq8_surprise_rows_other_losses_match_reference(rng, loss):
    params, _, spec, key = _setup(rng, 4, 5, 2, "gelu", True, loss=loss)
    want = per_token_surprise(params, key.X, key.V, loss, p=3.0, delta=0.5)
    for g, w in zip(_surprises(spec, key), want):
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12)


def test_surprise_clip_scale_is_min_one_c_over_norm(rng):
    params, _, spec, key = _setup(rng, 4, 5, 3, "silu", False, clip=0.7)
    unorm2, uscale = np.zeros(4), np.zeros(4)
    rows.clip_scales(spec, key.X, key.H, key.D, unorm2, uscale)
    for r in range(4):
        u = naive_grad(list(params), key.X[r], key.V[r], "silu", False)
        norm2 = sum(np.sum(w * w) for w in u)
        np.testing.assert_allclose(unorm2[r], norm2, rtol=1e-12)
        np.testing.assert_allclose(uscale[r], min(1.0, 0.7 / np.sqrt(norm2)), rtol=1e-12)


def test_eq13_eq14_apply_update_and_first_bad_token(rng):
    params, W, spec, key = _setup(rng, 3, 4, 2, "gelu", False)
    S = 0.1 * rng.standard_normal(W.shape)
    Wo, So = np.zeros_like(W), np.zeros_like(W)
    # token 1 = row 1 of the tapes, θ_1 c_1 = 0.2, 1 - α_1 = 0.9, η_1 = 0.8
    # (the kernels take theta as a column per token, or one per layer; alpha as a column per
    # token, or one per output channel)
    gates = (np.array([[0.0], [0.1], [0.0]]), np.array([0.0, 0.8, 0.0]),
             np.array([[0.0], [0.4], [0.0]]))
    seq = layout.Seq(key.X, key.V, key.X, *gates, np.zeros(0))
    nz = spec.zoff[-1]
    keep, rate = np.empty(nz), np.empty(nz)
    rows.apply_update(W, S, Wo, So, spec, seq, key, 1, 1, 0.5, keep, rate)
    u = [g[1] for g in _surprises(spec, key)]
    S_want = 0.8 * S - 0.2 * np.concatenate([g.ravel() for g in u])  # Eq. 14
    np.testing.assert_allclose(So, S_want, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(Wo, 0.9 * W + S_want, rtol=1e-13, atol=1e-15)  # Eq. 13
    # a step per layer (Appendix B.3): θ_{1,i} c_1 = 0.2 and 0.05
    per_layer = seq._replace(theta=np.array([[0.0, 0.0], [0.4, 0.1], [0.0, 0.0]]))
    rows.apply_update(W, S, Wo, So, spec, per_layer, key, 1, 1, 0.5, keep, rate)
    S_layers = 0.8 * S - np.concatenate([0.2 * u[0].ravel(), 0.05 * u[1].ravel()])
    np.testing.assert_allclose(So, S_layers, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(Wo, 0.9 * W + S_layers, rtol=1e-13, atol=1e-15)
    # with an anchor M̄: Eq. 13 for M - M̄
    anchor = rng.standard_normal(W.shape)
    rows.apply_update(W, S, Wo, So, spec, seq._replace(anchor=anchor), key, 1, 1, 0.5, keep,
                      rate)
    np.testing.assert_allclose(Wo, anchor + 0.9 * (W - anchor) + S_want, rtol=1e-13,
                               atol=1e-15)
    # a rate per output channel (channel-wise): column j of layer i keeps 1 - α_{1,c}
    alpha = np.zeros((3, nz))
    alpha[1] = rng.uniform(0.0, 0.5, nz)
    for anc in (np.zeros(0), anchor):
        rows.apply_update(W, S, Wo, So, spec, seq._replace(alpha=alpha, anchor=anc), key, 1, 1,
                          0.5, keep, rate)
        np.testing.assert_array_equal(rate, alpha[1])
        np.testing.assert_array_equal(keep, 1.0 - alpha[1])
        M0, A0 = (layout.unpack_weights(x, spec.shapes, spec.offsets)
                  for x in (W, anc if anc.size else np.zeros_like(W)))
        want = [a + (1.0 - alpha[1, spec.zoff[i]:spec.zoff[i + 1]]) * (w - a) + s
                for i, (w, s, a) in enumerate(zip(M0, layout.unpack_weights(
                    S_want, spec.shapes, spec.offsets), A0))]
        for got, w in zip(layout.unpack_weights(Wo, spec.shapes, spec.offsets), want):
            np.testing.assert_allclose(got, w, rtol=1e-13, atol=1e-15)
    # a step of θ = 1e308 at token 2 (row 1 of the tapes) overflows the weights there
    theta = np.array([[0.1], [0.1], [1e308], [0.1]])
    seq = layout.Seq(key.X, key.V, key.X, np.zeros((4, 1)), np.full(4, 0.5), theta,
                     np.zeros(0))
    assert rows.first_bad_token(W, S, spec, seq, key, np.ones(3), 1) == 2
    assert np.all(np.isfinite(W))  # the replay leaves its start state alone
    seq = seq._replace(theta=np.full((4, 1), 0.1))
    assert rows.first_bad_token(W, S, spec, seq, key, np.ones(3), 1) == 3  # none: the last


def test_activations_and_derivatives_match_naive_and_finite_differences():
    # σ and σ' of `hidden` (the kernels' activation) against the naive formulas and central
    # differences of them; σ'' (`act_d2`) against differences of σ'
    x = np.linspace(-6, 6, 101)
    step = 1e-5
    for kind, naive in ((0, silu), (1, gelu_exact)):
        h, d1 = np.empty_like(x), np.empty_like(x)
        scalars.hidden(x, h, d1, kind, True)
        np.testing.assert_allclose(h, naive(x), rtol=1e-14, atol=1e-15)
        np.testing.assert_allclose(d1, (naive(x + step) - naive(x - step)) / (2 * step),
                                   atol=1e-8)
        hp, d1p, hm, d1m = (np.empty_like(x) for _ in range(4))
        scalars.hidden(x + step, hp, d1p, kind, True)
        scalars.hidden(x - step, hm, d1m, kind, True)
        d2 = np.array([scalars.act_d2(v, kind) for v in x])
        np.testing.assert_allclose(d2, (d1p - d1m) / (2 * step), atol=1e-8)


def test_float32_fast_exp_and_erf():
    @numba.njit
    def fast32(z, e, f):
        for i in range(z.shape[0]):
            e[i] = scalars.fast_exp(z[i])
            f[i] = scalars.fast_erf(z[i])

    z = np.concatenate([np.linspace(-80, 80, 20001), [np.nan, np.inf, -np.inf]]).astype(np.float32)
    e, f = np.empty_like(z), np.empty_like(z)
    fast32(z, e, f)
    with np.errstate(over="ignore"):
        np.testing.assert_allclose(e[:-3], np.exp(z[:-3].astype(np.float64)), rtol=2e-7)
    np.testing.assert_allclose(f[:-3], erf(z[:-3].astype(np.float64)), atol=5e-7)
    # NaN stays NaN (the divergence check relies on it), inf maps as it should
    assert np.isnan(e[-3]) and np.isnan(f[-3])
    assert e[-2] == np.inf and e[-1] == 0.0 and f[-2] == 1.0 and f[-1] == -1.0


@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("activation,residual_norm,loss", [("gelu", True, "l2"),
                                                           ("silu", False, "huber")])
def test_eq8_surprise_hessian_vector_product_matches_autograd(rng, n, activation,
                                                             residual_norm, loss):
    # the building block of the VJP: ∇_{W,k,v} Σ_r ⟨ū_r, ∇_W ℓ(W; k_r, v_r)⟩ (Eqs. 8, 12),
    # for one row (the token loop) and a chunk of rows
    d = 3
    params, W, spec, key = _setup(rng, n, d, 3, activation, residual_norm, loss=loss)
    U = [rng.standard_normal((n,) + w.shape) for w in params]  # one ū per row

    def pairing(params, K, V):
        u = per_token_surprise(params, K, V, loss, delta=0.5)
        return sum(anp.sum(ui * ci) for ui, ci in zip(u, U))

    want = grad(pairing, [0, 1, 2])(params, key.X, key.V)
    # the products of ū_r with the rows entering each layer and with its deltas
    xs = [key.X] + _blocks(key.H, n, spec.shapes[:-1, 1])
    ds = _blocks(key.D, n, spec.shapes[:, 1])
    A = np.concatenate([np.einsum("ra,rab->rb", x, u).ravel() for x, u in zip(xs, U)])
    B = np.concatenate([np.einsum("rb,rab->ra", dl, u).ravel() for dl, u in zip(ds, U)])
    HD, ZB = np.zeros(n * spec.boff[-1]), np.zeros(n * spec.zoff[-1])
    Kbar, Vbar = np.zeros((n, d)), np.zeros((n, d))
    work = np.zeros(hvp.hvp_work_size(spec.shapes, n))
    hvp.hvp_rows(W, spec, key, A, B, HD, ZB, Kbar, Vbar, work)
    Wbar = np.zeros_like(W)
    hvp.add_weight_cotangent(Wbar, spec, key, HD, ZB)
    for got, w in zip(layout.unpack_weights(Wbar, spec.shapes, spec.offsets), want[0]):
        np.testing.assert_allclose(got, w, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(Kbar, want[1], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(Vbar, want[2], rtol=1e-10, atol=1e-12)
