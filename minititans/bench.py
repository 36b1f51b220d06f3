"""``minititans bench``: how fast the numba kernels are, against this machine's own matmul peak.

One run measures, in one process: the single-thread float32 and float64 NumPy matmul peak
(a 512 x 512 GEMM, best of several), then for each kernel its tokens/s, GFLOP/s, fraction
of that peak and its speedup over the readable reference path. BLAS runs single-threaded
(threadpoolctl when installed, else the run re-executes itself with
``OPENBLAS_NUM_THREADS=1``); numba kernels run on one thread except in the batch rows.

FLOPs are counted, not measured: per token and per weight matrix ``(f, o)`` of the memory,
``2fo`` key forward, ``2fo`` surprise, ``2fo`` backprop to the layer input (not for the first
layer), ``2fo`` query read and ``4fo`` for Eqs. 13-14, i.e. ``22 d h`` for a depth-2 memory
``(d, h), (h, d)``. The chunked form does more arithmetic than that; it is counted the same.

The reference is slow, so it runs on a shorter sequence (``T_ref`` in the table) and its
tokens/s are compared with the kernel's. "% peak" divides by the matmul peak measured again
right after the row (under the same machine load); the header shows the peak of the start.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SINGLE_THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
HEADLINE = dict(d=64, depth=2, expansion=4)  # the configuration the goals are stated for

HELP = """Benchmark the numba kernels against the single-thread matmul peak of this machine.

Prints a table (tokens/s, GFLOP/s, % of peak, speedup over the reference path) for the
memory scan at d in {32, 64, 128}, depth 1-4, chunk 1/16/64 (T = 4096, float32), the
headline depth-2 d=64 memory in float64, forward+VJP against forward, a batch of two
sequences on two threads against one, the first call in a fresh process, and the attention
kernels; then whether the goals of docs/performance.md are met. --quick runs a small
subset in about a minute; the full run takes a few minutes on two cores."""


# --- timing helpers ------------------------------------------------------------------------

def best_time(fn, *, repeat=3, min_time=0.0):
    """Best wall time of ``fn()`` over ``repeat`` runs (more if a run is shorter than min_time)."""
    best = float("inf")
    runs = 0
    start = time.perf_counter()
    while runs < repeat or (time.perf_counter() - start < min_time and runs < 50):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        runs += 1
    return best


def matmul_peak(dtype, n=512, min_time=0.5):
    """Single-thread GEMM GFLOP/s of NumPy (``n x n`` times ``n x n``), best of many."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n)).astype(dtype)
    b = rng.standard_normal((n, n)).astype(dtype)
    c = np.empty((n, n), dtype)
    np.dot(a, b, out=c)
    t = best_time(lambda: np.dot(a, b, out=c), repeat=20, min_time=min_time)
    return 2.0 * n**3 / t / 1e9


def scan_flops_per_token(shapes):
    """Counted FLOPs of one token of the memory scan (module docstring): 22 d h at depth 2."""
    return sum((10 + (2 if i else 0)) * f * o for i, (f, o) in enumerate(shapes))


# --- the memory scan -----------------------------------------------------------------------

def _scan_inputs(d, depth, expansion, T, dtype, seed=0, B=None):
    from .memory import MemoryState, init_memory

    rng = np.random.default_rng(seed)
    params = init_memory(rng, d, d, depth=depth, expansion=expansion, dtype=dtype)
    lead = (T,) if B is None else (B, T)
    k = rng.standard_normal(lead + (d,))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)  # l2-normalised keys, as the models use
    v = rng.standard_normal(lead + (d,))
    v /= np.linalg.norm(v, axis=-1, keepdims=True)
    q = rng.standard_normal(lead + (d,))
    q /= np.linalg.norm(q, axis=-1, keepdims=True)
    if B is not None:
        params = params.like([np.stack([w] * B) for w in params])
    gates = dict(alpha=0.01, eta=0.9, theta=0.01)  # stable for every config
    return MemoryState.initial(params), k.astype(dtype), v.astype(dtype), q.astype(dtype), gates


def _scan_runner(backend, d, depth, expansion, T, dtype, chunk):
    """A no-argument function that runs one scan (compiled / cache loaded beforehand)."""
    from .memory import memory_scan

    state, k, v, q, gates = _scan_inputs(d, depth, expansion, T, dtype)
    if backend == "numba":
        memory_scan(state, k[:chunk + 1], v[:chunk + 1], q[:chunk + 1], chunk_size=chunk,
                    backend=backend, **gates)  # compile (or load the cache) outside the timing
    return lambda: memory_scan(state, k, v, q, chunk_size=chunk, backend=backend, **gates)


def interleaved_best(runs, repeats):
    """Best time of each function, their runs interleaved (``repeats[i]`` runs of ``runs[i]``).

    On a shared machine the load changes from second to second; alternating the runs gives
    every function the same chance of a quiet moment, so their ratio means something.
    """
    best = [float("inf")] * len(runs)
    for r in range(max(repeats)):
        for i, fn in enumerate(runs):
            if r < repeats[i]:
                t0 = time.perf_counter()
                fn()
                best[i] = min(best[i], time.perf_counter() - t0)
    return best


def scan_row(d, depth, chunk, dtype, T, T_ref, expansion=4):
    from .memory import init_memory

    shapes = [w.shape for w in init_memory(np.random.default_rng(0), d, d, depth=depth,
                                           expansion=expansion)]
    flops = scan_flops_per_token(shapes)
    fast = _scan_runner("numba", d, depth, expansion, T, dtype, chunk)
    ref = _scan_runner("reference", d, depth, expansion, T_ref, dtype, chunk)
    t, t_ref = interleaved_best([fast, ref], [6, 2])
    # the peak again, right after: on a shared machine the load drifts during a run, and the
    # fraction is only meaningful against a peak measured under the same load
    local_peak = max(matmul_peak(dtype, min_time=0.2), 1e-9)
    row = dict(kernel="memory_scan", config=f"d={d} h={expansion * d} depth={depth} chunk={chunk}",
               dtype=np.dtype(dtype).name, T=T, tokens_per_s=T / t,
               gflops=flops * T / t / 1e9, local_peak_gflops=local_peak)
    row["peak_fraction"] = row["gflops"] / local_peak
    row.update(T_ref=T_ref, ref_tokens_per_s=T_ref / t_ref,
               speedup=row["tokens_per_s"] / (T_ref / t_ref))
    return row


def vjp_row(chunk, T, dtype):
    """Forward + VJP (autograd through the numba scan) against the forward alone."""
    if importlib.util.find_spec("minititans.kernels.vjp") is None:
        return dict(kernel="forward+VJP", config=f"chunk={chunk}", note="not available")
    from autograd import grad

    from .memory import MemoryState, memory_scan

    state, k, v, q, gates = _scan_inputs(HEADLINE["d"], HEADLINE["depth"], HEADLINE["expansion"],
                                         T, dtype)
    a, e, th = (np.full(T, gates[n], dtype) for n in ("alpha", "eta", "theta"))
    g_out = np.random.default_rng(1).standard_normal((T, HEADLINE["d"])).astype(dtype)

    def loss(args):
        params, k_, v_, q_, a_, e_, th_ = args
        out, _ = memory_scan(MemoryState(params, state.momentum), k_, v_, q_, alpha=a_, eta=e_,
                             theta=th_, chunk_size=chunk, backend="numba")
        return (out * g_out[:out.shape[0]]).sum()

    args = (state.params, k, v, q, a, e, th)
    try:
        grad(loss)(tuple(x[:chunk + 1] if i else x for i, x in enumerate(args)))  # compile
        t_fwd, t_both = interleaved_best(
            [lambda: memory_scan(state, k, v, q, alpha=a, eta=e, theta=th, chunk_size=chunk,
                                 backend="numba"),
             lambda: grad(loss)(args)], [4, 4])
    except Exception as exc:  # the VJP is another module's: report, do not fail the bench
        return dict(kernel="forward+VJP", config=f"chunk={chunk}",
                    note=f"not available ({type(exc).__name__}: {exc})"[:200])
    return dict(kernel="forward+VJP", config=f"d=64 h=256 depth=2 chunk={chunk}",
                dtype=np.dtype(dtype).name, T=T, tokens_per_s=T / t_both,
                ratio_to_forward=t_both / t_fwd)


def batch_row(chunk, T, dtype):
    """Two sequences with ``numba.prange`` on two threads against the same on one thread."""
    import numba

    from .memory.scan import numba_memory_scan_batched

    state, k, v, q, gates = _scan_inputs(HEADLINE["d"], HEADLINE["depth"], HEADLINE["expansion"],
                                         T, dtype, B=2)
    run = lambda: numba_memory_scan_batched(state, k, v, q, chunk_size=chunk, **gates)  # noqa: E731
    numba_memory_scan_batched(state, k[:, :chunk + 1], v[:, :chunk + 1], q[:, :chunk + 1],
                              chunk_size=chunk, **gates)
    before = numba.get_num_threads()
    two = min(2, numba.config.NUMBA_NUM_THREADS)

    def with_threads(n):
        def go():
            numba.set_num_threads(n)
            run()
        return go

    try:
        t1, t2 = interleaved_best([with_threads(1), with_threads(two)], [5, 5])
    finally:
        numba.set_num_threads(before)
    times = {1: t1, 2: t2}
    return dict(kernel="batch of 2", config=f"d=64 h=256 depth=2 chunk={chunk}",
                dtype=np.dtype(dtype).name, T=T, tokens_per_s=2 * T / times[2],
                threads_speedup=times[1] / times[2], threads=numba.config.NUMBA_NUM_THREADS)


_FIRST_CALL = """
import time, numpy as np
t0 = time.perf_counter()
import minititans as mt
t1 = time.perf_counter()
rng = np.random.default_rng(0)
st = mt.MemoryState.initial(mt.init_memory(rng, 16, 16, depth=2, dtype=np.{dtype}))
x = rng.standard_normal((32, 16)).astype(np.{dtype})
t2 = time.perf_counter()
for b in (1, 8):
    mt.memory_scan(st, x, x, x, alpha=0.01, eta=0.9, theta=0.01, chunk_size=b, backend="numba")
print(t1 - t0, time.perf_counter() - t2)
"""


def first_call_row(dtype):
    """Import time and first numba scan calls (token loop + chunked) in a fresh process."""
    code = _FIRST_CALL.format(dtype=np.dtype(dtype).name)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=os.environ.copy(), timeout=600)
    if out.returncode:
        return dict(kernel="first call", note=f"failed: {out.stderr[-200:]}")
    t_import, t_call = (float(x) for x in out.stdout.split())
    return dict(kernel="first call (new process, warm cache)", config="token loop + chunked",
                dtype=np.dtype(dtype).name, seconds=t_call, import_seconds=t_import)


# --- attention kernels ---------------------------------------------------------------------

def attention_rows(T, T_ref, dtype, heads=4, d=64, window=256, prefix=16):
    import autograd.numpy as anp
    from autograd import grad

    from . import attention as ref_att
    from . import linear_attention as _la  # noqa: F401  (the module, not the function)
    from .kernels import attention as fast

    ref_lin = sys.modules["minititans.linear_attention"]
    rng = np.random.default_rng(0)
    x = lambda *s: rng.standard_normal(s).astype(dtype) / np.sqrt(s[-1])  # noqa: E731
    rows = []
    dn = np.dtype(dtype).name

    def add(kernel, config, flops_per_token, fast_fn, ref_fn, T_fast, T_r):
        fast_fn(64)  # compile (or load the cache)
        t, t_ref = interleaved_best([lambda: fast_fn(T_fast), lambda: ref_fn(T_r)], [4, 2])
        row = dict(kernel=kernel, config=config, dtype=dn, T=T_fast,
                   tokens_per_s=T_fast / t, gflops=flops_per_token * T_fast / t / 1e9,
                   T_ref=T_r, ref_tokens_per_s=T_r / t_ref,
                   speedup=(T_fast / t) / (T_r / t_ref))
        row["local_peak_gflops"] = matmul_peak(dtype, min_time=0.2)
        row["peak_fraction"] = row["gflops"] / row["local_peak_gflops"]
        rows.append(row)

    q, k, v = x(heads, T, d), x(heads, T, d), x(heads, T, d)
    # scores and weighted sum over the w + p visible keys: 4 (w + p) d per token and head
    add("causal_attention", f"heads={heads} d={d} window={window} prefix={prefix}",
        4 * heads * (window + prefix) * d,
        lambda n: fast.causal_attention(q[:, :n], k[:, :n], v[:, :n], window, prefix),
        lambda n: ref_att.causal_attention(q[:, :n], k[:, :n], v[:, :n], window, prefix),
        T, T_ref)
    # the reference's forward + backward with autograd (what training runs), per token
    loss = lambda qq: anp.sum(ref_att.causal_attention(qq, k[:, :T_ref], v[:, :T_ref],  # noqa: E731
                                                       window, prefix))
    t_bwd = best_time(lambda: grad(loss)(q[:, :T_ref]), repeat=1)
    rows.append(dict(kernel="causal_attention fwd+bwd (reference, autograd)",
                     config=f"heads={heads} d={d} window={window} prefix={prefix}", dtype=dn,
                     T=T_ref, tokens_per_s=T_ref / t_bwd))
    add("linear_attention_recurrent", f"heads={heads} d={d}", 4 * heads * d * d,
        lambda n: fast.linear_attention_recurrent(q[:, :n], k[:, :n], v[:, :n]),
        lambda n: ref_lin.linear_attention_recurrent(q[:, :n], k[:, :n], v[:, :n]),
        T, T_ref // 4)
    beta = np.full(T, 0.5, dtype)
    # e = kW (2), W update (3), read (2) per element of W
    add("delta_rule", f"d={d}", 7 * d * d,
        lambda n: fast.delta_rule(q[0, :n], k[0, :n], v[0, :n], beta[:n], 0.01),
        lambda n: ref_lin.delta_rule(q[0, :n], k[0, :n], v[0, :n], beta[:n], 0.01),
        T, T_ref // 4)
    return rows


# --- the run -------------------------------------------------------------------------------

def machine_info():
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import numba

    return dict(cpu=cpu, cores=os.cpu_count(), python=platform.python_version(),
                numpy=np.__version__, numba=numba.__version__, platform=platform.platform(),
                blas_threads_env={k: os.environ.get(k) for k in SINGLE_THREAD_ENV})


def _load_average():
    """The 1-minute load average (other processes compete for the cores), or None."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def run_bench(quick=False, progress=True):
    """Run every measurement; returns the JSON-ready result dict."""
    from tqdm import tqdm

    load_start = _load_average()
    peaks = {"float32": matmul_peak(np.float32), "float64": matmul_peak(np.float64)}
    T = 4096
    if quick:
        grid = [(64, 2, 1), (64, 2, 64)]
        T_ref = 32
    else:
        grid = [(d, depth, chunk) for d in (32, 64, 128) for depth in (1, 2, 3, 4)
                for chunk in (1, 16, 64)]
        T_ref = 128
    jobs = [("scan", g) for g in grid]
    jobs += [("scan64", (64, 2, 1)), ("scan64", (64, 2, 64)), ("vjp", 1), ("vjp", 64),
             ("batch", 1), ("batch", 64), ("first", None), ("attention", None)]
    rows = []
    for kind, cfg in tqdm(jobs, desc="bench", disable=not progress, file=sys.stderr):
        if kind == "scan":
            d, depth, chunk = cfg
            # the reference of the big chunked configs takes a while: shorter there
            t_ref = max(T_ref // (2 if d * depth >= 256 else 1), chunk + 1)
            rows.append(scan_row(d, depth, chunk, np.float32, T, t_ref))
        elif kind == "scan64":
            rows.append(scan_row(*cfg, np.float64, T, T_ref))
        elif kind == "vjp":
            rows.append(vjp_row(cfg, 1024 if quick else T, np.float64))
        elif kind == "batch":
            rows.append(batch_row(cfg, T, np.float32))
        elif kind == "first":
            rows.append(first_call_row(np.float32))
        else:
            rows += attention_rows(1024 if quick else T, 256 if quick else 1024, np.float32)
    result = dict(machine=machine_info(), quick=quick, peak_gflops=peaks, rows=rows)
    result["machine"]["load_average_start_end"] = [load_start, _load_average()]
    result["goals"] = goals(result)
    return result


def _find(rows, kernel, config, dtype=None):
    for r in rows:
        if r["kernel"] == kernel and r.get("config") == config and (
                dtype is None or r.get("dtype") == dtype):
            return r
    return None


def goals(result):
    """The goals of issue 4 for the headline memory, each with its measured value."""
    rows = result["rows"]
    head = "d=64 h=256 depth=2 chunk={}"
    out = []

    def goal(name, value, target, higher=True, fmt="{:.2f}"):
        if value is None:
            out.append(dict(goal=name, target=target, value=None, met=None))
            return
        met = value >= target if higher else value <= target
        out.append(dict(goal=name, target=target, value=value, met=bool(met),
                        text=f"{fmt.format(value)} ({'>=' if higher else '<='} {target})"))

    r = _find(rows, "memory_scan", head.format(1), "float32")
    goal("per-token scan, fraction of float32 peak", r and r["peak_fraction"], 0.25)
    r = _find(rows, "memory_scan", head.format(64), "float32")
    goal("chunk-64 scan, fraction of float32 peak", r and r["peak_fraction"], 0.45)
    r = _find(rows, "memory_scan", head.format(1), "float64")
    goal("numba / reference, float64 per token", r and r.get("speedup"), 50.0, fmt="{:.0f}x")
    r = _find(rows, "forward+VJP", head.format(1))
    goal("forward+VJP / forward", r and r.get("ratio_to_forward"), 4.0, higher=False)
    r = _find(rows, "batch of 2", head.format(1))
    goal("batch of 2: 2 threads / 1 thread", r and r.get("threads_speedup"), 1.7)
    r = next((x for x in rows if x["kernel"].startswith("first call")), None)
    goal("first call in a new process (s)", r and r.get("seconds"), 0.5, higher=False)
    return out


def format_table(result):
    """The result as a Markdown table (what docs/performance.md shows)."""
    m = result["machine"]
    p = result["peak_gflops"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores; Python {m['python']}, NumPy "
             f"{m['numpy']}, numba {m['numba']}.",
             f"Single-thread matmul peak: float32 {p['float32']:.1f} GFLOP/s, "
             f"float64 {p['float64']:.1f} GFLOP/s. Load average at start/end: "
             f"{m.get('load_average_start_end')}.", "",
             "| kernel | configuration | dtype | tokens/s | GFLOP/s | % peak | reference "
             "tokens/s (T_ref) | speedup | other |",
             "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in result["rows"]:
        num = lambda key, f, r=r: f.format(r[key]) if r.get(key) is not None else ""  # noqa: E731
        ref = (f"{r['ref_tokens_per_s']:,.0f} ({r['T_ref']})"
               if r.get("ref_tokens_per_s") is not None else "")
        other = []
        if "ratio_to_forward" in r:
            other.append(f"fwd+VJP / fwd = {r['ratio_to_forward']:.2f}")
        if "threads_speedup" in r:
            other.append(f"2 threads / 1 = {r['threads_speedup']:.2f}x")
        if "seconds" in r:
            other.append(f"first calls {r['seconds']:.3f} s, import {r['import_seconds']:.2f} s")
        if "note" in r:
            other.append(r["note"])
        lines.append(f"| {r['kernel']} | {r.get('config', '')} | {r.get('dtype', '')} | "
                     f"{num('tokens_per_s', '{:,.0f}')} | {num('gflops', '{:.1f}')} | "
                     f"{num('peak_fraction', '{:.0%}')} | {ref} | {num('speedup', '{:.0f}x')} | "
                     f"{'; '.join(other)} |")
    lines += ["", "| goal | measured | met |", "|---|---|---|"]
    for g in result["goals"]:
        met = "n/a" if g["met"] is None else ("yes" if g["met"] else "**no**")
        lines.append(f"| {g['goal']} | {g.get('text', 'not measured')} | {met} |")
    return "\n".join(lines)


# --- long streams (``--stream``) -------------------------------------------------------------

STREAM_GATES = dict(alpha=0.01, eta=0.9, theta=0.02)  # memory/gates.py ALPHA/ETA/THETA_INIT


def _stream_call_inputs(seed, call, n, d, dtype):
    """Keys, values, queries ``(n, d)`` of call ``call``: l2-normalised rows (norm 1)."""
    rng = np.random.default_rng([seed, call])
    rows = []
    for _ in range(3):
        x = rng.standard_normal((n, d))
        rows.append((x / np.linalg.norm(x, axis=1, keepdims=True)).astype(dtype))
    return rows


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
               prefix=100_000, seed=0, dtype=np.float64, progress=True):
    """Push ``tokens`` tokens through the numba scan in calls of ``call_len``, state passed on.

    Records per call: the memory's global norm, whether outputs and state are finite, and the
    process's RSS; tracemalloc's peak of Python-visible allocations per call. Then checks
    that ``prefix`` tokens in one call equal the same tokens in ``prefix // call_len`` calls.
    """
    import tracemalloc

    from .memory import MemoryState, init_memory, memory_scan
    from .memory.update import tree_norm

    params = init_memory(np.random.default_rng(seed), d, d, depth=depth, expansion=expansion,
                         dtype=dtype)
    state0 = MemoryState.initial(params)
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
    marks = sorted({0, n_calls // 10, n_calls // 2, n_calls - 1})
    return {
        "tokens": tokens, "call_len": call_len, "calls": n_calls, "d": d, "depth": depth,
        "expansion": expansion, "chunk_size": chunk, "dtype": np.dtype(dtype).name,
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
        "machine": machine_info(),
    }


def format_stream(r) -> str:
    lines = [f"long stream: {r['tokens']:,d} tokens in {r['calls']} calls of {r['call_len']:,d}, "
             f"depth-{r['depth']} memory d={r['d']} (hidden {r['d'] * r['expansion']}), "
             f"chunk {r['chunk_size']}, {r['dtype']}, gates {r['gates']}",
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
    return "\n".join(lines)


def _single_threaded_blas():
    """True if BLAS is (or was just made) single-threaded in this process."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return all(os.environ.get(k) == "1" for k in SINGLE_THREAD_ENV)
    threadpool_limits(1)
    return True


def run_from_args(args) -> int:
    """The ``bench`` subcommand: run, print the table, write JSON to ``--out``."""
    if not _single_threaded_blas():
        # BLAS reads its thread count at load time: run again in a child that has it
        env = dict(os.environ, **{k: "1" for k in SINGLE_THREAD_ENV})
        argv = [sys.executable, "-m", "minititans.bench"] + (["--quick"] if args.quick else [])
        if getattr(args, "stream", False):
            argv += ["--stream", "--tokens", str(args.tokens), "--depth", str(args.depth)]
        if args.out is not None:
            argv += ["--out", str(args.out)]
        return subprocess.run(argv, env=env).returncode
    if getattr(args, "stream", False):
        if args.tokens < 1 or args.depth < 1:
            raise ValueError(f"--tokens and --depth must be >= 1, got {args.tokens} and "
                             f"{args.depth}")
        prefix = max(10_000, min(100_000, args.tokens // 10_000 * 10_000))
        result = run_stream(tokens=args.tokens, prefix=prefix, depth=args.depth)
        print(format_stream(result))
        if args.out is not None:
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=2))
            print(f"wrote {out}")
        return 0
    start = time.perf_counter()
    result = run_bench(quick=args.quick)
    result["seconds"] = time.perf_counter() - start
    print(format_table(result))
    print(f"bench: {result['seconds']:.0f} s")
    if args.out is not None:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        print(f"wrote {out}")
    return 0


def add_parser(subparsers):
    """Register the ``bench`` subcommand on an ``argparse`` subparsers object."""
    p = subparsers.add_parser("bench", help="benchmark the numba kernels", description=HELP,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="a small subset (headline memory, attention at T=1024), about a minute")
    p.add_argument("--out", type=Path, default=None, metavar="PATH",
                   help="also write the results as JSON to PATH")
    p.add_argument("--stream", action="store_true",
                   help="long-stream check instead: --tokens tokens through the numba scan in "
                        "calls of 10,000 (finite? memory norm bounded? RSS flat? streamed == "
                        "whole on a 100,000-token prefix?)")
    p.add_argument("--tokens", type=int, default=1_000_000,
                   help="tokens for --stream (default 1,000,000)")
    p.add_argument("--depth", type=int, default=2,
                   help="memory depth for --stream (default 2; d = 64, expansion 4)")
    p.set_defaults(func=run_from_args)
    return p


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minititans.bench")
    sub = parser.add_subparsers(dest="command")
    add_parser(sub)
    args = parser.parse_args(["bench"] + list(sys.argv[1:] if argv is None else argv))
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
