"""Streaming every model in pieces equals one ``apply`` on the whole; the state; generation.

The memory's chunks (Eqs. 16–18), MAC's segments (Eqs. 21–25), the attention window
(Eqs. 27, 31) and the convolutions (Section 4.4) all cut the sequence; these tests check
that a piece may end anywhere and the next one continues exactly, against ``apply`` and
against a naive token-by-token decoder (``tests/naive_models.py``).
"""

import tracemalloc

import autograd.numpy as anp
import autograd.tracer
import numpy as np
import pytest
from autograd import grad
from naive_models import NaiveDecoder

from minititans.models import MODEL_NAMES, Model, ModelConfig, blocks, ravel, sample, tree_leaves
from minititans.training import numba_available

TINY = dict(vocab_size=12, d_model=8, num_heads=2, ffn_expansion=2, conv_kernel=3,
            num_persistent=2, window=3, segment_len=4, memory_depth=2, memory_expansion=2,
            chunk_size=1, theta_init=0.05, theta_max=0.2, num_layers=2)
EXACT = 1e-12  # float64: only the order of floating-point sums differs
SPLITS = [[13], [1] * 13, [5, 8], [2, 3, 1, 7], [4, 4, 5], [3, 10], [6, 6, 1]]


def tiny(model, **changes):
    return ModelConfig(model=model, **{**TINY, **changes})


def setup(cfg, seed=0, B=2, T=13):
    model = Model(cfg)
    params = model.init(np.random.default_rng(seed))
    # a learned M_0 that is not zero, so the memory's own weights matter from the start
    M0 = params["layers"][0]["mixer"].get("memory", {}).get("M0")
    if M0 is not None:
        params["layers"][0]["mixer"]["memory"]["M0"] = M0.like(
            w + 0.3 * np.random.default_rng(seed + 9).standard_normal(w.shape) for w in M0)
    tokens = np.random.default_rng(seed + 1).integers(0, cfg.vocab_size, (B, T))
    return model, params, tokens


def run_pieces(model, params, tokens, sizes):
    state = model.initial_state(tokens.shape[0])
    outs, s = [], 0
    for n in sizes:
        logits, state = model.stream(params, tokens[:, s:s + n], state)
        outs.append(logits)
        s += n
    assert s == tokens.shape[1]
    return np.concatenate(outs, axis=1), state


def max_diff(a, b):
    d = np.abs(np.asarray(a, dtype=float) - np.asarray(b, dtype=float))
    return float(d.max()) if d.size else 0.0


@pytest.mark.parametrize("chunk_size", [1, 3])
@pytest.mark.parametrize("model", MODEL_NAMES)
def test_stream_pieces_equal_apply_on_the_whole_any_split(model, chunk_size):
    """Eqs. 16–18 and 21-25 cut the sequence; pieces that end anywhere (inside a memory
    chunk of 3, inside a MAC segment of 4, one token at a time) give apply's logits."""
    m, params, tokens = setup(tiny(model, chunk_size=chunk_size))
    whole = m.apply(params, tokens)
    for sizes in SPLITS:
        got, _ = run_pieces(m, params, tokens, sizes)
        assert max_diff(got, whole) < EXACT, sizes


@pytest.mark.parametrize("model", MODEL_NAMES)
def test_stream_state_does_not_depend_on_the_piece_sizes(model):
    m, params, tokens = setup(tiny(model, chunk_size=3))
    _, ref = run_pieces(m, params, tokens, [13])
    for sizes in SPLITS[1:4]:
        _, state = run_pieces(m, params, tokens, sizes)
        assert int(state["t"]) == 13
        for a, b in zip(tree_leaves(state), tree_leaves(ref), strict=True):
            assert np.shape(a) == np.shape(b)
            assert max_diff(a, b) < EXACT, sizes
    # and the state continues: 13 tokens then 4 more equal apply on all 17
    more = np.random.default_rng(5).integers(0, 12, (2, 4))
    logits, _ = m.stream(params, more, ref)
    whole = m.apply(params, np.concatenate([tokens, more], axis=1))
    assert max_diff(logits, whole[:, 13:]) < EXACT


@pytest.mark.parametrize("model", MODEL_NAMES)
def test_stream_token_by_token_matches_naive_recurrent_decoder(model):
    """One token per call against a decoder that keeps explicit lists of past keys, conv
    inputs and the MemoryState (memory_step, Eqs. 13–14), written from the equations."""
    cfg = tiny(model, num_layers=1)
    m, params, tokens = setup(cfg, B=1, T=9)
    naive = NaiveDecoder(params, cfg)
    state = m.initial_state(1)
    for t in range(9):
        logits, state = m.stream(params, tokens[0, t:t + 1], state)
        assert max_diff(logits[0], naive.step(tokens[0, t])) < 1e-10, t


def test_stream_batch_of_two_equals_each_sequence_alone():
    m, params, tokens = setup(tiny("mac", chunk_size=3))
    both, _ = run_pieces(m, params, tokens, [5, 8])
    for b in range(2):
        alone, _ = run_pieces(m, params, tokens[b:b + 1], [5, 8])
        assert max_diff(both[b], alone[0]) < EXACT
    one, _ = m.stream(params, tokens[0], m.initial_state(1))  # a 1-D piece: (T, V)
    assert one.shape == (13, 12) and max_diff(one, both[0]) < EXACT


def test_mac_without_memory_causal_streams_exactly_at_segment_boundaries_only():
    """memory_causal=False lets a token see memory tokens read with later queries of its
    segment (mac_mask's caveat): pieces that end inside a segment cannot see them."""
    m, params, tokens = setup(tiny("mac", memory_causal=False, chunk_size=2), T=12)
    whole = m.apply(params, tokens)
    at_boundaries, _ = run_pieces(m, params, tokens, [4, 8])
    assert max_diff(at_boundaries, whole) < EXACT
    inside, _ = run_pieces(m, params, tokens, [6, 6])
    assert max_diff(inside[:, 4:6], whole[:, 4:6]) > 1e-6


def test_stream_is_differentiable_and_gives_apply_gradient():
    """Truncated backprop through two pieces = the gradient of apply on the whole."""
    m, params, tokens = setup(tiny("mag", chunk_size=2, num_layers=1), T=8)
    flat, unravel = ravel(params)

    def loss_apply(theta):
        return anp.sum(m.apply(unravel(theta), tokens) ** 2)

    def loss_stream(theta):
        a, state = m.stream(unravel(theta), tokens[:, :3], m.initial_state(2))
        b, _ = m.stream(unravel(theta), tokens[:, 3:], state)
        return anp.sum(a ** 2) + anp.sum(b ** 2)

    g = grad(loss_apply)(flat)
    assert np.linalg.norm(g) > 1e-3
    assert max_diff(grad(loss_stream)(flat), g) < 1e-10


# --- the forward-only path ------------------------------------------------------------------


def count_boxes(monkeypatch):
    calls = []
    real = autograd.tracer.new_box

    def counting(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(autograd.tracer, "new_box", counting)
    return calls


@pytest.mark.parametrize("model", ["swa", "transformer", "linear_attention", "gated_delta"])
def test_forward_only_baselines_build_no_autograd_graph(model, monkeypatch):
    """Plain arrays in, plain NumPy all the way (no box); the Titans' reference memory
    takes its inner gradient (Eq. 8) with autograd, so for them see the numba test below."""
    m, params, tokens = setup(tiny(model))
    calls = count_boxes(monkeypatch)
    got, _ = run_pieces(m, params, tokens, [5, 8])
    assert not calls
    monkeypatch.undo()
    assert max_diff(got, m.apply(params, tokens)) < EXACT


@pytest.mark.skipif(not numba_available(), reason="needs numba")
@pytest.mark.parametrize("model", ["lmm", "mac", "mag", "mal", "swa", "linear_attention",
                                   "gated_delta"])
def test_forward_only_numba_path_builds_no_graph_and_equals_the_differentiable_one(
        model, monkeypatch):
    cfg = tiny(model, chunk_size=2)
    m, params, tokens = setup(cfg)
    ref, _ = run_pieces(m, params, tokens, [5, 8])  # reference backend
    fast = Model(cfg.with_(backend="numba"))
    monkeypatch.setattr(blocks, "NUMBA_ATTENTION_MIN_KEYS", 0)  # the kernel at any length
    calls = count_boxes(monkeypatch)
    got, _ = run_pieces(fast, params, tokens, [5, 8])
    whole = fast.apply(params, tokens)
    assert not calls  # no autograd box was created: no graph
    assert max_diff(got, ref) < 1e-10 and max_diff(whole, ref) < 1e-10
    # the differentiable numba path (params boxed by grad) computes the same logits
    seen = {}
    flat, unravel = ravel(params)

    def loss(theta):
        out = fast.apply(unravel(theta), tokens)
        seen["logits"] = autograd.tracer.getval(out)
        return anp.sum(out)

    monkeypatch.undo()
    grad(loss)(flat)
    assert max_diff(seen["logits"], whole) < 1e-12


@pytest.mark.parametrize("model,backend", [("swa", "reference"), ("swa", "numba"),
                                           ("mal", "numba"), ("linear_attention", "reference"),
                                           ("linear_attention", "numba"),
                                           ("gated_delta", "numba")])
def test_windowed_models_evaluate_16384_tokens_without_a_T_by_T_matrix(model, backend):
    """A float64 (T, T) matrix at T = 16,384 is 2 GB (its boolean mask 268 MB); the banded
    attention (or its numba twin) needs a few MB, and so does linear attention in chunks.
    Checked by the peak of traced allocations."""
    if backend == "numba" and not numba_available():
        pytest.skip("needs numba")
    cfg = tiny(model, d_model=4, num_heads=1, num_layers=1, ffn_expansion=0, window=8,
               chunk_size=16, theta_init=0.02, theta_max=0.1, max_grad_norm=1.0,
               backend=backend)
    m = Model(cfg)
    params = m.init(np.random.default_rng(0))
    tokens = np.random.default_rng(1).integers(0, 12, 16384)
    tracemalloc.start()
    try:
        logits = m.apply(params, tokens)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 100e6, f"peak {peak / 1e6:.0f} MB"
    # the last rows against streaming the tail after the head (the window carries over)
    head, state = m.stream(params, tokens[:16000], m.initial_state(1))
    tail, _ = m.stream(params, tokens[16000:], state)
    assert max_diff(tail, logits[16000:]) < 1e-10
    assert max_diff(head[-5:], logits[15995:16000]) < 1e-10


# --- bad input ------------------------------------------------------------------------------


def test_stream_rejects_a_state_of_another_batch_size_model_or_config():
    m, params, tokens = setup(tiny("mag", chunk_size=3))
    with pytest.raises(ValueError, match="state was made for batch size 3, but the tokens "
                                         "have batch size 2"):
        m.stream(params, tokens, m.initial_state(3))
    with pytest.raises(ValueError, match="batch size 2, but the tokens have batch size 1"):
        m.stream(params, tokens[0], m.initial_state(2))
    with pytest.raises(ValueError, match="state does not fit the model"):
        m.stream(params, tokens, Model(tiny("swa")).initial_state(2))
    other = Model(tiny("mag", chunk_size=3, window=5)).initial_state(2)
    _, s5 = Model(tiny("mag", chunk_size=3, window=5)).stream(
        Model(tiny("mag", chunk_size=3, window=5)).init(np.random.default_rng(0)), tokens, other)
    with pytest.raises(ValueError, match=r"state does not fit the model .* after 13 tokens"):
        m.stream(params, tokens, s5)  # a cache of 4 rows where this window keeps 2
    _, state = m.stream(params, tokens, m.initial_state(2))
    with pytest.raises(ValueError, match=r"state\['t'\] must be an integer >= 0"):
        m.stream(params, tokens, {**state, "t": np.asarray(-1)})
    with pytest.raises(TypeError, match="state must be the dict returned by initial_state"):
        m.stream(params, tokens, [state])
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        m.initial_state(0)


# --- generation -----------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["lmm", "mac", "mag", "mal", "swa", "transformer",
                                   "linear_attention", "gated_delta"])
def test_greedy_generation_equals_argmax_over_repeated_whole_sequence_apply(model):
    m, params, tokens = setup(tiny(model, chunk_size=3, num_layers=1), B=2, T=5)
    got = m.generate(params, tokens, 7, np.random.default_rng(0), top_k=1)
    seq = tokens
    for _ in range(7):
        nxt = np.argmax(m.apply(params, seq)[:, -1], axis=-1)
        seq = np.concatenate([seq, nxt[:, None]], axis=1)
    np.testing.assert_array_equal(got, seq[:, 5:])
    assert got.shape == (2, 7) and got.dtype == np.int64
    one = m.generate(params, tokens[1], 7, np.random.default_rng(0), top_k=1)
    np.testing.assert_array_equal(one, got[1])


def test_sampling_follows_softmax_of_logits_over_temperature_within_top_k():
    logits = np.array([[2.0, 1.0, 0.0, -1.0, 0.5]])
    rng = np.random.default_rng(0)
    n = 40000
    for temperature, top_k in [(1.0, None), (0.5, None), (2.0, 3)]:
        draws = sample(np.repeat(logits, n, axis=0), rng, temperature, top_k)  # n rows
        z = logits[0] / temperature
        if top_k is not None:
            z = np.where(z >= np.sort(z)[-top_k], z, -np.inf)
        p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        freq = np.bincount(draws, minlength=5) / n
        np.testing.assert_allclose(freq, p, atol=0.01)  # ~4 standard errors at n = 40000
    assert (sample(np.array([[0.0, 3.0, 1.0]] * 4), rng, 1.0, 1) == 1).all()


def test_generation_is_reproducible_and_stays_in_the_top_k():
    m, params, tokens = setup(tiny("mal", chunk_size=2, num_layers=1), B=1, T=4)
    a = m.generate(params, tokens[0], 10, np.random.default_rng(3), temperature=1.5, top_k=3)
    b = m.generate(params, tokens[0], 10, np.random.default_rng(3), temperature=1.5, top_k=3)
    np.testing.assert_array_equal(a, b)
    seq = np.concatenate([tokens[0], a])
    logits = m.apply(params, seq)
    for i, tok in enumerate(a):  # token i was drawn from the logits at position 3 + i
        assert tok in np.argsort(logits[3 + i])[-3:]
    assert m.generate(params, tokens[0], 0, np.random.default_rng(0)).shape == (0,)


def test_generate_bad_inputs_name_the_argument():
    m, params, tokens = setup(tiny("swa"), B=1, T=4)
    rng = np.random.default_rng(0)
    cases = [(dict(num_tokens=-1), ValueError, "num_tokens must be >= 0"),
             (dict(num_tokens=2.0), TypeError, "num_tokens must be an int"),
             (dict(temperature=0.0), ValueError, "temperature must be a finite float > 0"),
             (dict(temperature=-1.0), ValueError, "temperature must be a finite float > 0"),
             (dict(temperature=float("nan")), ValueError, "temperature"),
             (dict(top_k=0), ValueError, "top_k must be >= 1"),
             (dict(top_k=13), ValueError, "top_k must be <= vocab_size=12"),
             (dict(rng=0), TypeError, "rng must be a numpy.random.Generator")]
    for change, error, message in cases:
        kwargs = dict(num_tokens=3, rng=rng, temperature=1.0, top_k=None) | change
        with pytest.raises(error, match=message):
            m.generate(params, tokens[0], **kwargs)
    with pytest.raises(ValueError, match=r"prompt must be in \[0, 12\)"):
        m.generate(params, np.array([0, 12]), 3, rng)
    with pytest.raises(ValueError, match="prompt must have shape"):
        m.generate(params, np.zeros((1, 0), dtype=int), 3, rng)


def exactness_table(T=160, seed=0, backend="reference"):
    """max |stream in pieces - apply| per model, for the tiny config and the defaults."""
    rng = np.random.default_rng(seed)
    cuts = sorted(rng.choice(np.arange(1, T), 7, replace=False))
    splits = {"1 token": [1] * T, "random cuts": [int(n) for n in np.diff([0, *cuts, T])],
              "halves": [T // 2, T - T // 2]}
    rows = []
    for model in MODEL_NAMES:
        # clipped surprise: with a random M_0 (see setup) a long sequence can diverge
        for label, cfg in (("tiny, chunk 3", tiny(model, chunk_size=3, max_grad_norm=1.0,
                                                   backend=backend)),
                           ("defaults", ModelConfig(model=model, vocab_size=12,
                                                    max_grad_norm=1.0, backend=backend))):
            m, params, tokens = setup(cfg, T=T)
            whole = m.apply(params, tokens)
            diffs = {k: max_diff(run_pieces(m, params, tokens, s)[0], whole)
                     for k, s in splits.items()}
            rows.append((model, label, diffs))
    return splits, rows


if __name__ == "__main__":  # python tests/test_stream.py [numba]
    import sys

    splits, rows = exactness_table(backend=sys.argv[1] if len(sys.argv) > 1 else "reference")
    print("random cuts:", splits["random cuts"])
    print(f"{'model':18s} {'config':14s} " + " ".join(f"{k:>12s}" for k in splits))
    for model, label, diffs in rows:
        print(f"{model:18s} {label:14s} " + " ".join(f"{v:12.1e}" for v in diffs.values()))


@pytest.mark.parametrize("backend", ["reference", "numba"])
@pytest.mark.parametrize("model", ["lmm", "mac", "mag", "mal"])
def test_anchored_memory_models_stream_exactly_and_differ_from_eq13(model, backend):
    """``anchored_memory=True`` (forgetting towards M_0) streams like any model, and with
    forgetting at work it is not the same model as Eq. 13 as printed."""
    cfg = tiny(model, chunk_size=3).with_(anchored_memory=True, backend=backend,
                                          alpha_init=0.3)
    m, params, tokens = setup(cfg)
    whole = m.apply(params, tokens)
    for sizes in SPLITS[:2]:
        got, _ = run_pieces(m, params, tokens, sizes)
        assert max_diff(got, whole) < EXACT, sizes
    plain = Model(cfg.with_(anchored_memory=False)).apply(params, tokens)
    assert max_diff(plain, whole) > 1e-6
