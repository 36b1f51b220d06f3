"""The numba memory scan against the reference: Eqs. 8, 13-14 (token loop), 16-18 (chunked).

Parity is float64 to 1e-10 relative and float32 to 1e-4; the gradients of the inner loss are
derived by hand in minititans.kernels.rows (their own tests: test_kernels_rows.py). A small subset
also runs with NUMBA_DISABLE_JIT=1 (in a subprocess), so the kernels are checked as plain
Python too.
"""

import os
import subprocess
import sys
import textwrap
import warnings

import autograd.numpy as anp
import numpy as np
import pytest
from naive_memory import unit_rows

import minititans as mt
from minititans.memory.scan import numba_memory_scan_batched

TOL = {np.float64: 1e-10, np.float32: 1e-4}


def assert_close(got, want, dtype):
    """Relative to the largest entry, so near-zero entries do not need 1e-10 on their own."""
    tol = TOL[dtype]
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(np.abs(want).max(), 1e-30))


def _case(rng, T, d, depth, activation="gelu", residual_norm=False, dtype=np.float64,
          momentum=True):
    params = mt.init_memory(rng, d, d, depth=depth, expansion=2, activation=activation,
                            residual_norm=residual_norm, dtype=dtype)
    S0 = params.like([(0.05 * rng.standard_normal(w.shape)).astype(dtype) for w in params])
    state = mt.MemoryState(params, S0) if momentum else mt.MemoryState.initial(params)
    K = unit_rows(rng, T, d).astype(dtype)
    V = (rng.standard_normal((T, d)) / np.sqrt(d)).astype(dtype)
    Q = unit_rows(rng, T, d).astype(dtype)
    gates = dict(alpha=rng.uniform(0.0, 0.1, T), eta=rng.uniform(0.5, 0.95, T),
                 theta=rng.uniform(0.0, 0.2, T))
    return state, K, V, Q, gates


def _both(state, K, V, Q, gates, **options):
    ref = mt.memory_scan(state, K, V, Q, backend="reference", **gates, **options)
    fast = mt.memory_scan(state, K, V, Q, backend="numba", **gates, **options)
    return ref, fast


def _assert_same_scan(ref, fast, dtype):
    assert_close(fast[0], ref[0], dtype)
    for got, want in zip(list(fast[1].params) + list(fast[1].momentum),
                         list(ref[1].params) + list(ref[1].momentum)):
        assert_close(got, want, dtype)
    assert fast[1].params.activation == ref[1].params.activation
    assert fast[1].params.residual_norm == ref[1].params.residual_norm


# every option at least once, on the token loop (b = 1) and chunks (b = 3 with T = 7 ends in a
# partial chunk; b = 16 > T is a single chunk)
CASES = [  # depth, activation, residual_norm, loss, read, max_grad_norm
    (1, "gelu", False, "l2", "after", None),
    (1, "silu", True, "dot", "before", None),
    (2, "gelu", False, "l2", "before", 0.5),
    (2, "silu", False, "huber", "after", None),
    (2, "gelu", True, "lp", "after", None),
    (2, "silu", True, "l2", "before", 0.05),
    (3, "gelu", False, "dot", "after", 0.3),
    (3, "silu", True, "huber", "before", None),
    (4, "gelu", False, "lp", "before", 0.2),
]


@pytest.mark.parametrize("depth,activation,residual_norm,loss,read,clip", CASES)
def test_eq13_eq14_numba_token_loop_matches_reference(rng, depth, activation, residual_norm,
                                                      loss, read, clip):
    state, K, V, Q, gates = _case(rng, 7, 5, depth, activation, residual_norm)
    ref, fast = _both(state, K, V, Q, gates, chunk_size=1, read=read, loss=loss,
                      max_grad_norm=clip, delta=0.3, p=2.5)
    _assert_same_scan(ref, fast, np.float64)


@pytest.mark.parametrize("chunk_size", [3, 16])
@pytest.mark.parametrize("depth,activation,residual_norm,loss,read,clip", CASES)
def test_eq16_eq18_numba_chunked_matches_reference(rng, chunk_size, depth, activation,
                                                   residual_norm, loss, read, clip):
    state, K, V, Q, gates = _case(rng, 7, 5, depth, activation, residual_norm)
    ref, fast = _both(state, K, V, Q, gates, chunk_size=chunk_size, read=read, loss=loss,
                      max_grad_norm=clip, delta=0.3, p=2.5)
    _assert_same_scan(ref, fast, np.float64)


@pytest.mark.parametrize("chunk_size", [1, 4])
@pytest.mark.parametrize("depth,activation,residual_norm", [(1, "gelu", False),
                                                            (2, "gelu", True),
                                                            (3, "silu", False)])
def test_eq13_eq18_numba_float32_matches_reference(rng, chunk_size, depth, activation,
                                                   residual_norm):
    # float32 uses the vectorised erf/exp of kernels.scalars: equal to 1e-4
    state, K, V, Q, gates = _case(rng, 20, 16, depth, activation, residual_norm,
                                  dtype=np.float32)
    ref, fast = _both(state, K, V, Q, gates, chunk_size=chunk_size)
    assert fast[0].dtype == np.float32
    _assert_same_scan(ref, fast, np.float32)


def test_eq13_eq14_special_gates_alpha_one_wipes_theta_zero_freezes(rng):
    # α = 1 (and η = 0) wipes the memory each step; θ = 0, S_0 = 0 keeps M_0 forever
    state, K, V, Q, _ = _case(rng, 6, 4, 2, momentum=False)
    for gates in (dict(alpha=1.0, eta=0.0, theta=0.1), dict(alpha=0.0, eta=0.9, theta=0.0)):
        for b in (1, 4):
            ref, fast = _both(state, K, V, Q, gates, chunk_size=b)
            _assert_same_scan(ref, fast, np.float64)
    out, final = mt.memory_scan(state, K, V, Q, alpha=0.0, eta=0.9, theta=0.0, backend="numba")
    np.testing.assert_array_equal(final.params[0], state.params[0])


@pytest.mark.parametrize("chunk_size", [1, 3])
def test_numba_scan_streams_across_calls(rng, chunk_size):
    # two calls, passing the state on (cut at a chunk boundary), equal one call
    state, K, V, Q, gates = _case(rng, 12, 4, 2)
    whole = mt.memory_scan(state, K, V, Q, backend="numba", chunk_size=chunk_size, **gates)
    g1 = {k: v[:6] for k, v in gates.items()}
    g2 = {k: v[6:] for k, v in gates.items()}
    out1, mid = mt.memory_scan(state, K[:6], V[:6], Q[:6], backend="numba",
                               chunk_size=chunk_size, **g1)
    out2, end = mt.memory_scan(mid, K[6:], V[6:], Q[6:], backend="numba",
                               chunk_size=chunk_size, **g2)
    np.testing.assert_allclose(np.concatenate([out1, out2]), whole[0], rtol=1e-12, atol=1e-14)
    for a, b in zip(end.params, whole[1].params):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("chunk_size", [1, 3])
def test_divergence_reports_the_first_token_like_reference(rng, chunk_size):
    # θ jumps at token 5: |M| grows ~1e150 per step until it overflows a few tokens later
    state, K, V, Q, _ = _case(rng, 12, 4, 1, momentum=False)
    gates = dict(alpha=0.0, eta=0.99, theta=np.r_[np.full(5, 0.01), np.full(7, 1e150)])
    with pytest.raises(mt.MemoryDivergenceError) as ref_err:
        mt.memory_scan(state, K * 50, V, Q, chunk_size=chunk_size, **gates)
    with pytest.raises(mt.MemoryDivergenceError) as fast_err:
        mt.memory_scan(state, K * 50, V, Q, chunk_size=chunk_size, backend="numba", **gates)
    assert fast_err.value.token == ref_err.value.token
    with pytest.warns(RuntimeWarning, match=f"token {ref_err.value.token}"):
        out, _ = mt.memory_scan(state, K * 50, V, Q, chunk_size=chunk_size, backend="numba",
                                on_nonfinite="warn", **gates)
    assert not np.all(np.isfinite(out))


def test_numba_scan_accepts_noncontiguous_readonly_and_mixed_dtypes(rng):
    state, K, V, Q, gates = _case(rng, 9, 4, 2)
    wide = np.repeat(K, 2, axis=1)[:, ::2]  # non-contiguous view, same values
    wide.flags.writeable = False
    ref, fast = _both(state, wide, V, Q, gates)
    _assert_same_scan(ref, fast, np.float64)
    # float32 weights with float64 data compute (and return) float64, like the reference
    # (compared with float64 copies of the weights: autograd takes the reference's first
    # gradients in the weights' float32)
    p32 = state.params.like([w.astype(np.float32) for w in state.params])
    fast = mt.memory_scan(mt.MemoryState.initial(p32), K, V, Q, backend="numba", chunk_size=2,
                          **gates)
    assert fast[0].dtype == np.float64 and fast[1].params[0].dtype == np.float64
    p64 = p32.like([w.astype(np.float64) for w in p32])
    ref = mt.memory_scan(mt.MemoryState.initial(p64), K, V, Q, chunk_size=2, **gates)
    _assert_same_scan(ref, fast, np.float64)
    # the input state is not mutated
    before = [w.copy() for w in state.params]
    mt.memory_scan(state, K, V, Q, backend="numba", **gates)
    for a, b in zip(before, state.params):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kwargs,error", [
    (dict(chunk_size=0), ValueError),
    (dict(read="during"), ValueError),
    (dict(loss="l3"), ValueError),
    (dict(alpha=1.5), ValueError),
    (dict(theta=-0.1), ValueError),
    (dict(max_grad_norm=0.0), ValueError),
])
def test_bad_arguments_give_the_same_errors_on_both_backends(rng, kwargs, error):
    state, K, V, Q, gates = _case(rng, 5, 4, 2)
    gates.update({k: v for k, v in kwargs.items() if k in gates})
    options = {k: v for k, v in kwargs.items() if k not in gates}
    messages = []
    for backend in ("reference", "numba"):
        with pytest.raises(error) as err:
            mt.memory_scan(state, K, V, Q, backend=backend, **gates, **options)
        messages.append(str(err.value))
    assert messages[0] == messages[1]
    with pytest.raises(ValueError, match="keys must have last dimension"):
        mt.memory_scan(state, K[:, :3], V, Q, backend="numba", **gates)
    with pytest.raises(TypeError, match="float32 or float64"):
        mt.memory_scan(state, K.astype(np.int64), V, Q, backend="numba", **gates)


@pytest.mark.parametrize("chunk_size", [1, 4])
def test_batched_scan_equals_one_scan_per_sequence(rng, chunk_size):
    B, T, d = 3, 10, 4
    cases = [_case(rng, T, d, 2) for _ in range(B)]
    stack = lambda trees: cases[0][0].params.like(  # noqa: E731
        [np.stack(ws) for ws in zip(*trees)])
    state = mt.MemoryState(stack([c[0].params for c in cases]),
                           stack([c[0].momentum for c in cases]))
    K, V, Q = (np.stack([c[i] for c in cases]) for i in (1, 2, 3))
    gates = {n: np.stack([c[4][n] for c in cases]) for n in ("alpha", "eta", "theta")}
    out, final = numba_memory_scan_batched(state, K, V, Q, chunk_size=chunk_size, **gates)
    assert out.shape == (B, T, d) and final.params[0].shape == (B, d, 2 * d)
    for s, (st, k, v, q, g) in enumerate(cases):
        ref_out, ref_state = mt.memory_scan(st, k, v, q, chunk_size=chunk_size, **g)
        assert_close(out[s], ref_out, np.float64)
        for got, want in zip(list(final.params) + list(final.momentum),
                             list(ref_state.params) + list(ref_state.momentum)):
            assert_close(got[s], want, np.float64)
    with pytest.raises(ValueError, match="leading batch axis"):
        numba_memory_scan_batched(cases[0][0], K, V, Q, **gates)
    with pytest.raises(ValueError, match=r"shape \(B, T, d\)"):
        numba_memory_scan_batched(state, K[0], V, Q, **gates)


def test_batched_scan_reports_divergence_with_its_sequence(rng):
    B, T, d = 2, 8, 4
    state, K, V, Q, _ = _case(rng, T, d, 1, momentum=False)
    stacked = mt.MemoryState.initial(state.params.like([np.stack([w] * B) for w in state.params]))
    theta = np.zeros((B, T))
    theta[1, 3:] = 1e150
    with pytest.raises(mt.MemoryDivergenceError, match="of sequence 1") as err:
        numba_memory_scan_batched(stacked, np.stack([K * 50] * B), np.stack([V] * B),
                                  np.stack([Q] * B), alpha=0.0, eta=0.99, theta=theta)
    assert err.value.token >= 3


@pytest.mark.parametrize("chunk_size,anchored", [(1, False), (4, True)])
def test_eqs13_18_batched_scan_gradients_equal_each_sequences_own(rng, chunk_size, anchored):
    """Under autograd the batched scan is one node; its gradients with respect to every
    argument (rows, gates, initial weights, momentum, anchor) equal those of one
    differentiable scan per sequence, on both backends."""
    from autograd import grad

    B, T, d = 3, 10, 4
    cases = [_case(rng, T, d, 2) for _ in range(B)]
    K, V, Q = (np.stack([c[i] for c in cases]) for i in (1, 2, 3))
    G = np.stack([np.stack([c[4][n] for n in ("alpha", "eta", "theta")]) for c in cases])
    W0 = [np.stack(ws) for ws in zip(*(c[0].params for c in cases))]
    S0 = [np.stack(ws) for ws in zip(*(c[0].momentum for c in cases))]
    like = cases[0][0].params.like
    cot = rng.standard_normal((B, T, d))  # a random cotangent for the outputs ...
    cot_W = [rng.standard_normal(w.shape) for w in W0]  # ... and for the final weights

    def objective(out, weights):
        return anp.sum(out * cot) + sum(anp.sum(w * c) for w, c in zip(weights, cot_W))

    def batched(args):
        K, V, Q, G, W, S = args
        state = mt.MemoryState(like(W), like(S), like(W) if anchored else None)
        out, final = numba_memory_scan_batched(state, K, V, Q, alpha=G[:, 0], eta=G[:, 1],
                                               theta=G[:, 2], chunk_size=chunk_size)
        return objective(out, final.params)

    def per_sequence(args, backend):
        K, V, Q, G, W, S = args
        outs, finals = [], []
        for s in range(B):
            Ws = like([w[s] for w in W])
            state = mt.MemoryState(Ws, like([m[s] for m in S]), Ws if anchored else None)
            out, final = mt.memory_scan(state, K[s], V[s], Q[s], alpha=G[s, 0], eta=G[s, 1],
                                        theta=G[s, 2], chunk_size=chunk_size, backend=backend)
            outs.append(out)
            finals.append(final.params)
        return objective(anp.stack(outs), [anp.stack([f[i] for f in finals])
                                           for i in range(len(W0))])

    args = (K, V, Q, G, W0, S0)
    got = grad(batched)(args)
    assert batched(args) == pytest.approx(per_sequence(args, "numba"), rel=1e-13)
    for backend, tol in (("numba", 1e-12), ("reference", 1e-8)):
        want = grad(lambda a, backend=backend: per_sequence(a, backend))(args)
        for g, w in zip(got[:4] + tuple(got[4]) + tuple(got[5]),
                        want[:4] + tuple(want[4]) + tuple(want[5])):
            np.testing.assert_allclose(g, w, rtol=tol, atol=tol * np.abs(w).max())


def test_batched_scan_under_autograd_names_the_diverging_sequence(rng):
    from autograd import grad

    B, T, d = 2, 8, 4
    state, K, V, Q, _ = _case(rng, T, d, 1, momentum=False)
    W = [np.stack([w] * B) for w in state.params]
    theta = np.zeros((B, T))
    theta[1, 3:] = 1e150

    def total(k):
        st = mt.MemoryState.initial(state.params.like(W))
        out, _ = numba_memory_scan_batched(st, k, np.stack([V] * B), np.stack([Q] * B),
                                           alpha=0.0, eta=0.99, theta=theta)
        return anp.sum(out)

    with pytest.raises(mt.MemoryDivergenceError, match="of sequence 1") as err:
        grad(total)(np.stack([K * 50] * B))
    assert err.value.token >= 3
    with pytest.raises(ValueError, match=r"alpha must have shape \(2, 8\) when differentiated"):
        grad(lambda a: anp.sum(numba_memory_scan_batched(
            mt.MemoryState.initial(state.params.like(W)), np.stack([K] * B),
            np.stack([V] * B), np.stack([Q] * B), alpha=a, eta=0.9, theta=0.1)[0]))(
            np.full(T, 0.01))


def test_numba_scan_under_autograd_goes_to_the_vjp(rng):
    # a boxed argument is sent to the differentiable primitive of kernels.vjp
    from autograd import grad

    state, K, V, Q, gates = _case(rng, 6, 3, 2)

    def total(k, backend):
        out, _ = mt.memory_scan(state, k, V, Q, backend=backend, **gates)
        return (out**2).sum()

    got = grad(total)(K, "numba")
    np.testing.assert_allclose(got, grad(total)(K, "reference"), rtol=1e-8, atol=1e-10)


_NO_JIT_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import numba
    assert numba.config.DISABLE_JIT
    sys.path.insert(0, {tests!r})
    import minititans as mt
    from naive_memory import unit_rows
    from minititans.kernels import attention as fast
    from minititans.attention import causal_attention
    rng = np.random.default_rng(0)
    for dtype, tol in ((np.float64, 1e-10), (np.float32, 1e-4)):
        for depth, act, res, read, b in ((1, "gelu", False, "after", 1),
                                         (2, "silu", True, "before", 1),
                                         (2, "gelu", False, "after", 3)):
            p = mt.init_memory(rng, 4, 4, depth=depth, expansion=2, activation=act,
                               residual_norm=res, dtype=dtype)
            st = mt.MemoryState.initial(p, anchored=depth == 2)  # and around an anchor
            K, Q = unit_rows(rng, 7, 4).astype(dtype), unit_rows(rng, 7, 4).astype(dtype)
            V = rng.standard_normal((7, 4)).astype(dtype)
            kw = dict(alpha=0.05, eta=0.8, theta=0.1, read=read, chunk_size=b)
            r = mt.memory_scan(st, K, V, Q, **kw)
            f = mt.memory_scan(st, K, V, Q, backend="numba", **kw)
            np.testing.assert_allclose(f[0], r[0], rtol=tol, atol=tol * abs(r[0]).max())
            for a, c in zip(f[1].params, r[1].params):
                np.testing.assert_allclose(a, c, rtol=tol, atol=tol * abs(c).max())
        q, k, v = (rng.standard_normal((2, 70, 4)).astype(dtype) for _ in range(3))
        np.testing.assert_allclose(fast.causal_attention(q, k, v, 9, 2),
                                   causal_attention(q, k, v, 9, 2), rtol=tol, atol=tol)
    print("ok")
""")


def test_kernels_match_reference_with_numba_disable_jit():
    # the same kernels as plain Python: a subprocess, since the flag is read at import
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, NUMBA_DISABLE_JIT="1")
    run = subprocess.run([sys.executable, "-W", "error", "-c", _NO_JIT_SCRIPT.format(tests=tests)],
                         capture_output=True, text=True, env=env, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().endswith("ok")


def test_bench_counts_22_d_h_flops_and_formats_a_table():
    from minititans import bench, cli
    from minititans.bench.kernels import scan_flops_per_token

    assert scan_flops_per_token([(64, 256), (256, 64)]) == 22 * 64 * 256
    result = dict(machine=dict(cpu="x", cores=2, python="3", numpy="2", numba="0"),
                  peak_gflops=dict(float32=100.0, float64=50.0),
                  rows=[dict(kernel="memory_scan", config="d=64 h=256 depth=2 chunk=1",
                             dtype="float32", tokens_per_s=1e5, gflops=36.0, peak_fraction=0.36,
                             T_ref=32, ref_tokens_per_s=800.0, speedup=125.0)])
    result["goals"] = bench.goals(result)
    table = bench.format_table(result)
    assert "| memory_scan | d=64 h=256 depth=2 chunk=1 | float32 | 100,000 | 36.0 | 36% |" in table
    assert result["goals"][0]["met"] is True and result["goals"][1]["met"] is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")

        args = cli.build_parser().parse_args(["bench", "--quick", "--out", "x.json"])
        assert args.quick and str(args.out) == "x.json" and args.func is cli.run_bench_command
