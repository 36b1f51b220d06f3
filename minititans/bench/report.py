"""The goals of docs/performance.md, checked against a run, and the Markdown table."""

from __future__ import annotations


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
