"""Channel-wise forgetting (the NeurIPS version): ``alpha`` of shape ``(T, C)`` in Eq. 13, a
rate per output channel of every memory layer, ``C`` the layers' output widths summed. Column
j of layer i keeps 1 - alpha_{t,c} of itself (c = the widths of the layers before i, plus j):
M_t[:, j] = (1 - alpha_{t,c}) M_{t-1}[:, j] + S_t[:, j] (around the anchor when there is one).
Checked against plain loops, against the per-token alpha it generalises, and the numba
gradients against autograd through the reference."""

import copy

import autograd.numpy as anp
import numpy as np
import pytest
from autograd import grad
from gate_columns import (
    bad_columns_are_refused,
    batched_is_one_by_one,
    dicts_with,
    gate_dicts,
    matches_the_hand_assembled_forward,
    needs_numba,
    numba_model_gradients_equal_reference,
    problem,
    scan_matches_plain_loops,
    stacked,
    streams_as_one_apply,
    vjp_matches_reference,
)

import minititans as mt
from minititans.memory.scan import numba_memory_scan, numba_memory_scan_batched, output_channels


def _problem(rng, T=9, d=3, depth=2, anchored=False, theta_per_layer=False):
    """A scan whose forgetting rate differs for every output channel."""
    return problem(rng, T, d, depth, anchored, alpha_per_channel=True,
                   theta_per_layer=theta_per_layer)


@pytest.mark.parametrize("backend,chunk_size", [("reference", 1), ("numba", 1),
                                                ("reference", 4)])
@pytest.mark.parametrize("read", ["after", "before"])
@pytest.mark.parametrize("depth,anchored", [(1, False), (2, False), (3, False), (2, True)])
def test_channelwise_eq13_alpha_per_channel_matches_plain_loops(rng, backend, chunk_size, read,
                                                                depth, anchored):
    state, K, V, Q, alpha, eta, theta = _problem(rng, depth=depth, anchored=anchored)
    state, out = scan_matches_plain_loops(state, K, V, Q, alpha, eta, theta, backend=backend,
                                          chunk_size=chunk_size, read=read)
    # the channels' rates differ, so one rate per token would not give this
    per_token, _ = mt.memory_scan(state, K, V, Q, alpha=alpha[:, 0], eta=eta, theta=theta,
                                  chunk_size=chunk_size, read=read, backend=backend)
    assert np.abs(per_token - out).max() > 1e-4


@pytest.mark.parametrize("anchored", [False, True])
@pytest.mark.parametrize("backend", ["reference", "numba"])
def test_channelwise_equal_columns_are_one_alpha_per_token(rng, backend, anchored):
    state, K, V, Q, alpha, eta, theta = _problem(rng, depth=3, anchored=anchored)
    one = alpha[:, 0]
    C = alpha.shape[1]
    both = [mt.memory_scan(state, K, V, Q, alpha=a, eta=eta, theta=theta, backend=backend,
                           max_grad_norm=0.5) for a in (one, np.repeat(one[:, None], C, 1))]
    np.testing.assert_array_equal(both[0][0], both[1][0])  # the same arithmetic, exactly
    for a, b in zip([*both[0][1].params, *both[0][1].momentum],
                    [*both[1][1].params, *both[1][1].momentum]):
        np.testing.assert_array_equal(a, b)


@needs_numba
@pytest.mark.parametrize("max_grad_norm", [None, 0.3], ids=["unclipped", "clipped"])
@pytest.mark.parametrize("read", ["after", "before"])
@pytest.mark.parametrize("depth,anchored,theta_per_layer", [(1, False, False), (2, False, False),
                                                            (3, True, False), (2, True, True)])
def test_channelwise_alpha_vjp_matches_autograd_through_reference(
        rng, max_grad_norm, read, depth, anchored, theta_per_layer):
    problem = _problem(rng, depth=depth, anchored=anchored, theta_per_layer=theta_per_layer)
    vjp_matches_reference(problem, read=read, max_grad_norm=max_grad_norm)


@needs_numba
def test_channelwise_anchor_gradient_matches_autograd_through_reference(rng):
    """The anchor's cotangent, sum_t alpha_{t,c} M̄_t[:, c], column by column."""
    state, K, V, Q, alpha, eta, theta = _problem(rng, depth=2, anchored=True)
    c = rng.standard_normal(K.shape)

    def f(anchor, backend):
        s = mt.MemoryState(state.params, state.momentum, anchor)
        out, new = mt.memory_scan(s, K, V, Q, alpha=alpha, eta=eta, theta=theta,
                                  backend=backend)
        return anp.sum(c * out) + anp.sum(new.params[1])

    for g, w in zip(grad(f)(state.anchor, "numba"), grad(f)(state.anchor, "reference")):
        np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-12)


@needs_numba
def test_channelwise_batched_scan_is_each_sequences_own(rng):
    B, T, d, depth = 3, 7, 3, 2
    problems = [_problem(rng, T, d, depth) for _ in range(B)]
    batch, rows = stacked(problems)
    alpha = rows[3]
    assert alpha.shape == (B, T, output_channels(problems[0][0].params))

    def batched(alpha):
        return numba_memory_scan_batched(batch, *rows[:3], alpha, *rows[4:])[0]

    def one_by_one(alpha):
        return anp.stack([numba_memory_scan(p[0], *p[1:4], alpha[s], *p[5:7])[0]
                          for s, p in enumerate(problems)])

    batched_is_one_by_one(rng, batched, one_by_one, alpha)


def test_channelwise_alpha_bad_input_is_a_clear_error(rng):
    state, K, V, Q, alpha, eta, theta = _problem(rng, depth=2)
    C = alpha.shape[1]
    scan = lambda a, **k: mt.memory_scan(state, K, V, Q, alpha=a, eta=eta,  # noqa: E731
                                         theta=theta, **k)
    with pytest.raises(ValueError, match=rf"alpha must be a float, have shape \(9,\), or have "
                                         rf"shape \(9, {C}\) \(a rate per output channel"):
        scan(np.full((9, 3), 0.1))  # the last layer's channels only
    with pytest.raises(ValueError, match="alpha must be <= 1.0"):
        scan(alpha + 1.0)
    bad_columns_are_refused(scan, alpha, "alpha")
    B = 2
    batch = mt.MemoryState(state.params.like([np.stack([w] * B) for w in state.params]),
                           state.params.like([np.zeros((B,) + w.shape) for w in state.params]))
    rows = [np.stack([x] * B) for x in (K, V, Q)]
    with pytest.raises(ValueError, match=rf"alpha must be a float or have shape \(2, 9\) or "
                                         rf"\(2, 9, {C}\)"):
        numba_memory_scan_batched(batch, *rows, np.zeros((B, 9, 4)), 0.5, 0.1)


# --- in the models: ModelConfig(alpha_per_channel=True) -------------------------------------


from minititans.models import Model, ModelConfig  # noqa: E402
from minititans.models.blocks import alpha_columns  # noqa: E402

TINY = dict(vocab_size=12, d_model=8, num_heads=2, ffn_expansion=2, conv_kernel=3,
            num_persistent=2, window=3, segment_len=4, memory_depth=2, memory_expansion=2,
            chunk_size=1, alpha_init=0.05, alpha_per_channel=True)


def _model(model, **changes):
    """A model with a rate per channel whose channels start apart (logits -3 to 0) and
    depend on the token."""
    m = Model(ModelConfig(model=model, **{**TINY, **changes}))
    params = m.init(np.random.default_rng(0))
    C = alpha_columns(m.config)
    assert C == output_channels(next(iter(_memories(params))))
    for g in gate_dicts(params):
        assert np.shape(g["w_alpha"]) == (8, C) and np.shape(g["b_alpha"]) == (C,)
        g["b_alpha"] = g["b_alpha"] + np.linspace(-3.0, 0.0, C)
        g["w_alpha"] = g["w_alpha"] * 30
    return m, params


def _memories(tree):
    return (p["M0"] for p in dicts_with(tree, "M0"))


@pytest.mark.parametrize("chunk_size,depth", [(1, 1), (1, 3), (4, 2)])
@pytest.mark.parametrize("model", ["lmm", "mac", "mag", "mal"])
def test_channelwise_models_match_the_hand_assembled_forward(model, chunk_size, depth):
    m, params = _model(model, chunk_size=chunk_size, memory_depth=depth)
    matches_the_hand_assembled_forward(m, params, "alpha", "alpha_per_channel")


@pytest.mark.parametrize("model", ["lmm", "mac"])
def test_channelwise_models_stream_in_pieces_as_one_apply(model):
    streams_as_one_apply(*_model(model, chunk_size=3, theta_per_layer=True))


@needs_numba
@pytest.mark.parametrize("model", ["lmm", "mac", "mag", "mal"])
def test_channelwise_models_numba_gradients_equal_the_reference(model):
    numba_model_gradients_equal_reference(lambda backend: _model(
        model, backend=backend, max_grad_norm=0.5, anchored_memory=True))


def test_channelwise_without_forgetting_forgets_nothing():
    """``forgetting=False`` (the "w/o weight decay" ablation) zeroes every channel's rate."""
    m, params = _model("lmm", forgetting=False)
    tokens = np.random.default_rng(3).integers(0, 12, (2, 7))
    off = Model(m.config.with_(alpha_per_channel=False))
    one = copy.deepcopy(params)
    for g in gate_dicts(one):
        g["w_alpha"], g["b_alpha"] = g["w_alpha"][:, 0], float(g["b_alpha"][0])
    np.testing.assert_allclose(m.apply(params, tokens), off.apply(one, tokens), rtol=1e-12,
                               atol=1e-13)
    state, outs = m.initial_state(2), []
    for lo, hi in ((0, 3), (3, 7)):
        y, state = m.stream(params, tokens[:, lo:hi], state)
        outs.append(y)
    np.testing.assert_allclose(np.concatenate(outs, axis=1), m.apply(params, tokens),
                               rtol=1e-10, atol=1e-12)


def test_alpha_per_channel_config_is_checked():
    with pytest.raises(ValueError, match="alpha_per_channel needs chunk_size=1 on the numba "
                                         "backend"):
        ModelConfig(alpha_per_channel=True, backend="numba", chunk_size=16)
    cfg = ModelConfig(alpha_per_channel=True, chunk_size=1)
    assert ModelConfig.from_json(cfg.to_json()) == cfg
    for depth in (1, 2, 3):  # the gate's columns are the memory's output channels
        cfg = ModelConfig(d_model=8, memory_depth=depth, alpha_per_channel=True)
        M0 = next(iter(_memories(Model(cfg).init(np.random.default_rng(0)))))
        assert alpha_columns(cfg) == output_channels(M0)
    assert alpha_columns(ModelConfig(d_model=16, memory_depth=1, alpha_per_channel=True)) == 16
    assert alpha_columns(ModelConfig(d_model=16, memory_depth=3, memory_expansion=2,
                                     alpha_per_channel=True)) == 2 * 32 + 16
    assert alpha_columns(ModelConfig(d_model=16, memory_depth=3)) == 1


def test_channelwise_memory_step_is_one_token_of_the_scan(rng):
    """``memory_step`` takes one token's row: alpha ``(C,)``, theta ``(L,)``."""
    state, K, V, Q, alpha, eta, _ = _problem(rng, T=1, depth=2, anchored=True)
    theta = np.array([0.05, 0.12])
    one = mt.memory_step(state, K[0], V[0], alpha=alpha[0], eta=eta[0], theta=theta)
    _, scan = mt.memory_scan(state, K, V, Q, alpha=alpha, eta=eta, theta=theta[None])
    for a, b in zip([*one.params, *one.momentum], [*scan.params, *scan.momentum]):
        np.testing.assert_allclose(a, b, rtol=1e-14, atol=1e-15)
    C = alpha.shape[1]
    with pytest.raises(ValueError, match=rf"alpha must be a float or have shape \({C},\) \(a "
                                         "rate per output channel"):
        mt.memory_step(state, K[0], V[0], alpha=alpha[0, :3], eta=0.9, theta=0.1)
    with pytest.raises(ValueError, match=r"theta must be a float or have shape \(2,\) \(a step "
                                         "per memory layer"):
        mt.memory_step(state, K[0], V[0], alpha=0.1, eta=0.9, theta=np.full(3, 0.1))
    with pytest.raises(ValueError, match="alpha must be <= 1.0"):
        mt.memory_step(state, K[0], V[0], alpha=alpha[0] + 1.0, eta=0.9, theta=0.1)
