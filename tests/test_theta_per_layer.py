"""A step size per memory layer: the per-layer data-dependent theta of the NeurIPS version's
Appendix B.3, ``theta`` of shape ``(T, L)`` in Eq. 14 (S_t = eta_t S_{t-1} - theta_{t,i} u_{t,i}
for layer i). Checked against plain loops, against the per-token theta it generalises, and
the numba gradients against autograd through the reference."""


import autograd.numpy as anp
import numpy as np
import pytest
from gate_columns import (
    bad_columns_are_refused,
    batched_is_one_by_one,
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
from minititans.memory.scan import numba_memory_scan, numba_memory_scan_batched


def _problem(rng, T=9, d=3, depth=2, anchored=False):
    """A scan whose step differs for every memory layer."""
    return problem(rng, T, d, depth, anchored, theta_per_layer=True)


@pytest.mark.parametrize("backend,chunk_size", [("reference", 1), ("numba", 1),
                                                ("reference", 4)])
@pytest.mark.parametrize("read", ["after", "before"])
@pytest.mark.parametrize("depth,anchored", [(2, False), (3, False), (2, True)])
def test_appendix_b3_eq14_theta_per_layer_matches_plain_loops(rng, backend, chunk_size, read,
                                                             depth, anchored):
    state, K, V, Q, alpha, eta, theta = _problem(rng, depth=depth, anchored=anchored)
    state, out = scan_matches_plain_loops(state, K, V, Q, alpha, eta, theta, backend=backend,
                                          chunk_size=chunk_size, read=read)
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


@needs_numba
@pytest.mark.parametrize("max_grad_norm", [None, 0.3], ids=["unclipped", "clipped"])
@pytest.mark.parametrize("read", ["after", "before"])
@pytest.mark.parametrize("depth,anchored", [(2, False), (3, True)])
def test_appendix_b3_theta_per_layer_vjp_matches_autograd_through_reference(
        rng, max_grad_norm, read, depth, anchored):
    problem = _problem(rng, depth=depth, anchored=anchored)
    state, rest = problem[0], problem[1:]
    if max_grad_norm is not None:  # the clip must be active on most tokens
        problem_scale = [np.linalg.norm(np.concatenate([g.ravel() for g in u]))
                         for u in [mt.surprise(state.params, K[None], V[None])
                                   for K, V in zip(rest[0], rest[1])]]
        assert np.mean(np.array(problem_scale) > max_grad_norm) > 0.5
    vjp_matches_reference(problem, read=read, max_grad_norm=max_grad_norm)


@needs_numba
def test_appendix_b3_batched_scan_with_theta_per_layer_is_each_sequences_own(rng):
    B, T, d, depth = 3, 7, 3, 2
    problems = [_problem(rng, T, d, depth) for _ in range(B)]
    batch, rows = stacked(problems)
    theta = rows[5]
    assert theta.shape == (B, T, depth)

    def batched(theta):
        return numba_memory_scan_batched(batch, *rows[:5], theta)[0]

    def one_by_one(theta):
        return anp.stack([numba_memory_scan(p[0], *p[1:6], theta[s])[0]
                          for s, p in enumerate(problems)])

    batched_is_one_by_one(rng, batched, one_by_one, theta)


def test_theta_per_layer_bad_input_is_a_clear_error(rng):
    state, K, V, Q, alpha, eta, theta = _problem(rng, depth=2)
    scan = lambda th, **k: mt.memory_scan(state, K, V, Q, alpha=alpha, eta=eta,  # noqa: E731
                                          theta=th, **k)
    with pytest.raises(ValueError, match=r"theta must be a float, have shape \(9,\), or have "
                                         r"shape \(9, 2\)"):
        scan(np.full((9, 3), 0.1))  # three columns for a two-layer memory
    bad_columns_are_refused(scan, theta, "theta")


# --- in the models: ModelConfig(theta_per_layer=True) ---------------------------------------


from minititans.models import Model, ModelConfig  # noqa: E402

TINY = dict(vocab_size=12, d_model=8, num_heads=2, ffn_expansion=2, conv_kernel=3,
            num_persistent=2, window=3, segment_len=4, memory_depth=2, memory_expansion=2,
            chunk_size=1, theta_init=0.05, theta_max=0.2, theta_per_layer=True)


def _model(model, **changes):
    """A model with theta per layer whose layers' steps start apart (-2 and +1 logits)."""
    m = Model(ModelConfig(model=model, **{**TINY, **changes}))
    params = m.init(np.random.default_rng(0))
    for g in gate_dicts(params):
        assert np.shape(g["w_theta"]) == (8, m.config.memory_depth)
        g["b_theta"] = g["b_theta"] + np.linspace(-2.0, 1.0, m.config.memory_depth)
        g["w_theta"] = g["w_theta"] * 30  # and depend on the token
    return m, params


@pytest.mark.parametrize("chunk_size", [1, 4])
@pytest.mark.parametrize("model", ["lmm", "mac", "mag", "mal"])
def test_appendix_b3_models_with_theta_per_layer_match_the_hand_assembled_forward(
        model, chunk_size):
    m, params = _model(model, chunk_size=chunk_size, memory_depth=3)
    matches_the_hand_assembled_forward(m, params, "theta", "theta_per_layer")


@pytest.mark.parametrize("model", ["lmm", "mac"])
def test_theta_per_layer_models_stream_in_pieces_as_one_apply(model):
    streams_as_one_apply(*_model(model, chunk_size=3))


@needs_numba
@pytest.mark.parametrize("model", ["lmm", "mac", "mag", "mal"])
def test_theta_per_layer_models_numba_gradients_equal_the_reference(model):
    numba_model_gradients_equal_reference(
        lambda backend: _model(model, backend=backend, max_grad_norm=0.5))


def test_theta_per_layer_config_is_checked():
    with pytest.raises(ValueError, match="theta_per_layer needs a deep memory"):
        ModelConfig(memory_depth=1, theta_per_layer=True)
    with pytest.raises(ValueError, match="chunk_size=1 on the numba backend"):
        ModelConfig(theta_per_layer=True, backend="numba", chunk_size=16)
    cfg = ModelConfig(theta_per_layer=True, chunk_size=1)
    assert ModelConfig.from_json(cfg.to_json()) == cfg
