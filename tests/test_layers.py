"""Titans Section 4.4 block pieces and Eqs. 1 and 19."""

import math

import autograd.numpy as anp
import numpy as np
import pytest
from autograd.test_util import check_grads
from naive_attention import naive_depthwise_conv

from minititans import activations
from minititans.layers import (
    depthwise_conv,
    init_depthwise_conv,
    init_layer_norm,
    init_linear,
    init_output_gate,
    init_persistent,
    init_rms_norm,
    l2_normalize,
    layer_norm,
    linear,
    output_gate,
    prepend_persistent,
    residual,
    rms_norm,
    silu,
)

RTOL, ATOL = 1e-12, 1e-12


def rng(seed=0):
    return np.random.default_rng(seed)


def randomize(p, seed=7):
    """Non-trivial norm gains and biases, so the gradient checks see every parameter."""
    r = rng(seed)
    return {key: randomize(val, seed + 1) if isinstance(val, dict)
            else val + 0.3 * r.standard_normal(val.shape) for key, val in p.items()}


def test_eq1_linear_projection_is_x_times_W_plus_b():
    p = {"W": np.array([[1.0, 2.0], [0.0, 1.0], [-1.0, 0.0]]), "b": np.array([0.5, -0.5])}
    x = np.array([[1.0, 2.0, 3.0]])
    # [1 + 0 - 3, 2 + 2 + 0] + b
    np.testing.assert_allclose(linear(p, x), [[-2.0 + 0.5, 4.0 - 0.5]], rtol=1e-15)
    assert set(init_linear(rng(), 3, 2)) == {"W"}
    assert init_linear(rng(), 3, 2)["W"].shape == (3, 2)


def test_sec44_silu_is_the_shared_activation():
    assert silu is activations.silu
    np.testing.assert_allclose(silu(np.array([1.0])), [1.0 / (1.0 + math.exp(-1.0))],
                               rtol=1e-15)


def test_sec44_l2_normalize_hand_computed():
    x = np.array([[3.0, 4.0], [0.0, 0.0]])
    y = l2_normalize(x)  # eps = 1e-6 inside the square root
    np.testing.assert_allclose(y[0], [3.0 / math.sqrt(25 + 1e-6), 4.0 / math.sqrt(25 + 1e-6)],
                               rtol=1e-15)
    np.testing.assert_array_equal(y[1], [0.0, 0.0])  # finite at zero


@pytest.mark.parametrize("K", [1, 2, 4])
def test_sec44_depthwise_conv_matches_naive_loop(K):
    p = randomize(init_depthwise_conv(rng(), channels=3, kernel_size=K))
    x = rng(1).standard_normal((7, 3))
    y, state = depthwise_conv(p, x)
    np.testing.assert_allclose(y, naive_depthwise_conv(p["w"], p["b"], x), rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(state, x[7 - (K - 1):])
    assert state.shape == (K - 1, 3)


def test_sec44_depthwise_conv_hand_computed():
    p = {"w": np.array([[1.0], [10.0], [100.0]])}  # w[j] multiplies x_{t-j}
    x = np.array([[1.0], [2.0], [3.0], [4.0]])
    y, _ = depthwise_conv(p, x)
    np.testing.assert_allclose(y, [[1.0], [2.0 + 10.0], [3.0 + 20.0 + 100.0],
                                   [4.0 + 30.0 + 200.0]], rtol=1e-15)


def test_sec44_depthwise_conv_streamed_token_by_token_equals_one_call():
    p = randomize(init_depthwise_conv(rng(), channels=3, kernel_size=4))
    x = rng(1).standard_normal((9, 3))
    y, final = depthwise_conv(p, x)
    state, ys = None, []
    for t in range(9):
        yt, state = depthwise_conv(p, x[t:t + 1], state)
        ys.append(yt)
    np.testing.assert_allclose(np.concatenate(ys), y, rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(state, final)
    y1, s1 = depthwise_conv(p, x[:2])  # a chunk shorter than K - 1 still carries the state
    y2, _ = depthwise_conv(p, x[2:], s1)
    np.testing.assert_allclose(np.concatenate([y1, y2]), y, rtol=RTOL, atol=ATOL)


def test_sec44_depthwise_conv_batch_axes_each_sequence_its_own_state():
    p = randomize(init_depthwise_conv(rng(), channels=3, kernel_size=3))
    x = rng(3).standard_normal((2, 4, 6, 3))  # two leading axes
    y, state = depthwise_conv(p, x[..., :4, :])
    y2, state = depthwise_conv(p, x[..., 4:, :], state)
    assert state.shape == (2, 4, 2, 3)
    for a in range(2):
        for b in range(4):
            want = naive_depthwise_conv(p["w"], p["b"], x[a, b])
            np.testing.assert_allclose(np.concatenate([y[a, b], y2[a, b]]), want,
                                       rtol=RTOL, atol=ATOL)
    with pytest.raises(ValueError, match=r"state must have shape \(2, 4, 2, 3\)"):
        depthwise_conv(p, x, state[0])


def test_sec44_depthwise_conv_gradient_matches_finite_differences():
    """The convolution is one autograd node with a hand-written VJP (for w and for the
    padded input, hence x and the carried state): checked against central differences."""

    p = randomize(init_depthwise_conv(rng(), channels=3, kernel_size=4))
    r = rng()
    x, state = r.standard_normal((2, 7, 3)), r.standard_normal((2, 3, 3))
    weights = r.standard_normal((2, 7, 3))

    def f(args):  # check_grads differentiates its first argument: all of them in a tuple
        w, b, x, state = args
        y, new = depthwise_conv({"w": w, "b": b}, x, state)
        return anp.sum(y * weights) + anp.sum(new ** 2)

    check_grads(f, modes=["rev"], order=1)((p["w"], p["b"], x, state))


def test_sec44_depthwise_conv_is_causal():
    p = randomize(init_depthwise_conv(rng(), channels=2, kernel_size=3))
    x = rng(2).standard_normal((6, 2))
    y, _ = depthwise_conv(p, x)
    for t in range(5):
        x2 = x.copy()
        x2[t + 1:] = rng(t).standard_normal(x2[t + 1:].shape)
        np.testing.assert_array_equal(depthwise_conv(p, x2)[0][:t + 1], y[:t + 1])


def test_sec44_rms_norm_and_layer_norm_hand_computed():
    x = np.array([[1.0, -1.0, 3.0, -3.0]])  # mean 0, mean square 5
    p = {"g": np.array([1.0, 2.0, 1.0, 1.0])}
    np.testing.assert_allclose(rms_norm(p, x, eps=0.0),
                               [[1 / math.sqrt(5), -2 / math.sqrt(5), 3 / math.sqrt(5),
                                 -3 / math.sqrt(5)]], rtol=1e-15)
    x = np.array([[1.0, 2.0, 3.0, 6.0]])  # mean 3, variance (4 + 1 + 0 + 9) / 4 = 3.5
    p = {"g": np.full(4, 2.0), "b": np.full(4, 1.0)}
    expected = 2.0 * (x - 3.0) / math.sqrt(3.5) + 1.0
    np.testing.assert_allclose(layer_norm(p, x, eps=0.0), expected, rtol=1e-15)
    assert set(init_layer_norm(rng(), 4)) == {"g", "b"}
    np.testing.assert_array_equal(init_rms_norm(rng(), 4)["g"], np.ones(4))


def test_sec44_output_gate_is_norm_times_sigmoid_gate():
    p = randomize(init_output_gate(rng(), d=3, d_x=5))
    y = rng(1).standard_normal((4, 3))
    x = rng(2).standard_normal((4, 5))
    normed = p["norm"]["g"] * y / np.sqrt(np.mean(y**2, axis=-1, keepdims=True) + 1e-6)
    gate = 1.0 / (1.0 + np.exp(-(x @ p["W_g"])))
    np.testing.assert_allclose(output_gate(p, y, x), normed * gate, rtol=1e-12, atol=1e-14)


def test_eq19_prepend_persistent_tokens():
    p = init_persistent(rng(), num_tokens=2, d=3)
    x = rng(1).standard_normal((4, 3))
    out = prepend_persistent(p, x)
    np.testing.assert_array_equal(out, np.concatenate([p["P"], x]))
    batched = prepend_persistent(p, np.stack([x, 2 * x]))
    assert batched.shape == (2, 6, 3)
    np.testing.assert_array_equal(batched[1, :2], p["P"])
    empty = init_persistent(rng(), num_tokens=0, d=3)
    np.testing.assert_array_equal(prepend_persistent(empty, x), x)


def test_sec44_residual_adds_the_input():
    x = np.array([1.0, 2.0])
    np.testing.assert_array_equal(residual(lambda h: 10 * h, x), [11.0, 22.0])


def test_sec44_layer_gradients():
    x = rng(3).standard_normal((5, 4))
    lin = init_linear(rng(), 4, 3, bias=True)
    conv = init_depthwise_conv(rng(), 4, 3)
    s0 = rng(4).standard_normal((2, 4))
    rms, ln = randomize(init_rms_norm(rng(), 4)), randomize(init_layer_norm(rng(), 4))
    gate = randomize(init_output_gate(rng(), 3, d_x=4))
    pers = init_persistent(rng(), 2, 4)
    y = rng(5).standard_normal((5, 3))
    checks = [
        (lambda p, x: linear(p, x), (lin, x)),
        (lambda x: l2_normalize(x), (x,)),
        (lambda x: silu(x), (x,)),
        (lambda p, x, s: depthwise_conv(p, x, s)[0], (conv, x, s0)),
        (lambda p, x: rms_norm(p, x), (rms, x)),
        (lambda p, x: layer_norm(p, x), (ln, x)),
        (lambda p, y, x: output_gate(p, y, x), (gate, y, x)),
        (lambda p, x: prepend_persistent(p, x), (pers, x)),
        (lambda x: residual(silu, x), (x,)),
    ]
    for f, args in checks:  # check_grads differentiates its first argument: pass them all
        check_grads(lambda a, f=f: f(*a), modes=["rev"], order=1)(args)


def test_sec44_layers_float32_in_float32_out():
    x64 = rng(3).standard_normal((5, 4))
    x = x64.astype(np.float32)
    f32, f64 = np.float32, np.float64
    for make, apply in [
        (lambda dt: init_linear(rng(), 4, 3, bias=True, dtype=dt), linear),
        (lambda dt: init_depthwise_conv(rng(), 4, dtype=dt), lambda p, x: depthwise_conv(p, x)[0]),
        (lambda dt: init_rms_norm(rng(), 4, dtype=dt), rms_norm),
        (lambda dt: init_layer_norm(rng(), 4, dtype=dt), layer_norm),
        (lambda dt: init_output_gate(rng(), 4, dtype=dt), lambda p, x: output_gate(p, x, x)),
        (lambda dt: init_persistent(rng(), 2, 4, dtype=dt), prepend_persistent),
        (lambda dt: None, lambda p, x: l2_normalize(x)),
    ]:
        y = apply(make(f32), x)
        assert y.dtype == np.float32
        np.testing.assert_allclose(y, apply(make(f64), x64), rtol=1e-5, atol=1e-5)


def test_sec44_layers_bad_inputs():
    with pytest.raises(ValueError, match="kernel_size must be >= 1"):
        init_depthwise_conv(rng(), 3, kernel_size=0)
    with pytest.raises(TypeError, match="kernel_size must be an int"):
        init_depthwise_conv(rng(), 3, kernel_size=2.0)
    p = init_depthwise_conv(rng(), 3, kernel_size=4)
    x = rng().standard_normal((5, 3))
    with pytest.raises(ValueError, match="state must have shape"):
        depthwise_conv(p, x, np.zeros((2, 3)))
    with pytest.raises(ValueError, match="x must have last dimension 3"):
        depthwise_conv(p, x[:, :2])
    with pytest.raises(TypeError, match="x must be a float32 or float64 array"):
        depthwise_conv(p, x.astype(np.int64))
    with pytest.raises(TypeError, match="rng must be a numpy.random.Generator"):
        init_linear(0, 3, 2)
    with pytest.raises(ValueError, match="x must have last dimension 3"):
        linear(init_linear(rng(), 3, 2), x[:, :2])
    with pytest.raises(ValueError, match="num_tokens must be >= 0"):
        init_persistent(rng(), -1, 3)
    with pytest.raises(TypeError, match="dtype must be float32 or float64"):
        init_rms_norm(rng(), 3, dtype=np.float16)


def test_eq19_prepend_persistent_is_differentiable_over_a_batch(rng):
    p = init_persistent(rng, 2, 3)
    x = rng.standard_normal((4, 5, 3))
    check_grads(lambda P: prepend_persistent({"P": P}, x), modes=["rev"], order=1)(p["P"])
    out = prepend_persistent(p, x)
    np.testing.assert_array_equal(out[:, :2], np.broadcast_to(p["P"], (4, 2, 3)))
