"""Titans Table 5 in miniature: the LMM against its ablations, over several seeds.

The base model is the LMM of the needle experiment (``NeedleSettings().model``, with the
window of the settings), so the two experiments cannot drift apart; each row changes one
switch of that config (:data:`ABLATIONS`), and ``--with-titans`` adds MAC, MAG and MAL.
The command is ``minititans ablate``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from ..models import Model, ModelConfig
from ..tasks import NeedleTask, make_task
from ..training import TrainConfig, evaluate, train
from .needle import NeedleSettings
from .pool import resolve_backend, run_jobs

NEEDLE = NeedleSettings()
ABLATIONS = {
    # row label: changes to the LMM (Titans Table 5's rows)
    "LMM": {},
    "w/o momentum": {"momentum": False},
    "w/o weight decay": {"forgetting": False},
    "w/o conv": {"conv_kernel": 0},
    "w/o persistent memory": {"num_persistent": 0},
    "deep memory (L_M = 2)": {"memory_depth": 2, "max_grad_norm": 1.0},
}
TITANS_ROWS = {"MAC": {"model": "mac"}, "MAG": {"model": "mag"}, "MAL": {"model": "mal"}}
# the needle experiment's per-model training changes, keyed by row label
ROW_TRAIN_OVERRIDES = {"MAC": NEEDLE.train_overrides["mac"]}


@dataclass(frozen=True)
class AblationSettings:
    task: str = "mqar"              # "mqar" or "needle-n" (a 3-digit number)
    window: int = NEEDLE.window     # for MAC/MAG/MAL rows; the LMM has no attention
    train_length: int = 32          # MQAR: 8 key-value pairs
    eval_length: int = 64           # MQAR: 16 pairs, twice as many as in training
    seeds: tuple = (0, 1, 2)
    eval_samples: int = 200
    rows: tuple = tuple(ABLATIONS)
    model: dict = field(default_factory=lambda: dict(NEEDLE.model))  # the needle LMM
    train: dict = field(default_factory=lambda: dict(NEEDLE.train))
    backend: str = "auto"


def row_config(label: str, s: AblationSettings, vocab_size: int, backend: str) -> ModelConfig:
    """The model config of one row: the needle LMM with the row's change."""
    changes = {**ABLATIONS, **TITANS_ROWS}[label]
    return ModelConfig(**{"model": "lmm", **s.model, "window": s.window,
                          "segment_len": s.window, **changes, "vocab_size": vocab_size,
                          "backend": backend})


def _ablation_job(args) -> dict:
    label, seed, s, backend = args
    task = make_task(s.task, s.train_length)
    if isinstance(task, NeedleTask):
        task = replace(task, placement="anywhere")
    model = Model(row_config(label, s, task.vocab_size, backend))
    try:
        train_cfg = TrainConfig(seed=seed, **{**s.train, **ROW_TRAIN_OVERRIDES.get(label, {})})
        params, _, _ = train(model, task, train_cfg, progress=False)
        acc = evaluate(model, params, make_task(s.task, s.eval_length),
                       num_samples=s.eval_samples, seed=20_000 + seed)["accuracy"]
    except FloatingPointError:  # MemoryDivergenceError: the inner loop blew up
        acc = None
    return {"row": label, "seed": seed, "accuracy": acc}


def ablation_experiment(settings: AblationSettings = AblationSettings(), *,
                        progress: bool = True, workers: int | None = None) -> dict:
    """Train every row of ``settings`` with every seed; accuracy at ``eval_length``.

    Returns:
        ``{"task", "train_length", "eval_length", "chance", "seeds", "rows": [{"model",
        "accuracies", "mean", "std", "diverged"}]}``; a diverged run counts as ``None``
        (excluded from the mean, counted in ``"diverged"``).
    """
    backend = resolve_backend(settings.backend)
    jobs = [(label, seed, settings, backend) for label in settings.rows
            for seed in settings.seeds]
    done = run_jobs(_ablation_job, jobs, desc="ablate", progress=progress, workers=workers)
    rows = []
    for label in settings.rows:
        accs = [d["accuracy"] for d in done if d["row"] == label]
        ok = [a for a in accs if a is not None]
        rows.append({"model": label, "accuracies": accs,
                     "mean": float(np.mean(ok)) if ok else None,
                     "std": float(np.std(ok)) if ok else None,
                     "diverged": len(accs) - len(ok)})
    return {"task": settings.task, "train_length": settings.train_length,
            "eval_length": settings.eval_length,
            "chance": make_task(settings.task, settings.eval_length).chance,
            "seeds": list(settings.seeds), "rows": rows}


def format_ablation_table(result: dict) -> str:
    lines = [f"accuracy (%) on {result['task']} at length {result['eval_length']} "
             f"(trained at {result['train_length']}), mean +- std over seeds "
             f"{result['seeds']}, chance = {100 * result['chance']:.1f}%",
             f"{'model':24s}{'mean':>8s}{'std':>8s}   per seed", "-" * 64]
    for r in result["rows"]:
        per = " ".join("div" if a is None else f"{100 * a:.0f}" for a in r["accuracies"])
        if r["mean"] is None:
            lines.append(f"{r['model']:24s}{'-':>8s}{'-':>8s}   {per}")
        else:
            lines.append(f"{r['model']:24s}{100 * r['mean']:8.1f}{100 * r['std']:8.1f}   {per}")
    return "\n".join(lines)
