"""Property-based checks (hypothesis) over random small shapes, gates and chunk sizes."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from naive_memory import naive_chunked

import minititans as mt

shapes = st.fixed_dictionaries({
    "T": st.integers(1, 12),
    "d": st.integers(1, 4),
    "depth": st.integers(1, 3),
    "b": st.integers(1, 6),
    "read": st.sampled_from(["after", "before"]),
    "seed": st.integers(0, 2**31),
})


def _problem(s):
    r = np.random.default_rng(s["seed"])
    T, d = s["T"], s["d"]
    K = r.standard_normal((T, d))
    K /= np.linalg.norm(K, axis=1, keepdims=True)
    V, Q = r.standard_normal((T, d)), r.standard_normal((T, d))
    gates = dict(alpha=r.uniform(0, 1, T), eta=r.uniform(0, 1, T), theta=r.uniform(0, 0.2, T))
    params = mt.init_memory(r, d, d, depth=s["depth"], expansion=2)
    return mt.MemoryState.initial(params), K, V, Q, gates


@settings(max_examples=30, deadline=None)
@given(shapes)
def test_property_chunked_equals_naive_chunked(s):
    state, K, V, Q, g = _problem(s)
    out, final = mt.memory_scan(state, K, V, Q, chunk_size=s["b"], read=s["read"], **g)
    y, M, _ = naive_chunked(list(state.params), K, V, Q, g["alpha"], g["eta"], g["theta"],
                            s["b"], read=s["read"])
    np.testing.assert_allclose(out, y, rtol=1e-9, atol=1e-11)
    for a, b in zip(final.params, M):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-11)


@settings(max_examples=30, deadline=None)
@given(shapes, st.integers(0, 3))
def test_property_streamed_equals_whole(s, n_chunks_first):
    state, K, V, Q, g = _problem(s)
    cut = min(s["T"], n_chunks_first * s["b"])  # a chunk boundary
    whole, s_whole = mt.memory_scan(state, K, V, Q, chunk_size=s["b"], read=s["read"], **g)
    first, s1 = mt.memory_scan(state, K[:cut], V[:cut], Q[:cut], chunk_size=s["b"],
                               read=s["read"], **{k: v[:cut] for k, v in g.items()})
    second, s2 = mt.memory_scan(s1, K[cut:], V[cut:], Q[cut:], chunk_size=s["b"],
                                read=s["read"], **{k: v[cut:] for k, v in g.items()})
    np.testing.assert_allclose(np.concatenate([first, second]), whole, rtol=1e-11, atol=1e-13)
    for a, b in zip(list(s2.params) + list(s2.momentum),
                    list(s_whole.params) + list(s_whole.momentum)):
        np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-13)


@settings(max_examples=30, deadline=None)
@given(shapes, st.integers(0, 11))
def test_property_memory_scan_is_causal(s, t):
    state, K, V, Q, g = _problem(s)
    t = min(t, s["T"] - 1)
    out, _ = mt.memory_scan(state, K, V, Q, chunk_size=s["b"], read=s["read"], **g)
    K2, V2, Q2 = K.copy(), V.copy(), Q.copy()
    K2[t + 1:] = -K2[t + 1:]
    V2[t + 1:] += 3.0
    Q2[t + 1:] *= 2.0
    out2, _ = mt.memory_scan(state, K2, V2, Q2, chunk_size=s["b"], read=s["read"], **g)
    np.testing.assert_array_equal(out2[: t + 1], out[: t + 1])


@settings(max_examples=20, deadline=None)
@given(shapes, st.integers(1, 4), st.sampled_from(["gelu", "silu"]))
def test_property_numba_equals_reference(s, d_out, activation):
    """The numba scan equals the reference: outputs and final weights and momentum, float64."""
    r = np.random.default_rng(s["seed"])
    T, d = s["T"], s["d"]
    K = r.standard_normal((T, d))
    K /= np.linalg.norm(K, axis=1, keepdims=True)
    V, Q = r.standard_normal((T, d_out)), r.standard_normal((T, d))
    g = dict(alpha=r.uniform(0, 1, T), eta=r.uniform(0, 1, T), theta=r.uniform(0, 0.2, T))
    params = mt.init_memory(r, d, d_out, depth=s["depth"], expansion=2, activation=activation)
    state = mt.MemoryState.initial(params)
    opts = dict(chunk_size=s["b"], read=s["read"], **g)
    ref, s_ref = mt.memory_scan(state, K, V, Q, backend="reference", **opts)
    out, s_nb = mt.memory_scan(state, K, V, Q, backend="numba", **opts)
    np.testing.assert_allclose(out, ref, rtol=1e-9, atol=1e-12)
    for a, b in zip(list(s_nb.params) + list(s_nb.momentum),
                    list(s_ref.params) + list(s_ref.momentum)):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
