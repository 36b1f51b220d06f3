"""The long-stream soak (``minititans bench --stream``): a million tokens through the scan.

The state forgets towards its initial weights (``MemoryState.initial(params, anchored=True)``,
docs/design-decisions.md "Forgetting towards an anchor"); at the end the soak checks that
the memory still learns: 8 fresh pairs written 32 times are read back as well as by a fresh
memory (:func:`fresh_pair_recall_error`).
"""

from __future__ import annotations

import os
import time
import tracemalloc

import numpy as np

from .timing import machine_info

STREAM_GATES = dict(alpha=0.01, eta=0.9, theta=0.02)  # memory/gates.py ALPHA/ETA/THETA_INIT


def _stream_call_inputs(seed, call, n, d, dtype):
    """Keys, values, queries ``(n, d)`` of call ``call``: l2-normalised rows (norm 1)."""
    rng = np.random.default_rng([seed, call])
    rows = []
    for _ in range(3):
        x = rng.standard_normal((n, d))
        rows.append((x / np.linalg.norm(x, axis=1, keepdims=True)).astype(dtype))
    return rows


RECALL_PAIRS, RECALL_PASSES = 8, 32


def fresh_pair_recall_error(state, seed, chunk=1):
    """Write ``RECALL_PAIRS`` fresh random unit pairs ``RECALL_PASSES`` times into ``state``
    (default gates, the numba scan) and read them back: ``||M(K) - V|| / ||V||``."""
    from ..memory import memory_forward, memory_scan

    d, dtype = state.params[0].shape[0], state.params[0].dtype
    rng = np.random.default_rng([seed, 10**6])  # not a seed of the stream's calls
    K, V = (x / np.linalg.norm(x, axis=1, keepdims=True)
            for x in (rng.standard_normal((RECALL_PAIRS, d)) for _ in range(2)))
    K, V = K.astype(dtype), V.astype(dtype)
    Kt, Vt = np.tile(K, (RECALL_PASSES, 1)), np.tile(V, (RECALL_PASSES, 1))
    _, written = memory_scan(state, Kt, Vt, Kt, chunk_size=chunk, backend="numba",
                             **STREAM_GATES)
    return float(np.linalg.norm(memory_forward(written.params, K) - V) / np.linalg.norm(V))


def _rss_mb():
    """(current RSS, peak RSS) of this process in MB (Linux /proc and getrusage)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    try:
        with open("/proc/self/statm") as f:
            current = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        current = float("nan")
    return current, peak


def run_stream(tokens=1_000_000, call_len=10_000, d=64, depth=2, expansion=4, chunk=1,
               prefix=100_000, seed=0, dtype=np.float64, progress=True, anchored=True):
    """Push ``tokens`` tokens through the numba scan in calls of ``call_len``, state passed on.

    Records per call: the memory's global norm, whether outputs and state are finite, and the
    process's RSS; tracemalloc's peak of Python-visible allocations per call. Then checks
    that ``prefix`` tokens in one call equal the same tokens in ``prefix // call_len`` calls,
    and that the memory still learns (:func:`fresh_pair_recall_error` after the stream
    against a fresh memory's). ``anchored``: forget towards the initial weights (False: Eq. 13
    as printed, towards 0, where a deep memory collapses).
    """

    from ..memory import MemoryState, init_memory, memory_scan
    from ..memory.update import tree_norm

    params = init_memory(np.random.default_rng(seed), d, d, depth=depth, expansion=expansion,
                         dtype=dtype)
    state0 = MemoryState.initial(params, anchored=anchored)
    n_calls = -(-tokens // call_len)
    k, v, q = _stream_call_inputs(seed, 0, chunk + 1, d, dtype)
    memory_scan(state0, k, v, q, chunk_size=chunk, backend="numba", **STREAM_GATES)  # compile
    state = state0
    norms, rss, trace_peaks, finite = [], [], [], True
    tracemalloc.start()
    start = time.perf_counter()
    for c in range(n_calls):
        n = min(call_len, tokens - c * call_len)
        k, v, q = _stream_call_inputs(seed, c, n, d, dtype)
        tracemalloc.reset_peak()
        out, state = memory_scan(state, k, v, q, chunk_size=chunk, backend="numba",
                                 **STREAM_GATES)
        trace_peaks.append(tracemalloc.get_traced_memory()[1] / 2**20)
        ok = bool(np.all(np.isfinite(out))) and all(
            np.all(np.isfinite(w)) for w in list(state.params) + list(state.momentum))
        finite = finite and ok
        norms.append(tree_norm(state.params))
        rss.append(_rss_mb())
        if progress and (c + 1) % max(1, n_calls // 10) == 0:
            print(f"  {min(tokens, (c + 1) * call_len):>9,d} tokens: |M| = {norms[-1]:.4g}, "
                  f"RSS {rss[-1][0]:.1f} MB (peak {rss[-1][1]:.1f}), "
                  f"{time.perf_counter() - start:.1f} s", flush=True)
    seconds = time.perf_counter() - start
    tracemalloc.stop()
    # streamed == whole on a prefix: one call against prefix // call_len calls
    k, v, q = (np.concatenate(x) for x in zip(
        *(_stream_call_inputs(seed, c, call_len, d, dtype) for c in range(prefix // call_len))))
    whole, s_whole = memory_scan(state0, k, v, q, chunk_size=chunk, backend="numba",
                                 **STREAM_GATES)
    parts, s = [], state0
    for c in range(prefix // call_len):
        sl = slice(c * call_len, (c + 1) * call_len)
        o, s = memory_scan(s, k[sl], v[sl], q[sl], chunk_size=chunk, backend="numba",
                           **STREAM_GATES)
        parts.append(o)
    streamed = np.concatenate(parts)
    w_diff = max(float(np.max(np.abs(a - b))) for a, b in zip(
        list(s.params) + list(s.momentum), list(s_whole.params) + list(s_whole.momentum)))
    recall_fresh = fresh_pair_recall_error(state0, seed, chunk)
    recall_after = fresh_pair_recall_error(state, seed, chunk)
    marks = sorted({0, n_calls // 10, n_calls // 2, n_calls - 1})
    return {
        "tokens": tokens, "call_len": call_len, "calls": n_calls, "d": d, "depth": depth,
        "expansion": expansion, "chunk_size": chunk, "dtype": np.dtype(dtype).name,
        "anchored": anchored,
        "gates": STREAM_GATES, "seconds": seconds, "tokens_per_s": tokens / seconds,
        "all_finite": finite, "norm_first": norms[0], "norm_last": norms[-1],
        "norm_min": min(norms), "norm_max": max(norms),
        "norm_last_10pct_range": [min(norms[-max(1, n_calls // 10):]),
                                  max(norms[-max(1, n_calls // 10):])],
        "rss_mb": {str(min(tokens, (i + 1) * call_len)): {"current": rss[i][0], "peak": rss[i][1]}
                   for i in marks},
        "tracemalloc_peak_mb_per_call": {"first": trace_peaks[0], "max": max(trace_peaks),
                                         "last": trace_peaks[-1]},
        "prefix": prefix, "prefix_calls": prefix // call_len,
        "prefix_out_max_abs_diff": float(np.max(np.abs(streamed - whole))),
        "prefix_out_bit_identical": bool(np.array_equal(streamed, whole)),
        "prefix_state_max_abs_diff": w_diff,
        "recall_error_fresh": recall_fresh, "recall_error_after": recall_after,
        "recall_within_2x": recall_after <= 2 * recall_fresh,
        "machine": machine_info(),
    }


def format_stream(r) -> str:
    lines = [f"long stream: {r['tokens']:,d} tokens in {r['calls']} calls of {r['call_len']:,d}, "
             f"depth-{r['depth']} memory d={r['d']} (hidden {r['d'] * r['expansion']}), "
             f"chunk {r['chunk_size']}, {r['dtype']}, gates {r['gates']}, "
             + ("forgetting towards M_0 (anchored)" if r["anchored"] else
                "forgetting towards 0 (Eq. 13 as printed)"),
             f"  {r['seconds']:.1f} s, {r['tokens_per_s']:,.0f} tokens/s; all finite: "
             f"{r['all_finite']}",
             f"  memory norm |M|: first call {r['norm_first']:.4g}, last {r['norm_last']:.4g}, "
             f"min {r['norm_min']:.4g}, max {r['norm_max']:.4g}; last 10% of calls in "
             f"[{r['norm_last_10pct_range'][0]:.4g}, {r['norm_last_10pct_range'][1]:.4g}]"]
    for t, m in r["rss_mb"].items():
        lines.append(f"  after {int(t):>9,d} tokens: RSS {m['current']:.1f} MB, "
                     f"peak RSS {m['peak']:.1f} MB")
    tp = r["tracemalloc_peak_mb_per_call"]
    lines.append(f"  tracemalloc peak per call: first {tp['first']:.2f} MB, "
                 f"max {tp['max']:.2f} MB, last {tp['last']:.2f} MB")
    lines.append(f"  streamed == whole on {r['prefix']:,d} tokens (1 call vs "
                 f"{r['prefix_calls']} calls): outputs bit-identical "
                 f"{r['prefix_out_bit_identical']}, max |diff| {r['prefix_out_max_abs_diff']:.3g}"
                 f"; final state max |diff| {r['prefix_state_max_abs_diff']:.3g}")
    lines.append(f"  still learns: {RECALL_PAIRS} fresh pairs written {RECALL_PASSES} times, "
                 f"relative recall error {r['recall_error_after']:.3f} after the stream vs "
                 f"{r['recall_error_fresh']:.3f} fresh (within 2x: {r['recall_within_2x']})")
    return "\n".join(lines)
