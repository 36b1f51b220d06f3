"""The Titans (Eqs. 19–31) and the baselines against hand-assembled forwards, causality,
gradients (finite differences; reference vs numba backend)."""

import autograd.numpy as anp
import numpy as np
import pytest
from autograd import grad
from naive_models import naive_forward

from minititans.models import MODEL_NAMES, Model, ModelConfig, apply, init, ravel
from minititans.training import numba_available

TINY = dict(vocab_size=12, d_model=8, num_heads=2, ffn_expansion=2, conv_kernel=3,
            num_persistent=2, window=3, segment_len=4, memory_depth=2, memory_expansion=2,
            chunk_size=1, theta_init=0.05, theta_max=0.2)


def tiny(model, **changes):
    return ModelConfig(model=model, **{**TINY, **changes})


def forward_pair(cfg, seed=0, T=10, **kwargs):
    params = init(np.random.default_rng(seed), cfg)
    tokens = np.random.default_rng(seed + 1).integers(0, cfg.vocab_size, T)
    return apply(params, tokens, cfg), naive_forward(params, tokens, cfg, **kwargs)


def test_eq19_eq11_15_lmm_matches_hand_assembled_forward():
    got, want = forward_pair(tiny("lmm"))
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-10)


def test_eq21_25_mac_order_retrieve_attend_store_gate():
    cfg = tiny("mac")
    got, want = forward_pair(cfg)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-10)
    # the same check fails for a memory updated before attention, or with the input S^(t)
    # instead of the attention output y_t: the test can tell the orders apart
    for wrong in ("store_first", "store_input"):
        _, other = forward_pair(cfg, order=wrong)
        assert np.max(np.abs(other - got)) > 1e-3, wrong


def test_eq21_25_mac_without_memory_causal_mask_matches_naive():
    got, want = forward_pair(tiny("mac", memory_causal=False, segment_len=5))
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-10)


def test_eq26_28_mag_matches_hand_assembled_forward():
    got, want = forward_pair(tiny("mag"))
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-10)


def test_eq29_31_mal_matches_hand_assembled_forward():
    got, want = forward_pair(tiny("mal"))
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("model", ["swa", "transformer", "linear_attention", "gated_delta"])
def test_eq2_eq4_5_baselines_match_hand_assembled_forward(model):
    got, want = forward_pair(tiny(model, num_persistent=0))
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("model", ["linear_attention", "swa"])
def test_eq4_5_eq2_long_sequences_in_chunks_and_bands_match_hand_assembled_forward(model):
    """Past 64 tokens linear attention runs in chunks of 64 and the window in query blocks."""
    got, want = forward_pair(tiny(model, num_persistent=0), T=200)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("changes", [dict(momentum=False), dict(forgetting=False),
                                     dict(memory_depth=1), dict(conv_kernel=0),
                                     dict(max_grad_norm=0.05),
                                     dict(num_persistent=0)])
def test_eq13_14_ablation_switches_match_hand_assembled_forward(changes):
    cfg = tiny("lmm", **changes)
    got, want = forward_pair(cfg)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-10)
    base, _ = forward_pair(tiny("lmm"))
    assert np.max(np.abs(got - base)) > 1e-6  # the switch changes the model


@pytest.mark.parametrize("model", MODEL_NAMES)
def test_every_model_is_causal(model):
    cfg = tiny(model, chunk_size=2)
    params = init(np.random.default_rng(3), cfg)
    rng = np.random.default_rng(4)
    a = rng.integers(0, cfg.vocab_size, 11)
    for t in (1, 5, 8):
        b = a.copy()
        b[t:] = rng.integers(0, cfg.vocab_size, 11 - t)
        la, lb = apply(params, a, cfg), apply(params, b, cfg)
        np.testing.assert_allclose(la[:t], lb[:t], rtol=1e-12, atol=1e-12)


def test_mac_memory_tokens_leak_the_future_without_memory_causal():
    """The caveat of mac_mask: h_t is read with the segment's own queries."""
    cfg = tiny("mac", memory_causal=False)
    params = init(np.random.default_rng(3), cfg)
    a = np.arange(8) % cfg.vocab_size
    b = a.copy()
    b[6] = (b[6] + 1) % cfg.vocab_size
    la, lb = apply(params, a, cfg), apply(params, b, cfg)
    assert np.max(np.abs(la[4:6] - lb[4:6])) > 1e-8  # token 6 changed logits at 4 and 5


def test_batch_apply_equals_one_sequence_at_a_time():
    cfg = tiny("mac", chunk_size=2)
    params = init(np.random.default_rng(0), cfg)
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (3, 9))
    batched = apply(params, tokens, cfg)
    for b in range(3):
        np.testing.assert_allclose(batched[b], apply(params, tokens[b], cfg), rtol=1e-12)


def _loss_fn(cfg, tokens):
    model = Model(cfg)
    flat, unravel = ravel(model.init(np.random.default_rng(0)))

    def loss(theta):
        return anp.mean(model.apply(unravel(theta), tokens) ** 2)

    return loss, flat


@pytest.mark.parametrize("model", ["lmm", "mac", "mag", "mal"])
def test_outer_gradient_matches_finite_differences(model):
    cfg = tiny(model, d_model=4, num_heads=1, num_persistent=1, memory_depth=1)
    loss, flat = _loss_fn(cfg, np.array([1, 2, 3, 4, 5, 6]))
    g = grad(loss)(flat)
    rng = np.random.default_rng(0)
    for _ in range(3):  # central differences along random unit directions
        u = rng.standard_normal(flat.shape)
        u /= np.linalg.norm(u)
        eps = 1e-5
        numeric = (loss(flat + eps * u) - loss(flat - eps * u)) / (2 * eps)
        assert g @ u == pytest.approx(numeric, rel=1e-6, abs=1e-9)


@pytest.mark.skipif(not numba_available(), reason="the numba memory scan has no gradient here")
@pytest.mark.parametrize("model", ["lmm", "mac", "mag", "mal"])
@pytest.mark.parametrize("chunk_size", [1, 2])
def test_reference_and_numba_backends_give_the_same_gradients(model, chunk_size):
    tokens = np.random.default_rng(5).integers(0, 12, (2, 9))
    grads = {}
    for backend in ("reference", "numba"):
        loss, flat = _loss_fn(tiny(model, chunk_size=chunk_size, backend=backend), tokens)
        grads[backend] = (loss(flat), grad(loss)(flat))
    np.testing.assert_allclose(grads["numba"][0], grads["reference"][0], rtol=1e-10)
    np.testing.assert_allclose(grads["numba"][1], grads["reference"][1], rtol=1e-7,
                               atol=1e-10)


def test_config_checks_and_json_round_trip():
    cfg = tiny("mag", momentum=False)
    assert ModelConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="model"):
        ModelConfig(model="mamba")
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(d_model=10, num_heads=3)
    with pytest.raises(ValueError, match="tokens must be in"):
        apply(init(np.random.default_rng(0), cfg), np.array([0, 99]), cfg)


@pytest.mark.parametrize("model", ["lmm", "mac", "mag", "mal"])
def test_eqs16_18_chunked_models_match_a_hand_assembled_chunked_forward(model):
    """The models run the chunk size of their config: a chunked oracle (plain loops, surprise
    at the chunk-start weights) agrees, and the token-loop oracle does not. MAC's chunks
    start again with each segment (5 tokens: chunks of 4 and 1)."""
    cfg = tiny(model, chunk_size=4, alpha_init=0.2, theta_init=0.08,
               **({"segment_len": 5} if model == "mac" else {}))
    got, want = forward_pair(cfg, T=13)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-10)
    params = init(np.random.default_rng(0), cfg)
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, 13)
    token_loop = naive_forward(params, tokens, cfg.with_(chunk_size=1))
    assert np.max(np.abs(got - token_loop)) > 1e-6


@pytest.mark.parametrize("backend", ["reference", "numba"])
def test_models_run_the_memory_backend_of_their_config(backend, monkeypatch):
    import minititans.memory.scan as scan
    import minititans.models.blocks as blocks

    calls = []

    def spy(real):
        def run(*args, **kwargs):
            calls.append(1)
            return real(*args, **kwargs)
        return run

    monkeypatch.setattr(scan, "numba_memory_scan", spy(scan.numba_memory_scan))
    monkeypatch.setattr(blocks, "numba_memory_scan_batched",  # a batch at once
                        spy(blocks.numba_memory_scan_batched))
    cfg = tiny("lmm", backend=backend)
    apply(init(np.random.default_rng(0), cfg), np.arange(6) % cfg.vocab_size, cfg)
    assert bool(calls) == (backend == "numba")


@pytest.mark.skipif(not numba_available(), reason="the numba memory scan has no gradient here")
@pytest.mark.parametrize("model", ["lmm", "mac", "mag", "mal"])
def test_numba_models_scan_the_batch_at_once_with_the_numbers_of_one_scan_per_sequence(
        model, monkeypatch):
    """On the numba backend a model's batch is one differentiable scan (one batched
    MemoryState); the loss and its gradient equal one ``memory_scan`` per sequence."""
    import minititans.models.blocks as blocks
    import minititans.models.mac as mac

    cfg = tiny(model, backend="numba", chunk_size=2, anchored_memory=True, max_grad_norm=1.0)
    tokens = np.random.default_rng(7).integers(0, cfg.vocab_size, (3, 11))
    loss, flat = _loss_fn(cfg, tokens)
    calls = []
    real = blocks.numba_memory_scan_batched
    monkeypatch.setattr(blocks, "numba_memory_scan_batched",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    batched = loss(flat), grad(loss)(flat)
    assert calls  # the batched scan ran
    for module in (blocks, mac):
        monkeypatch.setattr(module, "batched_scan", lambda cfg, x: False)
    calls.clear()
    per_sequence = loss(flat), grad(loss)(flat)
    assert not calls
    assert batched[0] == pytest.approx(per_sequence[0], rel=1e-13)
    np.testing.assert_allclose(batched[1], per_sequence[1], rtol=1e-10,
                               atol=1e-12 * np.abs(per_sequence[1]).max())
