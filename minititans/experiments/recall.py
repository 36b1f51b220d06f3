"""Test-time memorization without any training: write key→value pairs, read them back.

This is part 1 of ``minititans demo`` (also ``minititans recall``). Random unit keys and
random values are written into several memories of the family in ``memory.presets`` by
running the update rule over them (``passes`` times), and then every key is read from the
final memory. The score is the relative recall error

    error = mean_i ||M(k_i) - v_i||² / mean_i ||v_i||²,

so an empty memory (which answers 0) scores 1.0 and a perfect one 0.0. A matrix memory of
key width d can hold at most d independent pairs exactly: its error rises once N > d. The
row "best matrix (least squares)" is the lowest error *any* matrix W can reach on the pairs,
min_W ||K W - V||² / ||V||²: no linear memory, however it is trained, does better; a deep
memory can.
"""

from __future__ import annotations

import textwrap

import numpy as np
from tqdm.auto import tqdm

from .._checks import check_int
from ..memory.models import memory_forward
from ..memory.presets import PRESETS
from ..memory.update import MemoryDivergenceError

# The memories compared by the demo: (label, rule).
DEMO_RULES = (
    ("linear attention", PRESETS["linear_attention"]),
    ("delta rule", PRESETS["delta_rule"]),
    ("Titans linear", PRESETS["titans_linear"]),
    ("Titans linear, no momentum", PRESETS["titans_linear"].with_(eta=0.0, theta=0.5)),
    ("Titans deep", PRESETS["titans_deep"]),
    ("Titans deep, no momentum", PRESETS["titans_deep"].with_(eta=0.0, theta=0.3)),
    ("Titans deep, no forgetting", PRESETS["titans_deep"].with_(alpha=0.0)),
)


def random_pairs(rng, n: int, d: int):
    """``n`` unit-norm keys ``(n, d)`` and values ``(n, d)`` of expected norm 1."""
    keys = rng.standard_normal((n, d))
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    values = rng.standard_normal((n, d)) / np.sqrt(d)
    return keys, values


def recall_error(rule, keys, values, *, passes: int = 1, rng=None, backend="reference"):
    """Write the pairs ``passes`` times with ``rule``, read every key back; relative error."""
    rng = np.random.default_rng(0) if rng is None else rng
    d_in, d_out = keys.shape[1], values.shape[1]
    state = rule.init_state(rng, d_in, d_out)
    stream_k = np.concatenate([keys] * passes)
    stream_v = np.concatenate([values] * passes)
    _, state = rule.scan(state, stream_k, stream_v, stream_k, backend=backend)
    pred = memory_forward(state.params, keys)  # (n, d_out), Eq. 15: read without writing
    return float(np.mean(np.sum((pred - values) ** 2, axis=1)) / np.mean(np.sum(values**2, axis=1)))


LEAST_SQUARES = "best matrix (least squares)"


def least_squares_error(keys, values) -> float:
    """The lowest relative recall error of any matrix memory: min_W ||K W - V||² / ||V||²."""
    W, *_ = np.linalg.lstsq(keys, values, rcond=None)
    return float(np.sum((keys @ W - values) ** 2) / np.sum(values**2))


def recall_experiment(*, d: int = 16, sizes=(4, 8, 16, 32, 64), passes=(1, 16), seed: int = 0,
                      rules=DEMO_RULES, backend: str = "reference", progress: bool = True) -> dict:
    """The recall table: every rule × number of pairs × number of passes.

    Returns a JSON-ready dict ``{"d", "sizes", "passes", "seed", "rows": [{"memory",
    "n_pairs", "passes", "error"}]}``; ``error`` is None where the memory diverged.
    """
    d = check_int("d", d, minimum=1)
    sizes = [check_int("sizes", n, minimum=1) for n in sizes]
    passes = [check_int("passes", p, minimum=1) for p in passes]
    jobs = [(label, rule, n, p) for p in passes for label, rule in rules for n in sizes]
    rows = []
    for label, rule, n, p in tqdm(jobs, desc="recall", disable=not progress, leave=False):
        rng = np.random.default_rng([seed, n])
        keys, values = random_pairs(rng, n, d)
        try:
            err = recall_error(rule, keys, values, passes=p, rng=rng, backend=backend)
        except MemoryDivergenceError:
            err = None
        rows.append({"memory": label, "n_pairs": n, "passes": p, "error": err})
    for p in passes:
        for n in sizes:
            keys, values = random_pairs(np.random.default_rng([seed, n]), n, d)
            rows.append({"memory": LEAST_SQUARES, "n_pairs": n, "passes": p,
                         "error": least_squares_error(keys, values)})
    return {"d": d, "sizes": sizes, "passes": passes, "seed": seed, "rows": rows}


def format_recall_table(result: dict) -> str:
    """One text table per pass count: memories down, number of pairs across."""
    lines = []
    for p in result["passes"]:
        rows = [r for r in result["rows"] if r["passes"] == p]
        labels = list(dict.fromkeys(r["memory"] for r in rows))
        title = f"relative recall error, key width d = {result['d']}, {p} pass(es) "
        lines.append(title + "(0 = perfect, 1 = empty memory)")
        head = f"{'memory':28s}" + "".join(f"{'N=' + str(n):>9s}" for n in result["sizes"])
        lines += [head, "-" * len(head)]
        for label in labels:
            cells = []
            for n in result["sizes"]:
                err = next(r["error"] for r in rows if r["memory"] == label and r["n_pairs"] == n)
                cells.append(f"{'diverged':>9s}" if err is None else f"{err:9.3f}")
            lines.append(f"{label:28s}" + "".join(cells))
        lines += [textwrap.fill(line, 92, subsequent_indent="  ") for line in reading(result, p)]
        lines.append("")
    return "\n".join(lines)


def _error(result, memory, n, p):
    return next((r["error"] for r in result["rows"] if r["memory"] == memory
                 and r["n_pairs"] == n and r["passes"] == p), None)


def reading(result: dict, p: int) -> list[str]:
    """What the table of ``p`` passes shows, each line said only where its numbers show it."""
    out = []
    n0, d = min(result["sizes"]), result["d"]
    titans = _error(result, "Titans linear", n0, p)
    delta = _error(result, "delta rule", n0, p)
    if p == 1 and titans is not None and delta is not None and titans > delta + 0.1:
        out.append(f"Reading: after one write, Titans linear ({titans:.2f} at N={n0}) trails "
                   f"the delta rule ({delta:.2f}): with momentum eta = 0.9 a write reaches M "
                   "over the following tokens (Eqs. 13–14), so the last writes are still in the "
                   "momentum when the reading starts. Without momentum it is the delta rule. "
                   "docs: tutorial/04-momentum-forgetting.")
    lin = _error(result, "linear attention", n0, p)
    if p > 1 and lin is not None and lin > 1.0:
        out.append(f"Reading: linear attention only adds, never erases, so writing a pair {p} "
                   f"times scales its value by {p}: error ~ ({p} - 1)^2 = {(p - 1) ** 2} at "
                   f"N={n0} (measured {lin:.0f}), and cross-talk grows with N. "
                   "docs: tutorial/02-linear-attention.")
    beyond = [n for n in result["sizes"] if n > d]
    below = [n for n in beyond
             if (e := _error(result, "Titans deep", n, p)) is not None
             and e < _error(result, LEAST_SQUARES, n, p)]
    if below:
        out.append(f"Reading: past N = d = {d}, Titans deep stores the pairs better than the best "
                   f"matrix can (N = {', '.join(map(str, below))}): a deep memory has more room "
                   "than its key width. docs: tutorial/05-deep-memory.")
    return out
