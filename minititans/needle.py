"""Part 2 of the demo: who can find a passkey that has left the attention window?

Titans Table 2 (S-NIAH) in miniature. Sliding-window attention (SWA) and the four Titans
(LMM, MAC, MAG, MAL) are trained on the passkey task (:class:`~minititans.tasks.NeedleTask`,
``"pk"``) at a training length, then asked for the passkey at 1x, 2x, 4x and 8x the
attention window. Beyond 1x the needle is outside the window, so SWA can only guess
(chance = 1/10) and only a memory can answer.

The ``needle``, ``train`` and ``ablate`` subcommands are registered by :func:`add_parser`
(the miniature ablation of Table 5 is :func:`ablation_experiment`).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .io import update_results_json
from .models import DISPLAY_NAMES, Model, ModelConfig
from .tasks import NeedleTask
from .training import TrainConfig, evaluate, numba_available, train

# workers are forked where the platform allows it, so a script calling the experiment needs
# no ``if __name__ == "__main__"`` guard (which "spawn" and "forkserver" would require)
_SPAWN = multiprocessing.get_context(
    "fork" if "fork" in multiprocessing.get_all_start_methods() else None)


@dataclass(frozen=True)
class NeedleSettings:
    """The demo's experiment: one model config per name, one training recipe, four lengths."""

    models: tuple = ("swa", "lmm", "mac", "mag", "mal")
    kind: str = "pk"                 # the passkey task (paper: S-NIAH-PK)
    window: int = 16                 # attention window w (MAC's segment too)
    train_multiple: int = 2          # train length L = train_multiple * w
    eval_multiples: tuple = (1, 2, 4, 8)
    eval_samples: int = 200          # sequences per length
    # a linear memory (L_M = 1) read token by token; forgetting starts at 0.1% per token
    model: dict = field(default_factory=lambda: dict(d_model=32, num_layers=1, num_heads=2,
                                                     memory_depth=1, chunk_size=1,
                                                     alpha_init=0.001))
    train: dict = field(default_factory=lambda: dict(steps=300, batch_size=8, lr=1e-2,
                                                     warmup=10))
    # per-model changes to ``train``: MAC (attention and memory in series, the hardest to
    # fit) often stalls at the common step size; see docs/design-decisions.md
    train_overrides: dict = field(default_factory=lambda: {"mac": dict(lr=4e-3, warmup=20)})
    seed: int = 0
    backend: str = "auto"            # "auto": numba if its gradient works, else reference


# ``--full``: a wider window (so 8x is 256 tokens), wider models, longer training
FULL = NeedleSettings(window=32, eval_samples=500,
                      model=dict(d_model=48, num_layers=1, num_heads=2, memory_depth=1,
                                 chunk_size=1, alpha_init=0.001),
                      train=dict(steps=400, batch_size=16, lr=5e-3, warmup=20),
                      train_overrides={"mac": dict(steps=500, lr=3e-3, warmup=30)})


def resolve_backend(backend: str) -> str:
    if backend == "auto":
        return "numba" if numba_available() else "reference"
    return backend


def model_config(name: str, s: NeedleSettings, vocab_size: int, backend: str) -> ModelConfig:
    fields = {"window": s.window, "segment_len": s.window, **s.model}
    return ModelConfig(model=name, vocab_size=vocab_size, backend=backend, **fields)


def _run_one(args) -> dict:
    """Train one model and evaluate it at every length (a process-pool job)."""
    name, s, backend = args
    L = s.train_multiple * s.window
    task = NeedleTask(s.kind, L, placement="anywhere")
    model = Model(model_config(name, s, task.vocab_size, backend))
    cfg = TrainConfig(seed=s.seed, **{**s.train, **s.train_overrides.get(name, {})})
    start = time.perf_counter()
    params, _, history = train(model, task, cfg, progress=False)
    rows = []
    for mult in s.eval_multiples:
        n = mult * s.window
        acc = evaluate(model, params, NeedleTask(s.kind, n), num_samples=s.eval_samples,
                       seed=10_000 + n)["accuracy"]
        rows.append({"model": DISPLAY_NAMES[name], "length": n, "accuracy": acc})
    return {"rows": rows, "seconds": time.perf_counter() - start,
            "final_loss": float(np.mean([h["loss"] for h in history[-10:]]))}


def needle_experiment(settings: NeedleSettings = NeedleSettings(), *, progress: bool = True,
                      workers: int | None = None) -> tuple[dict, dict]:
    """Train and evaluate every model of ``settings``.

    Models train in parallel processes (``workers``, default: as many as cores, at most one
    per model); each job is deterministic, so the numbers do not depend on ``workers``.

    Returns:
        ``(result, timing)``: the ``"needle"`` results dict ``{"window", "train_length",
        "chance", "rows": [{"model", "length", "accuracy"}]}`` and the wall times.
    """
    backend = resolve_backend(settings.backend)
    jobs = [(name, settings, backend) for name in settings.models]
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    start = time.perf_counter()
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers, mp_context=_SPAWN) as pool:
            results = list(tqdm(pool.map(_run_one, jobs), total=len(jobs), desc="needle",
                                disable=not progress, leave=False))
    else:
        results = [_run_one(j) for j in tqdm(jobs, desc="needle", disable=not progress,
                                             leave=False)]
    task = NeedleTask(settings.kind, settings.train_multiple * settings.window)
    result = {
        "window": settings.window,
        "train_length": settings.train_multiple * settings.window,
        "chance": task.chance,
        "rows": [r for res in results for r in res["rows"]],
    }
    timing = {"seconds": round(time.perf_counter() - start, 1), "backend": backend,
              "workers": workers,
              "train_seconds": {DISPLAY_NAMES[n]: round(res["seconds"], 1)
                                for n, res in zip(settings.models, results)}}
    return result, timing


def format_needle_table(result: dict) -> str:
    """Rows: models; columns: evaluation lengths (as multiples of the window)."""
    w = result["window"]
    lengths = sorted({r["length"] for r in result["rows"]})
    models = list(dict.fromkeys(r["model"] for r in result["rows"]))
    head = f"{'model':8s}" + "".join(f"{f'{n} ({n // w}w)':>12s}" for n in lengths)
    lines = [f"passkey accuracy (%), window w = {w}, trained at length "
             f"{result['train_length']}, chance = {100 * result['chance']:.0f}%", head,
             "-" * len(head)]
    for m in models:
        acc = {r["length"]: r["accuracy"] for r in result["rows"] if r["model"] == m}
        lines.append(f"{m:8s}" + "".join(f"{100 * acc[n]:12.1f}" for n in lengths))
    return "\n".join(lines)


def plot_needle(result: dict, ax=None):
    """Accuracy against evaluation length, one line per model; the window and chance marked."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4))
    for m in dict.fromkeys(r["model"] for r in result["rows"]):
        pts = sorted((r["length"], r["accuracy"]) for r in result["rows"] if r["model"] == m)
        xs, ys = zip(*pts)
        ax.plot(xs, [100 * y for y in ys], marker="o", label=m,
                linestyle="--" if m == "SWA" else "-")
    ax.axhline(100 * result["chance"], color="gray", linewidth=1, linestyle=":")
    ax.text(result["window"], 100 * result["chance"] + 2, " chance", color="gray")
    ax.axvline(result["window"], color="black", linewidth=0.8, alpha=0.5)
    ax.set_xscale("log", base=2)
    lengths = sorted({r["length"] for r in result["rows"]})
    ax.set_xticks(lengths, [f"{n}\n({n // result['window']}w)" for n in lengths])
    ax.minorticks_off()
    ax.set_ylim(0, 105)
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("passkey accuracy (%)")
    ax.set_title(f"Passkey retrieval beyond a {result['window']}-token window "
                 f"(trained at {result['train_length']})")
    ax.legend(fontsize=8)
    ax.figure.tight_layout()
    return ax.figure


def run_needle_demo(out_dir: Path | None = None, full: bool = False, progress: bool = True,
                    *, settings: NeedleSettings | None = None, workers: int | None = None) -> dict:
    """Part 2 of ``minititans demo``: train, evaluate, print the table, optionally save.

    With ``out_dir``, writes ``needle.png`` and adds the results under ``"needle"`` in
    ``results.json``. ``full`` uses the larger :data:`FULL` settings.

    Returns:
        The ``"needle"`` results dict.
    """
    settings = settings or (FULL if full else NeedleSettings())
    L = settings.train_multiple * settings.window
    mults = "x, ".join(str(m) for m in settings.eval_multiples)
    print("Part 2 - a passkey beyond the attention window: sliding-window attention (SWA) "
          "and the four\nTitans are trained to recall a one-digit passkey at length "
          f"{L}, then tested at {mults}x the window ({settings.window} tokens).\n")
    result, timing = needle_experiment(settings, progress=progress, workers=workers)
    print(format_needle_table(result))
    per_model = ", ".join(f"{k} {v:.0f} s" for k, v in timing["train_seconds"].items())
    print(f"needle: {timing['seconds']:.1f} s on {timing['workers']} worker(s), backend "
          f"{timing['backend']} (per model: {per_model})")
    if out_dir is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        fig = plot_needle(result)
        fig.savefig(out / "needle.png", dpi=120)
        plt.close(fig)
        path = update_results_json(out, "needle", result)
        print(f"wrote {out / 'needle.png'} and {path}")
    return result


# --- the miniature Table 5 --------------------------------------------------------------------

# the demo's LMM (NeedleSettings.model)
ABLATION_BASE = dict(model="lmm", d_model=32, num_layers=1, num_heads=2, memory_depth=1,
                     chunk_size=1, alpha_init=0.001)
ABLATIONS = {
    # row label: changes to the LMM (Titans Table 5's rows)
    "LMM": {},
    "w/o momentum": {"momentum": False},
    "w/o weight decay": {"forgetting": False},
    "w/o conv": {"conv_kernel": 0},
    "w/o persistent memory": {"num_persistent": 0},
    "deep memory (L_M = 2)": {"memory_depth": 2, "surprise_clip": 1.0},
}
TITANS_ROWS = {"MAC": {"model": "mac"}, "MAG": {"model": "mag"}, "MAL": {"model": "mal"}}
ROW_TRAIN_OVERRIDES = {"MAC": NeedleSettings().train_overrides["mac"]}


@dataclass(frozen=True)
class AblationSettings:
    task: str = "mqar"              # "mqar" or "needle-n" (a 3-digit number)
    window: int = 16                # for MAC/MAG/MAL rows; the LMM has no attention
    train_length: int = 32          # MQAR: 8 key-value pairs
    eval_length: int = 64           # MQAR: 16 pairs, twice as many as in training
    seeds: tuple = (0, 1, 2)
    eval_samples: int = 200
    rows: tuple = tuple(ABLATIONS)
    train: dict = field(default_factory=lambda: dict(steps=300, batch_size=8, lr=1e-2,
                                                     warmup=10))
    backend: str = "auto"


def _ablation_job(args) -> dict:
    from .tasks import make_task

    label, changes, seed, s, backend = args
    task = make_task(s.task, s.train_length)
    if isinstance(task, NeedleTask):
        task = replace(task, placement="anywhere")
    cfg = ModelConfig(**{**ABLATION_BASE, "window": s.window, "segment_len": s.window,
                         **changes, "vocab_size": task.vocab_size, "backend": backend})
    model = Model(cfg)
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
    """Titans Table 5 in miniature: the LMM and its ablations (and optionally MAC/MAG/MAL),
    each trained with several seeds; accuracy at ``eval_length`` as mean and spread.

    Returns:
        ``{"task", "train_length", "eval_length", "chance", "seeds", "rows": [{"model",
        "accuracies", "mean", "std"}]}``; a diverged run counts as ``None`` (excluded from
        the mean, reported in ``"diverged"``).
    """
    from .tasks import make_task

    backend = resolve_backend(settings.backend)
    table = {**ABLATIONS, **TITANS_ROWS}
    jobs = [(label, table[label], seed, settings, backend) for label in settings.rows
            for seed in settings.seeds]
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers, mp_context=_SPAWN) as pool:
            done = list(tqdm(pool.map(_ablation_job, jobs), total=len(jobs), desc="ablate",
                             disable=not progress, leave=False))
    else:
        done = [_ablation_job(j) for j in tqdm(jobs, desc="ablate", disable=not progress,
                                               leave=False)]
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


# --- command line -------------------------------------------------------------------------------


def _run_needle(args) -> int:
    settings = FULL if args.full else NeedleSettings()
    changes = {"seed": args.seed, "backend": args.backend}
    if args.steps is not None:
        changes["train"] = {**settings.train, "steps": args.steps}
        changes["train_overrides"] = {m: {k: v for k, v in o.items() if k != "steps"}
                                      for m, o in settings.train_overrides.items()}
    run_needle_demo(args.out, progress=not args.quiet, workers=args.workers,
                    settings=replace(settings, **changes))
    return 0


def _parse_config(text):
    """``--config``: a JSON file, a JSON object, or ``key=value,key=value``."""
    if text is None:
        return {}
    path = Path(text)
    if path.suffix == ".json" and path.exists():
        return json.loads(path.read_text())
    if text.lstrip().startswith("{"):
        return json.loads(text)
    out = {}
    for item in text.split(","):
        key, sep, val = item.partition("=")
        if not sep:
            raise ValueError(f"--config items must be key=value, got {item!r}")
        try:
            out[key.strip()] = json.loads(val)  # numbers, true/false, null
        except json.JSONDecodeError:
            out[key.strip()] = val.strip()  # a bare string such as silu
    return out


def _run_train(args) -> int:
    from .tasks import make_task
    from .training import load_checkpoint

    task = make_task(args.task, args.length)
    if isinstance(task, NeedleTask):
        task = replace(task, placement="anywhere")
    if args.resume is not None:
        state, model, cfg, _ = load_checkpoint(args.resume)
        cfg = replace(cfg, steps=args.steps) if args.steps is not None else cfg
        resume = state
    else:
        extra = _parse_config(args.config)
        unknown = set(extra) - set(ModelConfig.__dataclass_fields__)
        if unknown:
            raise ValueError("--config has unknown ModelConfig fields: "
                             f"{', '.join(sorted(unknown))}")
        fields = {**ABLATION_BASE, "window": args.window, "segment_len": args.window,
                  **extra, "model": args.model,
                  "vocab_size": task.vocab_size, "backend": resolve_backend(args.backend)}
        model = Model(ModelConfig(**fields))
        cfg = TrainConfig(steps=args.steps or 200, batch_size=args.batch_size, lr=args.lr,
                          warmup=min(10, args.steps or 200), seed=args.seed)
        resume = None
    print(f"training {model.name} on {args.task} (length {args.length}): {model.config}")
    start = time.perf_counter()
    params, _, history = train(model, task, cfg, resume=resume, checkpoint=args.checkpoint,
                               checkpoint_every=args.checkpoint_every,
                               progress=not args.quiet)
    if history:
        print(f"final loss {np.mean([h['loss'] for h in history[-10:]]):.4f}, "
              f"train accuracy {np.mean([h['accuracy'] for h in history[-10:]]):.3f} "
              f"({time.perf_counter() - start:.1f} s)")
    rows = []
    for n in args.eval_lengths or [args.length]:
        r = evaluate(model, params, make_task(args.task, n), num_samples=args.eval_samples)
        rows.append({"length": n, **r})
        print(f"length {n:5d}: accuracy {100 * r['accuracy']:5.1f}% "
              f"(token {100 * r['token_accuracy']:5.1f}%, chance "
              f"{100 * make_task(args.task, n).chance:.1f}%)")
    if args.out is not None:
        update_results_json(Path(args.out), "train", {"task": args.task, "model": model.name,
                                               "config": json.loads(model.config.to_json()),
                                               "rows": rows})
    return 0


def _run_ablate(args) -> int:
    rows = tuple(ABLATIONS) + (tuple(TITANS_ROWS) if args.with_titans else ())
    train_cfg = {**AblationSettings().train}
    if args.steps is not None:
        train_cfg["steps"] = args.steps
    settings = AblationSettings(task=args.task, seeds=tuple(range(args.seeds)), rows=rows,
                                train=train_cfg, backend=args.backend,
                                train_length=args.length, eval_length=args.eval_length)
    start = time.perf_counter()
    result = ablation_experiment(settings, progress=not args.quiet, workers=args.workers)
    print(format_ablation_table(result))
    print(f"ablate: {time.perf_counter() - start:.1f} s")
    if args.out is not None:
        path = update_results_json(Path(args.out), "ablation", result)
        print(f"wrote {path}")
    return 0


def _common(p, out_help):
    p.add_argument("--out", metavar="DIR", default=None, help=out_help)
    p.add_argument("--backend", choices=("auto", "reference", "numba"), default="auto",
                   help="memory scan backend (default auto: numba if its gradient works)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_needle_parser(subparsers):
    p = subparsers.add_parser(
        "needle", help="passkey beyond the attention window (demo part 2, Table 2 in small)",
        description="Train SWA and the four Titans (LMM, MAC, MAG, MAL) on the passkey task "
                    "at twice the attention window, evaluate at 1x, 2x, 4x and 8x the window, "
                    "and print a table shaped like Titans Table 2.")
    _common(p, "write needle.png and results.json (key 'needle') into DIR")
    p.add_argument("--full", action="store_true",
                   help="larger settings (wider models, longer training; takes longer)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--steps", type=int, default=None, help="training steps per model")
    p.add_argument("--workers", type=int, default=None,
                   help="parallel training processes (default: number of cores)")
    p.set_defaults(func=_run_needle)
    return p


def add_train_parser(subparsers):
    from .models import MODEL_NAMES
    from .tasks import TASKS

    p = subparsers.add_parser(
        "train", help="train any model on any task",
        description="Train a model (Titans or baseline) on a synthetic task with AdamW, "
                    "warm-up + cosine, gradient clipping; evaluate at the given lengths. "
                    "Checkpoints are .npz files; --resume continues one exactly.")
    p.add_argument("--task", choices=TASKS, default="needle-pk", help="default needle-pk")
    p.add_argument("--model", choices=MODEL_NAMES, default="lmm", help="default lmm")
    p.add_argument("--config", default=None, metavar="JSON|FILE|k=v,...",
                   help="ModelConfig fields, e.g. 'd_model=64,memory_depth=2,momentum=false'")
    p.add_argument("--length", type=int, default=32, help="training length (default 32)")
    p.add_argument("--window", type=int, default=16,
                   help="attention window and MAC segment (default 16)")
    p.add_argument("--eval-lengths", type=int, nargs="+", default=None, metavar="N",
                   help="evaluation lengths (default: the training length)")
    p.add_argument("--eval-samples", type=int, default=200, help="sequences per length")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps (default 200)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step (default 8)")
    p.add_argument("--lr", type=float, default=1e-2, help="peak learning rate (default 1e-2)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--checkpoint", default=None, metavar="PATH.npz",
                   help="write a checkpoint here (at the end, and every --checkpoint-every)")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="K")
    p.add_argument("--resume", default=None, metavar="PATH.npz",
                   help="continue from a checkpoint (its model and training config)")
    _common(p, "add the evaluation to DIR/results.json (key 'train')")
    p.set_defaults(func=_run_train)
    return p


def add_ablate_parser(subparsers):
    p = subparsers.add_parser(
        "ablate", help="miniature Titans Table 5: LMM vs its ablations, several seeds",
        description="Train the LMM and each ablation (w/o momentum, w/o weight decay, w/o "
                    "conv, w/o persistent memory, deep vs linear memory) with several "
                    "seeds on MQAR or needle-N; print mean and spread.")
    p.add_argument("--task", choices=("mqar", "needle-n", "needle-pk", "needle-w"),
                   default="mqar", help="default mqar")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (default 3)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default 300)")
    p.add_argument("--length", type=int, default=32, help="training length (default 32)")
    p.add_argument("--eval-length", type=int, default=64, help="default 64")
    p.add_argument("--with-titans", action="store_true", help="also MAC, MAG and MAL rows")
    p.add_argument("--workers", type=int, default=None, help="parallel processes")
    _common(p, "add the table to DIR/results.json (key 'ablation')")
    p.set_defaults(func=_run_ablate)
    return p


def add_parser(subparsers):
    """Register ``needle``, ``train`` and ``ablate`` on an argparse subparsers object."""
    return [add_needle_parser(subparsers), add_train_parser(subparsers),
            add_ablate_parser(subparsers)]
