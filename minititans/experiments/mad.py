r"""MAD in miniature ("MAD-mini"): the six MAD tasks for every model here (Titans Table 10).

The NeurIPS version of Titans reports the MAD benchmark (Poli et al. 2024) for a
Transformer, Gated DeltaNet and the Titans LMM (:data:`PUBLISHED`). This module trains
every model of the library on the six tasks of :mod:`minititans.tasks.mad` at (nearly)
equal parameter count, 2 blocks, a learning-rate sweep and several seeds, and reports the
accuracy on held-out sequences next to the published rows.

**This is MAD-mini, not MAD.** What differs from the protocol of the MAD paper
(:func:`protocol_differences` says it in the output, too):

* width about 29k parameters per model (``d_model`` 28-40) instead of MAD's width 128;
* shorter sequences (:data:`MINI_TASKS`: 32-48 tokens instead of 128-256 for recall and
  copying, 8 tokens to copy instead of 16);
* 120 optimiser steps of 4 freshly drawn sequences instead of 200 epochs over a fixed
  training set of 12,800 sequences (256 for memorization);
* one task setting each instead of MAD's difficulty sweeps (vocabulary, length, training
  set size, noise), whose average is the MAD score;
* a sweep of two learning rates and no weight-decay sweep (MAD: 3 x 2), the best one
  chosen on a validation set (MAD picks the best run), the loss only on answer positions.

A job is one (model, task, seed, lr); jobs run in parallel through :func:`.pool.run_jobs`.
The command is ``minititans mad``; the plot is :func:`minititans.viz.plot_mad`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..models import DISPLAY_NAMES, Model, ModelConfig, model_for, tree_leaves
from ..tasks import MAD_TASKS
from ..training import TrainConfig, evaluate, train
from .pool import default_workers, resolve_backend, run_jobs

TASK_ORDER = ("in_context_recall", "fuzzy_in_context_recall", "noisy_in_context_recall",
              "selective_copying", "compression", "memorization")
MODEL_ORDER = ("transformer", "swa", "linear_attention", "gated_delta", "lmm", "mac", "mag",
               "mal")

# Titans (NeurIPS version) Table 10, accuracy %; MAD reports ICR and noisy ICR in one column
PUBLISHED = {
    "Transformer": {"compression": 49.4, "in_context_recall": 100.0,
                    "noisy_in_context_recall": 100.0, "fuzzy_in_context_recall": 48.2,
                    "selective_copying": 95.9, "memorization": 83.8},
    "Gated DeltaNet": {"compression": 44.8, "in_context_recall": 100.0,
                       "noisy_in_context_recall": 100.0, "fuzzy_in_context_recall": 32.5,
                       "selective_copying": 96.2, "memorization": 81.7},
    "LMM": {"compression": 49.6, "in_context_recall": 100.0, "noisy_in_context_recall": 100.0,
            "fuzzy_in_context_recall": 49.7, "selective_copying": 99.4, "memorization": 83.5},
}

# MAD-mini's task sizes (MAD's own: vocab as here, lengths 128, 128, 128, 256, 32, 32)
MINI_TASKS = {
    "in_context_recall": dict(vocab_size=16, length=32),
    "fuzzy_in_context_recall": dict(vocab_size=16, length=48, motif_size=3),
    "noisy_in_context_recall": dict(vocab_size=32, noise_vocab_size=16, frac_noise=0.2,
                                    length=32),
    "selective_copying": dict(vocab_size=16, length=48, num_tokens=8),
    "compression": dict(vocab_size=16, length=32),
    "memorization": dict(vocab_size=256, length=32),
}

# d_model per model: about 29k parameters each at vocab 16, 2 blocks (the counts are in the
# output; attention blocks are cheaper per width than memory blocks, so they get more width)
D_MODEL = {"transformer": 40, "swa": 40, "linear_attention": 38, "gated_delta": 38, "lmm": 32,
           "mac": 28, "mag": 28, "mal": 28}


def protocol_differences(s) -> str:
    """How a run of settings ``s`` differs from the MAD protocol, in one paragraph."""
    lengths = sorted({s.task_sizes[t]["length"] for t in s.tasks})

    def span(xs):
        return f"{xs[0]}" if xs[0] == xs[-1] else f"{xs[0]}-{xs[-1]}"

    d = sorted({s.d_model[m] for m in s.models})
    task = MAD_TASKS["in_context_recall"](**MINI_TASKS["in_context_recall"])  # vocab 16
    n = sorted(count_params(build_model(m, task, s, "reference")) for m in s.models)
    steps, batch = s.train["steps"], s.train["batch_size"]
    copied = s.task_sizes.get("selective_copying", MINI_TASKS["selective_copying"])["num_tokens"]
    return (f"MAD-mini, not MAD: {span([round(n[0], -2), round(n[-1], -2)])} parameters per "
            f"model at vocab 16 (d_model {span(d)}) instead of width 128; sequences of "
            f"{span(lengths)} tokens (MAD: 32-256) and {copied} tokens to copy (MAD: 16); "
            f"{steps} steps of {batch} fresh sequences "
            f"({steps * batch} in all) instead of 200 epochs over 12,800 (memorization: 256); "
            "one setting per task instead of MAD's difficulty sweeps; "
            f"{len(s.lrs)} learning rate(s) {list(s.lrs)}, no weight-decay sweep, the best lr "
            "picked on a validation set; loss on the answer positions only.")


@dataclass(frozen=True)
class MadSettings:
    """The default MAD-mini run (``minititans mad``); :data:`QUICK` is ``--quick``."""

    models: tuple = MODEL_ORDER
    tasks: tuple = TASK_ORDER
    seeds: tuple = (0, 1, 2)
    lrs: tuple = (3e-3, 1e-2)        # MAD: 1e-4, 5e-4, 1e-3 over far longer training
    task_sizes: dict = field(default_factory=lambda: {k: dict(v) for k, v in MINI_TASKS.items()})
    d_model: dict = field(default_factory=lambda: dict(D_MODEL))
    model: dict = field(default_factory=lambda: dict(num_layers=2, num_heads=2, window=16,
                                                     segment_len=16))
    train: dict = field(default_factory=lambda: dict(steps=120, batch_size=4, warmup=12))
    val_samples: int = 32            # picks the lr (seeds 30_000 + seed)
    eval_samples: int = 96           # the reported accuracy (seeds 40_000 + seed)
    backend: str = "auto"

    def __post_init__(self):
        for name, allowed in (("models", MODEL_ORDER), ("tasks", TASK_ORDER)):
            val = getattr(self, name)
            bad = [v for v in val if v not in allowed]
            if not val or bad:
                raise ValueError(f"{name} must be a non-empty subset of {allowed}, got {val!r}")
        if not self.seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0
                                 for s in self.seeds):
            raise ValueError(f"seeds must be non-empty ints >= 0, got {self.seeds!r}")
        if not self.lrs or any(not isinstance(lr, (int, float)) or not lr > 0
                               for lr in self.lrs):
            raise ValueError(f"lrs must be non-empty floats > 0, got {self.lrs!r}")


QUICK = MadSettings(seeds=(0,), train=dict(steps=25, batch_size=4, warmup=5), val_samples=16,
                    eval_samples=32,
                    task_sizes={**MINI_TASKS,
                                "fuzzy_in_context_recall": dict(vocab_size=16, length=32),
                                "selective_copying": dict(vocab_size=16, length=32,
                                                          num_tokens=8)})


def make_task(name: str, s: MadSettings, *, evaluation: bool = False):
    """The task ``name`` at MAD-mini's size; ``evaluation`` gives fuzzy recall full-size keys."""
    kwargs = dict(s.task_sizes[name])
    if evaluation and name == "fuzzy_in_context_recall":
        kwargs["fixed_keys"] = True  # MAD evaluates fuzzy recall with keys of full motif size
    return MAD_TASKS[name](**kwargs)


def build_model(name: str, task, s: MadSettings, backend: str) -> Model:
    cfg = ModelConfig(model=name, vocab_size=task.vocab_size, d_model=s.d_model[name],
                      backend=backend, **s.model)
    return model_for(cfg, task)


def count_params(model: Model) -> int:
    return int(sum(np.size(w) for w in tree_leaves(model.init(np.random.default_rng(0)))))


# --- one job, the experiment ------------------------------------------------------------------


def _mad_job(args) -> dict:
    name, task_name, seed, lr, s, backend = args
    task = make_task(task_name, s)
    test_task = make_task(task_name, s, evaluation=True)
    model = build_model(name, task, s, backend)
    cfg = TrainConfig(seed=seed, lr=lr, **s.train)
    start = time.perf_counter()
    try:
        params, _, history = train(model, task, cfg, progress=False)
        val = evaluate(model, params, test_task, num_samples=s.val_samples, seed=30_000 + seed)
        test = evaluate(model, params, test_task, num_samples=s.eval_samples,
                        seed=40_000 + seed)
        out = {"val": val["accuracy"], "val_loss": val["loss"], "accuracy": test["accuracy"],
               "diverged": False}
    except FloatingPointError:  # MemoryDivergenceError: the inner loop blew up
        out = {"val": -1.0, "val_loss": math.inf, "accuracy": 0.0, "diverged": True}
    return {"model": name, "task": task_name, "seed": seed, "lr": lr, **out,
            "seconds": time.perf_counter() - start}


# relative cost of a training step, per model (measured: MAC loops over segments in
# Python; the delta rules run on their numba VJP); the dearest jobs go first so two
# workers end together
_COST = {"gated_delta": 1.5, "mac": 5.0, "mag": 3.0, "lmm": 2.0, "mal": 2.0}


def _warm_up(models, backend: str) -> None:
    """Compile the numba kernels once in this process, before the workers fork."""
    if backend != "numba":
        return
    task = make_task("in_context_recall", replace(QUICK, task_sizes=MINI_TASKS))
    small = replace(QUICK, d_model={m: 8 for m in MODEL_ORDER})
    for name in models:
        if name in ("lmm", "mac", "mag", "mal"):
            model = build_model(name, task, small, backend)
            params, _, _ = train(model, task, TrainConfig(steps=1, batch_size=1, warmup=0),
                                 progress=False)
            evaluate(model, params, task, num_samples=1)  # the forward-only kernels


def mad_experiment(settings: MadSettings = MadSettings(), *, progress: bool = True,
                   workers: int | None = None) -> tuple[dict, dict]:
    """Train every (model, task, seed, lr) of ``settings``; keep the best lr per seed.

    The lr of each (model, task, seed) is chosen by accuracy on a validation set (ties: the
    lower validation loss); the reported accuracy is on a separate test set. Evaluation
    sequences come from seeds never used in training.

    Returns:
        ``(result, timing)``: ``result`` is the ``"mad"`` dict ``{"rows": [{"task", "model",
        "seed", "lr", "accuracy"}], "params", "d_model", "chance", "tasks", "diverged",
        "protocol"}``; ``timing`` has the wall time and the seconds per job.
    """
    s = settings
    backend = resolve_backend(s.backend)
    start = time.perf_counter()
    _warm_up(s.models, backend)
    jobs = [(m, t, seed, lr, s, backend) for m in s.models for t in s.tasks
            for seed in s.seeds for lr in s.lrs]
    done = run_jobs(_mad_job, jobs, desc="mad", progress=progress, workers=workers,
                    cost=lambda j: _COST.get(j[0], 1.0) * s.task_sizes[j[1]]["length"])
    rows, diverged = [], []
    for m in s.models:
        for t in s.tasks:
            for seed in s.seeds:
                runs = [d for d in done if (d["model"], d["task"], d["seed"]) == (m, t, seed)]
                best = max(runs, key=lambda d: (d["val"], -d["val_loss"], -d["lr"]))
                rows.append({"task": t, "model": DISPLAY_NAMES[m], "seed": seed,
                             "lr": float(best["lr"]), "accuracy": float(best["accuracy"])})
                diverged += [{k: d[k] for k in ("task", "seed", "lr")}
                             | {"model": DISPLAY_NAMES[m]} for d in runs if d["diverged"]]
    params = {DISPLAY_NAMES[m]: {t: count_params(build_model(m, make_task(t, s), s, "reference"))
                                 for t in s.tasks} for m in s.models}
    result = {"rows": rows, "params": params,
              "d_model": {DISPLAY_NAMES[m]: s.d_model[m] for m in s.models},
              "chance": {t: make_task(t, s).chance for t in s.tasks},
              "tasks": {t: dict(s.task_sizes[t]) for t in s.tasks},
              "train": dict(s.train), "lrs": list(s.lrs), "diverged": diverged,
              "protocol": protocol_differences(s)}
    timing = {"seconds": round(time.perf_counter() - start, 1), "backend": backend,
              "workers": workers or default_workers(len(jobs)), "jobs": len(jobs),
              "model_seconds": {DISPLAY_NAMES[m]: round(sum(d["seconds"] for d in done
                                                            if d["model"] == m), 1)
                                for m in s.models}}
    return result, timing


# --- the table ----------------------------------------------------------------------------------

COLUMNS = {"compression": "Compress", "in_context_recall": "ICR",
           "noisy_in_context_recall": "Noisy ICR", "fuzzy_in_context_recall": "Fuzzy ICR",
           "selective_copying": "Sel. copy", "memorization": "Memorize"}
# the published table's column order
TABLE_ORDER = ("compression", "in_context_recall", "noisy_in_context_recall",
               "fuzzy_in_context_recall", "selective_copying", "memorization")


def summarize(result: dict) -> dict:
    """``{model: {task: (mean, min, max)}}`` over seeds, in %, plus ``"MAD-mini"`` (the mean
    over tasks of the seed means)."""
    out = {}
    for m in dict.fromkeys(r["model"] for r in result["rows"]):
        cells = {}
        for t in dict.fromkeys(r["task"] for r in result["rows"]):
            accs = [100 * r["accuracy"] for r in result["rows"]
                    if r["model"] == m and r["task"] == t]
            cells[t] = (float(np.mean(accs)), float(min(accs)), float(max(accs)))
        cells["MAD-mini"] = (float(np.mean([c[0] for c in cells.values()])),) * 3
        out[m] = cells
    return out


def rankings(result: dict) -> dict:
    """Per task, the order of the published models here and in the paper (best first), and
    whether the order here is ``separated`` (no overlap of the seeds' min-max ranges)."""
    here = summarize(result)
    common = [m for m in PUBLISHED if m in here]
    out = {}
    for t in [t for t in TABLE_ORDER if t in result["chance"]] + ["MAD-mini"]:
        def pub(m, t=t):
            row = PUBLISHED[m]
            return (np.mean([row[c] for c in TABLE_ORDER if c in result["chance"]])
                    if t == "MAD-mini" else row[t])
        mine = sorted(common, key=lambda m: -here[m][t][0])
        paper = sorted(common, key=lambda m: -pub(m))
        # separated: each model's worst seed beats the next one's best (else it is noise)
        separated = all(here[a][t][1] > here[b][t][2] for a, b in zip(mine, mine[1:]))
        out[t] = {"here": mine, "published": paper, "match": mine == paper,
                  "separated": t != "MAD-mini" and separated}
    return out


def format_mad_table(result: dict) -> str:
    """Models down, tasks across: mean (min-max) over seeds in %, then the published rows."""
    tasks = [t for t in TABLE_ORDER if t in result["chance"]]
    stats = summarize(result)
    seeds = sorted({r["seed"] for r in result["rows"]})
    w = 17
    head_ = f"{'model':17s}{'params':>8s}" + "".join(f"{COLUMNS[t]:>{w}s}" for t in tasks)
    head_ += f"{'MAD-mini':>10s}"
    lines = [f"MAD-mini accuracy (%), mean (min-max) over seeds {seeds}, best of lr "
             f"{result['lrs']} per seed (picked on a validation set)", head_, "-" * len(head_)]
    for m, cells in stats.items():
        n = result["params"][m].get("in_context_recall", next(iter(result["params"][m].values())))
        row = f"{m:17s}{n:8d}"
        for t in tasks:
            mean, lo, hi = cells[t]
            row += f"{f'{mean:.1f} ({lo:.0f}-{hi:.0f})':>{w}s}"
        lines.append(row + f"{cells['MAD-mini'][0]:10.1f}")
    lines.append(f"{'chance':25s}" + "".join(f"{100 * result['chance'][t]:{w}.1f}"
                                            for t in tasks))
    lines.append("published (Titans NeurIPS Table 10, full MAD; ICR and noisy ICR are one "
                 "column there):")
    for m, row in PUBLISHED.items():
        mean = np.mean([row[t] for t in tasks])
        lines.append(f"{m + ' (paper)':25s}" + "".join(f"{row[t]:{w}.1f}" for t in tasks)
                     + f"{mean:10.1f}")
    lines.append("ranking of Transformer / Gated DeltaNet / LMM, here vs published:")
    for t, r in rankings(result).items():
        if len(r["here"]) > 1:
            lines.append(f"  {COLUMNS.get(t, t):10s} here {' > '.join(r['here'])}; paper "
                         f"{' > '.join(r['published'])}: {'same' if r['match'] else 'differs'}"
                         + ("" if r["separated"] or t == "MAD-mini"
                            else " (seed ranges overlap: not a clear order)"))
    if result["diverged"]:
        lines.append(f"diverged runs (scored 0): {result['diverged']}")
    lines.append(result["protocol"])
    return "\n".join(lines)


def run_mad(settings: MadSettings, out_dir: Path | None = None, *, progress: bool = True,
            workers: int | None = None) -> dict:
    """Run, print the table and the timing; with ``out_dir`` write ``mad.png`` and the
    ``"mad"`` key of ``results.json``. Returns the result dict."""

    n = len(settings.models) * len(settings.tasks) * len(settings.seeds) * len(settings.lrs)
    print(f"MAD-mini: {len(settings.models)} models x {len(settings.tasks)} tasks x "
          f"{len(settings.seeds)} seed(s) x {len(settings.lrs)} learning rates = {n} runs of "
          f"{settings.train['steps']} steps.\n{protocol_differences(settings)}\n")
    result, timing = mad_experiment(settings, progress=progress, workers=workers)
    print(format_mad_table(result))
    print(f"mad: {timing['seconds']:.0f} s on {timing['workers']} worker(s), backend "
          f"{timing['backend']}")
    if out_dir is not None:
        from ..viz import plot_mad, write_outputs

        write_outputs(out_dir, "mad", result, lambda r: plot_mad(
            r, stats=summarize(r), published=PUBLISHED, columns=COLUMNS, order=TABLE_ORDER),
            "mad.png")
    return result
