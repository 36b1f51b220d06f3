"""The kernel rows: memory scan, forward+VJP, batch threads, first call, attention."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import numpy as np

from .report import goals, machine_noise
from .timing import best_time, interleaved_best, load_average, machine_info, matmul_peak

HEADLINE = dict(d=64, depth=2, expansion=4)  # the configuration the goals are stated for


def scan_flops_per_token(shapes):
    """Counted FLOPs of one token of the memory scan (module docstring): 22 d h at depth 2."""
    return sum((10 + (2 if i else 0)) * f * o for i, (f, o) in enumerate(shapes))


def _scan_inputs(d, depth, expansion, T, dtype, seed=0, B=None):
    from ..memory import MemoryState, init_memory

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
    from ..memory import memory_scan

    state, k, v, q, gates = _scan_inputs(d, depth, expansion, T, dtype)
    if backend == "numba":
        memory_scan(state, k[:chunk + 1], v[:chunk + 1], q[:chunk + 1], chunk_size=chunk,
                    backend=backend, **gates)  # compile (or load the cache) outside the timing
    return lambda: memory_scan(state, k, v, q, chunk_size=chunk, backend=backend, **gates)


def scan_row(d, depth, chunk, dtype, T, T_ref, expansion=4):
    from ..memory import init_memory

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

    from ..memory import MemoryState, memory_scan

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

    from ..memory.scan import numba_memory_scan_batched

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
x /= np.linalg.norm(x, axis=1, keepdims=True)  # unit keys, as the models' (raw ones diverge)
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


def attention_rows(T, T_ref, dtype, heads=4, d=64, window=256, prefix=16):
    import autograd.numpy as anp
    from autograd import grad

    from .. import attention as ref_att
    from .. import linear_attention as _la  # noqa: F401  (the module, not the function)
    from ..kernels import attention as fast

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
    # training: forward + gradient of every input, the numba VJP against autograd through the
    # reference loop; per element of W: forward 7, replay from checkpoints 10, backward 15
    kn = k[0] / np.linalg.norm(k[0], axis=-1, keepdims=True)  # unit keys, as in the models

    def delta_grad(n, backend):
        def f(args):
            return anp.sum(ref_lin.gated_delta_rule(*args, 0.01, backend=backend))
        return grad(f)([q[0, :n], kn[:n], v[0, :n], beta[:n]])

    add("gated_delta_rule fwd+bwd", f"d={d}", 32 * d * d,
        lambda n: delta_grad(n, "numba"), lambda n: delta_grad(n, "reference"),
        T, T_ref // 4)
    return rows


def run_bench(quick=False, progress=True, models=None):
    """Run every measurement; returns the JSON-ready result dict.

    The kernel rows are under ``"rows"``, the model rows of ``models`` (a
    :class:`~minititans.bench.models.ModelBenchSettings`; default :data:`~minititans.bench.
    models.QUICK` with ``quick``, else :data:`~minititans.bench.models.FULL`) under
    ``"models"``.
    """
    from tqdm import tqdm

    from .models import FULL, QUICK, ModelBenchSettings, run_model_bench

    if models is None:
        models = QUICK if quick else FULL
    if not isinstance(models, ModelBenchSettings):
        raise TypeError(f"models must be a ModelBenchSettings or None, got "
                        f"{type(models).__name__}")

    load_start = load_average()
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
    result["models"] = run_model_bench(models, progress=progress)
    result["machine"]["load_average_start_end"] = [load_start, load_average()]
    result["goals"] = goals(result)
    result["noise"] = machine_noise(result)
    return result
