"""A long stream through the numba scan: finite, bounded, and streamed == whole.

A 20,000-token miniature of ``minititans bench --stream`` (1,000,000 tokens; figures in
docs/performance.md): default gates (memory/gates.py: alpha 0.01, eta 0.9, theta 0.02),
l2-normalised keys, values of norm 1, a depth-2 memory, calls of 2,000 tokens.
"""

import numpy as np
import pytest

import minititans as mt
from minititans.bench.stream import STREAM_GATES, _stream_call_inputs
from minititans.memory.update import tree_norm

D, CALL, CALLS = 32, 2_000, 10


@pytest.mark.parametrize("depth", [1, 2])
def test_long_stream_is_finite_bounded_and_streamed_equals_whole(depth):
    params = mt.init_memory(np.random.default_rng(0), D, D, depth=depth, expansion=4)
    state0 = mt.MemoryState.initial(params)
    calls = [_stream_call_inputs(0, c, CALL, D, np.float64) for c in range(CALLS)]
    state, outs, norms = state0, [], [tree_norm(params)]
    for k, v, q in calls:
        out, state = mt.memory_scan(state, k, v, q, backend="numba", **STREAM_GATES)
        assert np.all(np.isfinite(out))
        assert all(np.all(np.isfinite(w)) for w in list(state.params) + list(state.momentum))
        outs.append(out)
        norms.append(tree_norm(state.params))
    # bounded: the weights never grow past their initial norm (forgetting at 1% per token
    # wins over the surprise of unstructured pairs), and reads stay of the values' scale
    assert max(norms[1:]) <= norms[0]
    assert max(float(np.abs(o).max()) for o in outs) < 10.0
    # streamed == whole: one call over all 20,000 tokens gives the same bits
    k, v, q = (np.concatenate(x) for x in zip(*calls))
    whole, s_whole = mt.memory_scan(state0, k, v, q, backend="numba", **STREAM_GATES)
    np.testing.assert_array_equal(np.concatenate(outs), whole)
    for a, b in zip(list(state.params) + list(state.momentum),
                    list(s_whole.params) + list(s_whole.momentum)):
        np.testing.assert_array_equal(a, b)
