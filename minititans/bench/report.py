"""The goals of docs/performance.md, checked against a run, and the Markdown table."""

from __future__ import annotations


def _find(rows, kernel, config, dtype=None):
    for r in rows:
        if r["kernel"] == kernel and r.get("config") == config and (
                dtype is None or r.get("dtype") == dtype):
            return r
    return None


# a run counts as busy when the load average passes this fraction of the cores, or when the
# matmul peak re-measured after a row falls below this fraction of the peak at the start
BUSY_LOAD_PER_CORE = 0.5
BUSY_PEAK_DROP = 0.8


def machine_noise(result) -> dict:
    """How quiet the machine was during a run, from what the run itself recorded.

    Two signs of other work competing for the cores: the 1-minute load average at the start
    and end of the run, and the single-thread matmul peak that every scan row measures again
    right after itself, against the peak measured at the start. Returns ``{"busy": bool,
    "max_load": float | None, "cores": int, "min_peak_ratio": float | None, "text": str}``.
    """
    cores = result["machine"].get("cores") or 1
    loads = [x for x in result["machine"].get("load_average_start_end") or [] if x is not None]
    max_load = max(loads) if loads else None
    ratios = [r["local_peak_gflops"] / result["peak_gflops"][r["dtype"]] for r in result["rows"]
              if r.get("local_peak_gflops") and r.get("dtype") in result["peak_gflops"]]
    min_ratio = min(ratios) if ratios else None
    busy = bool((max_load is not None and max_load > BUSY_LOAD_PER_CORE * cores)
                or (min_ratio is not None and min_ratio < BUSY_PEAK_DROP))
    signs = []
    if max_load is not None:
        signs.append(f"load average up to {max_load:.2f} on {cores} cores")
    if min_ratio is not None:
        signs.append(f"the matmul peak during the run fell to {min_ratio:.0%} of its start")
    if busy:
        text = ("Machine: BUSY (" + "; ".join(signs) + "). Other processes competed for the "
                "cores, so the speeds and goals below are low: rerun on a quiet machine.")
    else:
        text = "Machine: quiet (" + "; ".join(signs or ["no load measured"]) + ")."
    return dict(busy=busy, max_load=max_load, cores=cores, min_peak_ratio=min_ratio, text=text)


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
    noise = machine_noise(result)
    lines += ["", noise["text"], "", "| goal | measured | met |", "|---|---|---|"]
    for g in result["goals"]:
        met = "n/a" if g["met"] is None else ("yes" if g["met"] else "**no**")
        if g["met"] is False and noise["busy"]:
            met += " (busy machine)"
        lines.append(f"| {g['goal']} | {g.get('text', 'not measured')} | {met} |")
    if result.get("models"):
        lines += ["", format_models(result["models"])]
    return "\n".join(lines)


def format_models(models) -> str:
    """The model rows (:func:`minititans.bench.models.run_model_bench`) as a Markdown table."""
    s = models["settings"]
    lines = [f"Models of `minititans needle` (its default settings), batch {s['batch_size']}, "
             f"the {s['task']!r} task's vocabulary; train = loss + gradient, inference = "
             "model.apply without a gradient. Best of "
             f"{s['repeats']} numba / {s['ref_repeats']} reference runs, interleaved; "
             f"warm-up ({s['warm_up']}) excluded; numba on {s['numba_threads']} thread. "
             f"Load average at start/end: {models['load_average_start_end']}.", "",
             "| model | what | length | backend | tokens/s | speedup | other |",
             "|---|---|---:|---|---:|---:|---|"]
    for r in models["rows"]:
        speedup = f"{r['speedup']:.1f}x" if r.get("speedup") is not None else ""
        lines.append(f"| {r['model']} | {r['what']} | {r['length']:,} | {r['backend']} | "
                     f"{r['tokens_per_s']:,.0f} | {speedup} | {r.get('note', '')} |")
    return "\n".join(lines)
