"""The memory M (Section 3.1): initialisation, forward pass, exact activations."""

import numpy as np
import pytest
from autograd import grad
from naive_memory import gelu_exact, naive_mlp, silu

import minititans as mt
from minititans.activations import gelu
from minititans.activations import silu as lib_silu


def test_init_memory_depth1_is_single_matrix_with_fan_in_scale(rng):
    (W,) = mt.init_memory(rng, d_in=400, d_out=300, depth=1)
    assert W.shape == (400, 300)
    # N(0, 1/fan_in): the sample std of 120k entries is within 1% of 1/sqrt(400)
    np.testing.assert_allclose(W.std(), 1 / 20, rtol=0.01)
    np.testing.assert_allclose(W.mean(), 0.0, atol=1e-3)


def test_init_memory_deep_widths_and_zero_out(rng):
    params = mt.init_memory(rng, d_in=8, d_out=5, depth=3, expansion=2, init="zero_out")
    assert [W.shape for W in params] == [(8, 16), (16, 16), (16, 5)]
    assert np.all(params[-1] == 0) and np.all(params[0] != 0)
    x = rng.standard_normal((4, 8))
    np.testing.assert_array_equal(mt.memory_forward(params, x), np.zeros((4, 5)))


def test_init_memory_is_reproducible_from_the_generator():
    a = mt.init_memory(np.random.default_rng(7), 4, 4, depth=2)
    b = mt.init_memory(np.random.default_rng(7), 4, 4, depth=2)
    for wa, wb in zip(a, b):
        np.testing.assert_array_equal(wa, wb)


def test_init_memory_float32(rng):
    params = mt.init_memory(rng, 4, 3, depth=2, dtype=np.float32)
    assert all(W.dtype == np.float32 for W in params)
    y = mt.memory_forward(params, rng.standard_normal((2, 4)).astype(np.float32))
    assert y.dtype == np.float32


def test_eq15_linear_memory_read_is_matrix_product(rng):
    params = mt.init_memory(rng, 5, 3, depth=1)
    q = rng.standard_normal((7, 5))
    np.testing.assert_allclose(mt.memory_forward(params, q), q @ params[0], rtol=1e-14)


@pytest.mark.parametrize("activation", ["gelu", "silu"])
@pytest.mark.parametrize("depth,residual_norm", [(2, False), (3, False), (2, True), (1, True)])
def test_eq15_deep_memory_read_matches_naive_mlp(rng, activation, depth, residual_norm):
    params = mt.init_memory(rng, 6, 6, depth=depth, expansion=2, activation=activation,
                            residual_norm=residual_norm)
    x = rng.standard_normal((5, 6))
    expected = np.array([naive_mlp(list(params), xi, activation, residual_norm) for xi in x])
    np.testing.assert_allclose(mt.memory_forward(params, x), expected, rtol=1e-12, atol=1e-14)


def test_gelu_is_the_exact_erf_form_not_tanh():
    x = np.linspace(-4, 4, 81)
    np.testing.assert_allclose(gelu(x), gelu_exact(x), rtol=1e-14, atol=1e-15)
    tanh_approx = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    # the tanh approximation differs by ~1e-4 somewhere on [-4, 4]; we must not be it
    assert np.max(np.abs(gelu(x) - tanh_approx)) > 1e-4
    np.testing.assert_allclose(lib_silu(x), silu(x), rtol=1e-14)


def test_gradient_of_memory_params_is_memory_params(rng):
    params = mt.init_memory(rng, 4, 4, depth=2, activation="silu", residual_norm=True)
    g = grad(lambda p: np.sum(mt.memory_forward(p, np.ones((2, 4))) ** 2))(params)
    assert isinstance(g, mt.MemoryParams)
    assert g.activation == "silu" and g.residual_norm is True
    assert [w.shape for w in g] == [w.shape for w in params]


# --- autograd's own utilities on memory parameters --------------------------------------------


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
@pytest.mark.parametrize("residual_norm", [False, True])
@pytest.mark.parametrize("activation", ["gelu", "silu"])
def test_autograd_flatten_round_trips_memory_params(depth, residual_norm, activation):
    from autograd.misc.flatten import flatten

    params = mt.init_memory(np.random.default_rng(depth), 6, 6, depth=depth, expansion=2,
                            activation=activation, residual_norm=residual_norm)
    flat, unflatten = flatten(params)
    assert flat.shape == (sum(w.size for w in params),)
    # the flat vector is the weights in order, each raveled row-major
    np.testing.assert_array_equal(flat, np.concatenate([w.ravel() for w in params]))
    back = unflatten(flat)
    assert type(back) is mt.MemoryParams
    assert (back.activation, back.residual_norm) == (activation, residual_norm)
    assert len(back) == depth
    for w, b in zip(params, back):
        np.testing.assert_array_equal(w, b)
    # a changed flat vector comes back as the matching change of each weight
    shifted = unflatten(flat + 1.0)
    for w, b in zip(params, shifted):
        np.testing.assert_array_equal(b, w + 1.0)


def test_autograd_flatten_of_a_model_tree_keeps_its_memories():
    from autograd.misc.flatten import flatten

    tree = {"a": mt.init_memory(np.random.default_rng(0), 4, 4, depth=2, expansion=2),
            "b": [np.ones(3), (np.zeros((2, 2)),)]}
    flat, unflatten = flatten(tree)
    assert flat.size == 4 * 8 + 8 * 4 + 3 + 4
    back = unflatten(flat)
    assert type(back["a"]) is mt.MemoryParams and back["a"].activation == "gelu"
    np.testing.assert_array_equal(back["a"][1], tree["a"][1])
    np.testing.assert_array_equal(back["b"][0], np.ones(3))


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_eq12_autograd_optimizers_minimise_the_associative_loss(optimizer):
    from autograd import grad
    from autograd.misc import optimizers

    rng = np.random.default_rng(1)
    k = rng.standard_normal((8, 4))
    v = rng.standard_normal((8, 4))
    params = mt.init_memory(rng, 4, 4, depth=2, expansion=4, activation="silu")
    start = mt.associative_loss(params, k, v)
    step = {"adam": 0.02, "sgd": 0.01}[optimizer]
    out = getattr(optimizers, optimizer)(lambda p, i: grad(mt.associative_loss)(p, k, v),
                                         params, num_iters=400, step_size=step)
    assert type(out) is mt.MemoryParams and out.activation == "silu"
    # 8 pairs in a 4 -> 16 -> 4 MLP: an optimiser fits them far better than the start
    assert mt.associative_loss(out, k, v) < 0.05 * start
