"""The numba delta rules' VJP (kernels/delta_vjp.py) against autograd (Appendix C, Eqs. 4–5).

Three recurrences share the kernel: Titans' delta rule
$W_t = (1-\\alpha_t)W_{t-1} - \\beta_t k_t^\\top(k_t W_{t-1} - v_t)$, Gated DeltaNet's (the gate
before the error) and linear attention $W_t = W_{t-1} + k_t^\\top v_t$; $y_t = q_t W_t$. Their
gradients with respect to q, k, v, beta, alpha and the initial state $W_0$ are checked against
autograd of a naive token loop written here and of the package's reference, for random
inputs with a non-zero $W_0$ and per-token gates, and at model level (apply and stream).
"""

import os
import subprocess
import sys

import autograd.numpy as anp
import numpy as np
import pytest
from autograd import grad

from minititans.linear_attention import delta_rule, gated_delta_rule
from minititans.models import Model, ModelConfig, ravel
from minititans.training import cross_entropy, numba_available

pytestmark = pytest.mark.skipif(not numba_available(), reason="needs numba")

RULES = ("delta", "gated", "linear")
TOL = {np.float64: 1e-12, np.float32: 2e-4}  # relative to the largest gradient entry
B, T, D, DV = 3, 17, 5, 4


def naive_recurrence(q, k, v, beta, alpha, W0, rule):
    """The three recurrences token by token on one sequence, in autograd.numpy."""
    W, ys = W0, []
    for t in range(q.shape[0]):
        kt, vt = k[t:t + 1], v[t:t + 1]  # (1, d), (1, d_v)
        if rule == "linear":
            W = W + kt.T @ vt  # Eq. 4
        elif rule == "gated":
            Wd = (1.0 - alpha[t]) * W  # Gated DeltaNet: decay, then the error at Wd
            W = Wd - beta[t] * (kt.T @ (kt @ Wd - vt))
        else:
            W = (1.0 - alpha[t]) * W - beta[t] * (kt.T @ (kt @ W - vt))
        ys.append((q[t:t + 1] @ W)[0])
    return anp.stack(ys), W


def inputs(seed, dtype=np.float64):
    """q, k (unit rows), v, per-token beta in (0.1, 0.9), alpha in (0, 0.3), W0 != 0; and
    random cotangents of y and of W_T."""
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((B, T, D))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    args = [rng.standard_normal((B, T, D)), k, rng.standard_normal((B, T, DV)),
            rng.uniform(0.1, 0.9, (B, T)), rng.uniform(0.0, 0.3, (B, T)),
            rng.standard_normal((B, D, DV))]
    gy, gW = rng.standard_normal((B, T, DV)), rng.standard_normal((B, D, DV))
    return [a.astype(dtype) for a in args], gy.astype(dtype), gW.astype(dtype)


def numba_loss(rule, gy, gW, checkpoint_every=None):
    from minititans.kernels.delta_vjp import delta_rule_batched

    def f(args):
        y, W = delta_rule_batched(*args, rule=rule, checkpoint_every=checkpoint_every)
        return anp.sum(y * gy) + anp.sum(W * gW)
    return f


def naive_loss(rule, gy, gW):
    def f(args):
        total = 0.0
        for b in range(B):
            y, W = naive_recurrence(*(a[b] for a in args), rule)
            total = total + anp.sum(y * gy[b]) + anp.sum(W * gW[b])
        return total
    return f


def assert_grads_close(got, want, tol, names=("q", "k", "v", "beta", "alpha", "W0")):
    for name, g, w in zip(names, got, want):
        assert g.shape == w.shape, name
        scale = max(np.abs(w).max(), 1e-30)
        err = np.abs(np.asarray(g, np.float64) - w).max() / scale
        assert err <= tol, f"d/d{name}: relative error {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("checkpoint_every", [None, 1, 4, 100])
@pytest.mark.parametrize("rule", RULES)
def test_appendix_c_numba_vjp_equals_autograd_of_the_naive_token_loop(rule, checkpoint_every):
    """dL/d(q, k, v, beta, alpha, W0) of L = <y, gy> + <W_T, gW>; any checkpoint spacing
    (1: every state stored, 100 > T: all recomputed from W0) gives the same numbers."""
    args, gy, gW = inputs(0)
    got = grad(numba_loss(rule, gy, gW, checkpoint_every))(args)
    want = grad(naive_loss(rule, gy, gW))(args)
    if rule == "linear":  # beta and alpha do not enter linear attention
        got, want = got[:3] + got[5:], want[:3] + want[5:]
        assert_grads_close(got, want, TOL[np.float64], names=("q", "k", "v", "W0"))
    else:
        assert_grads_close(got, want, TOL[np.float64])
    # the loss itself: the numba forward equals the naive one
    np.testing.assert_allclose(numba_loss(rule, gy, gW)(args), naive_loss(rule, gy, gW)(args),
                               rtol=1e-12)


@pytest.mark.parametrize("gated", [False, True])
def test_appendix_c_backend_numba_gradients_equal_autograd_of_the_reference(gated):
    """``delta_rule`` / ``gated_delta_rule`` with ``backend="numba"``: the gradient with respect
    to every argument equals autograd's through the reference token loop, including a scalar
    (traced) alpha and a non-zero initial state."""
    fn = gated_delta_rule if gated else delta_rule
    (q, k, v, beta, _, W0), gy, gW = inputs(1)
    q, k, v, beta, W0, gy, gW = q[0], k[0], v[0], beta[0], W0[0], gy[0], gW[0]

    def loss(backend):
        def f(args):
            q, k, v, beta, alpha, W0 = args
            y, W = fn(q, k, v, beta, alpha, state=W0, return_state=True, backend=backend)
            return anp.sum(y * gy) + anp.sum(W * gW)
        return f

    args = [q, k, v, beta, 0.2, W0]
    got, want = grad(loss("numba"))(args), grad(loss("reference"))(args)
    assert_grads_close(got, want, TOL[np.float64])
    assert np.abs(want[4]) > 1e-3  # the scalar alpha's gradient is a real number, not 0
    np.testing.assert_allclose(loss("numba")(args), loss("reference")(args), rtol=1e-12)


@pytest.mark.parametrize("rule", RULES)
def test_appendix_c_numba_vjp_float32_within_stated_tolerance(rule):
    """float32 in, float32 gradients out, within 2e-4 of the float64 naive gradients."""
    args, gy, gW = inputs(2, np.float32)
    got = grad(numba_loss(rule, gy, gW))(args)
    want = grad(naive_loss(rule, gy.astype(float), gW.astype(float)))(
        [a.astype(np.float64) for a in args])
    assert all(g.dtype == np.float32 for g in got)
    keep = [0, 1, 2, 5] if rule == "linear" else range(6)
    names = ("q", "k", "v", "beta", "alpha", "W0")
    assert_grads_close([got[i] for i in keep], [want[i] for i in keep], TOL[np.float32],
                       names=[names[i] for i in keep])


def test_numba_vjp_of_an_empty_sequence_passes_the_state_cotangent_through():
    from minititans.kernels.delta_vjp import delta_rule_batched

    (q, k, v, beta, alpha, W0), _, gW = inputs(3)
    args = [q[:, :0], k[:, :0], v[:, :0], beta[:, :0], alpha[:, :0], W0]
    g = grad(lambda a: anp.sum(delta_rule_batched(*a, rule="gated")[1] * gW))(args)
    np.testing.assert_array_equal(g[5], gW)  # W_T = W_0 when T = 0
    assert all(x.size == 0 for x in g[:5])


def test_numba_vjp_is_first_order_only_and_checks_its_arguments():
    from minititans.kernels.delta_vjp import delta_rule_batched

    (q, k, v, beta, alpha, W0), _, _ = inputs(4)
    with pytest.raises(ValueError, match="rule must be one of 'linear', 'delta', 'gated'"):
        delta_rule_batched(q, k, v, beta, alpha, W0, rule="titans")
    with pytest.raises(ValueError, match=r"q must have 3 axes \(batch first\)"):
        delta_rule_batched(q[0], k[0], v[0], beta[0], alpha[0], W0[0], rule="delta")
    with pytest.raises(ValueError, match=r"beta must have shape \(3, 17\), got \(2, 17\)"):
        delta_rule_batched(q, k, v, beta[:2], alpha, W0, rule="gated")
    with pytest.raises(ValueError, match=r"state must have shape \(3, 5, 4\), got \(3, 4, 4\)"):
        delta_rule_batched(q, k, v, beta, alpha, W0[:, 1:], rule="linear")
    with pytest.raises(ValueError, match=r"k must have the shape of q \(3, 17, 5\)"):
        delta_rule_batched(q, k[:, 1:], v, beta, alpha, W0, rule="delta")
    with pytest.raises(ValueError, match="checkpoint_every must be a positive int"):
        delta_rule_batched(q, k, v, beta, alpha, W0, rule="delta", checkpoint_every=0)
    with pytest.raises(ValueError, match="backend must be one of 'reference', 'numba'"):
        delta_rule(q[0], k[0], v[0], 0.5, backend="fast")

    def first(x):
        return anp.sum(delta_rule_batched(q * x, k, v, beta, alpha, W0, rule="delta")[0])

    with pytest.raises(NotImplementedError, match="first order only"):
        grad(grad(first))(1.0)


_NO_JIT_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import numpy as np
from autograd import grad
import test_delta_vjp as t
for rule in t.RULES:
    args, gy, gW = t.inputs(7)
    got = grad(t.numba_loss(rule, gy, gW, 3))(args)
    want = grad(t.naive_loss(rule, gy, gW))(args)
    keep = [0, 1, 2, 5] if rule == "linear" else range(6)
    t.assert_grads_close([got[i] for i in keep], [want[i] for i in keep], 1e-12,
                         names=[str(i) for i in keep])
print("ok")
"""


def test_numba_vjp_as_plain_python_with_numba_disable_jit():
    """The same backward kernel run as plain Python (the flag is read at import)."""
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, NUMBA_DISABLE_JIT="1")
    run = subprocess.run([sys.executable, "-c", _NO_JIT_SCRIPT.format(tests=tests)],
                         capture_output=True, text=True, env=env, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().endswith("ok")


# --- in the models: the Gated DeltaNet and linear-attention baselines -----------------------

TINY = dict(vocab_size=12, d_model=8, num_heads=2, ffn_expansion=2, conv_kernel=3,
            num_persistent=0, num_layers=2)


def model_loss_and_grad(model_name, backend, pieces=None):
    """Cross-entropy of a tiny model on a (2, 13) batch and its gradient; ``pieces``: stream
    the batch in pieces of these sizes (the gradient then flows through the carried state)."""
    model = Model(ModelConfig(model=model_name, backend=backend, **TINY))
    rng = np.random.default_rng(5)
    tokens = rng.integers(0, 12, (2, 13))
    targets, mask = rng.integers(0, 12, (2, 13)), np.ones((2, 13), bool)
    params = model.init(np.random.default_rng(6))
    params["layers"][0]["mixer"]["b_alpha"] = np.asarray(-1.0)  # alpha near 0.27: it matters
    flat, unravel = ravel(params)

    def loss(f):
        p = unravel(f)
        if pieces is None:
            logits = model.apply(p, tokens)
        else:
            state, parts, s = model.initial_state(2), [], 0
            for n in pieces:
                out, state = model.stream(p, tokens[:, s:s + n], state)
                parts.append(out)
                s += n
            logits = anp.concatenate(parts, axis=1)
        return cross_entropy(logits, targets, mask)

    return loss(flat), grad(loss)(flat)


@pytest.mark.parametrize("pieces", [None, [5, 8], [1, 6, 6]])
@pytest.mark.parametrize("model_name", ["gated_delta", "linear_attention"])
def test_appendix_c_eq4_5_model_loss_and_gradient_agree_between_backends(model_name, pieces):
    l_ref, g_ref = model_loss_and_grad(model_name, "reference", pieces)
    l_num, g_num = model_loss_and_grad(model_name, "numba", pieces)
    np.testing.assert_allclose(l_num, l_ref, rtol=1e-12)
    np.testing.assert_allclose(g_num, g_ref, rtol=0, atol=1e-12 * np.abs(g_ref).max())
    assert np.abs(g_ref).max() > 1e-3


@pytest.mark.parametrize("model_name,rule", [("gated_delta", "gated"),
                                             ("linear_attention", "linear")])
def test_baseline_layers_use_the_backend_asked_for(model_name, rule, monkeypatch):
    """backend="numba" sends every matrix-memory layer (apply and stream, forward and
    backward) through the numba recurrence; backend="reference" never touches it."""
    from minititans.kernels import delta_vjp

    calls = []
    real = delta_vjp.delta_rule_batched

    def spy(*args, **kwargs):
        calls.append(kwargs["rule"])
        return real(*args, **kwargs)

    monkeypatch.setattr(delta_vjp, "delta_rule_batched", spy)
    backward = []
    real_backward = delta_vjp._delta_backward
    monkeypatch.setattr(delta_vjp, "_delta_backward",
                        lambda *a: backward.append(1) or real_backward(*a))
    model_loss_and_grad(model_name, "reference", [5, 8])
    model_loss_and_grad(model_name, "reference")
    assert calls == [] and backward == []
    model_loss_and_grad(model_name, "numba")  # 2 layers, apply
    model_loss_and_grad(model_name, "numba", [5, 8])  # 2 layers x 2 pieces, stream
    # each run: the loss, then the loss again under grad (6 forwards), and one backward each
    assert calls == [rule] * 12 and len(backward) == 6
