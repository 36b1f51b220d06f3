"""The ``minititans`` command line: every subcommand and every flag lives here.

``demo`` (recall, then needle), ``recall``, ``needle``, ``ablate``, ``lm``, ``mad``,
``train`` and ``bench``.
Each experiment command parses its flags into the experiment's settings dataclass and calls
the experiment module in :mod:`minititans.experiments`; nothing heavy is imported before a
command runs, so ``minititans --help`` is quick. Run ``minititans COMMAND --help``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

# the longest sequence `train` and `ablate` accept (--length, --eval-length(s)): a guard
# against a typo that would allocate for minutes; quadratic models need far less memory
MAX_LENGTH = 16_384

# --- flag checks, shared by the commands: each is a usage error naming the flag (exit 2) ----


def _check_int(parser, flag: str, value, *, minimum: int = 1, maximum: int | None = None):
    """``value`` (an int, or a list of ints for ``nargs``) in ``[minimum, maximum]``."""
    if value is None:
        return value
    for v in value if isinstance(value, (list, tuple)) else [value]:
        if v < minimum:
            parser.error(f"{flag} must be >= {minimum}, got {v}")
        if maximum is not None and v > maximum:
            parser.error(f"{flag} must be <= {maximum}, got {v}")
    return value


def _check_positive(parser, flag: str, value):
    """An int flag that must be >= 1 (None: not given, allowed)."""
    return _check_int(parser, flag, value, minimum=1)


def _check_nonnegative(parser, flag: str, value):
    """An int flag that must be >= 0 (None: not given, allowed)."""
    return _check_int(parser, flag, value, minimum=0)


def _check_positive_float(parser, flag: str, value):
    """A float flag that must be finite and > 0 (None: not given, allowed)."""
    import math

    if value is not None and not (math.isfinite(value) and value > 0):
        parser.error(f"{flag} must be a finite number > 0, got {value}")
    return value


def _check_out_dir(parser, flag: str, value):
    """``--out DIR``: a directory (or nothing yet) whose ``results.json`` we can update."""
    if value is None:
        return value
    out = Path(value)
    if out.exists() and not out.is_dir():
        parser.error(f"{flag} {value} exists and is not a directory (it takes a directory "
                     "for results.json and the plots)")
    results = out / "results.json"
    if results.is_symlink() or (results.exists() and not results.is_file()):
        parser.error(f"{flag}: {results} is not a regular file; refusing to replace it")
    if results.exists():
        try:
            text = json.loads(results.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            parser.error(f"{flag}: {results} exists but is not readable JSON ({e}); move it "
                         "away first")
        if not isinstance(text, dict):
            parser.error(f"{flag}: {results} exists but is not a JSON object")
    return value


def _check_out_file(parser, flag: str, value):
    """A file flag (``--checkpoint``, ``bench --out``): absent, or a regular file."""
    if value is None:
        return value
    path = Path(value)
    if path.is_symlink():
        parser.error(f"{flag} {value} is a symbolic link; refusing to replace it")
    if path.exists() and not path.is_file():
        parser.error(f"{flag} {value} exists and is not a regular file")
    parent = next((q for q in path.parents if q.exists()), None)
    if parent is not None and not parent.is_dir():
        parser.error(f"{flag} {value}: {parent} is not a directory")
    return value


def _check_task_length(parser, flag: str, task_name: str, value):
    """A length (or list of lengths) the task accepts, at most MAX_LENGTH."""
    from .tasks import make_task

    _check_int(parser, flag, value, minimum=1, maximum=MAX_LENGTH)
    for n in value if isinstance(value, (list, tuple)) else [value]:
        try:
            make_task(task_name, n)
        except (TypeError, ValueError) as e:
            parser.error(f"{flag} {n} does not fit the task {task_name}: {e}")
    return value


def _parser_of(args):
    """The subcommand's own parser (set by ``set_defaults(_parser=p)``), for usage errors."""
    return args._parser


# --- demo and recall --------------------------------------------------------------------------


def _validate_recall(parser, args) -> None:
    _check_positive(parser, "--d", args.d)
    _check_positive(parser, "--sizes", args.sizes)
    _check_positive(parser, "--passes", args.passes)
    _check_nonnegative(parser, "--seed", args.seed)
    _check_out_dir(parser, "--out", args.out)


def run_recall(args) -> int:
    from .experiments.recall import format_recall_table, recall_experiment

    if getattr(args, "_parser", None) is not None:  # the recall command's own flags
        _validate_recall(args._parser, args)

    start = time.perf_counter()
    result = recall_experiment(d=args.d, sizes=args.sizes, passes=args.passes, seed=args.seed,
                               progress=not args.quiet)
    print(format_recall_table(result))
    print(f"recall: {time.perf_counter() - start:.1f} s")
    if args.out is not None:
        from .viz import plot_recall, write_outputs

        write_outputs(args.out, "recall", result, plot_recall, "recall.png")
    return 0


def run_demo(args) -> int:
    start = time.perf_counter()
    print("Part 1 - test-time memorization, no training: write N random key->value pairs")
    print("into memories of the Titans family, then read every key back.\n")
    run_recall(args)
    if not args.skip_needle:
        from .experiments.needle import run_needle_demo

        print()
        run_needle_demo(None if args.out is None else Path(args.out), full=args.full,
                        progress=not args.quiet, seed=args.seed)
    print(f"demo: {time.perf_counter() - start:.1f} s in all")
    return 0


def _add_recall_options(p: argparse.ArgumentParser, out_help: str = "write recall.png and "
                        "results.json (key 'recall') into DIR") -> None:
    p.add_argument("--out", metavar="DIR", default=None, help=out_help)
    p.add_argument("--d", type=int, default=16, help="key and value width d (default 16)")
    p.add_argument("--sizes", type=int, nargs="+", default=[4, 8, 16, 32, 64], metavar="N",
                   help="numbers of stored pairs (default: 4 8 16 32 64)")
    p.add_argument("--passes", type=int, nargs="+", default=[1, 16], metavar="P",
                   help="how many times the pairs are written (default: 1 16)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


# --- needle, ablate, train ----------------------------------------------------------------------


def needle_settings(args):
    """The :class:`~minititans.experiments.needle.NeedleSettings` of ``minititans needle``."""
    from .experiments.needle import DEFAULT, FULL

    settings = FULL if args.full else DEFAULT
    changes = {"backend": args.backend}
    for name in ("tasks", "models", "seeds"):
        if getattr(args, name) is not None:
            changes[name] = tuple(getattr(args, name))
    if args.lengths is not None:
        changes["eval_multiples"] = tuple(args.lengths)
    if args.train_lengths is not None:
        changes["train_multiples"] = tuple(args.train_lengths)
    if args.config is not None:
        changes["model"] = {**settings.model, **parse_config(args.config)}
    if args.steps is not None:
        changes["train"] = {**settings.train, "steps": args.steps}
        changes["train_overrides"] = {m: {k: v for k, v in o.items() if k != "steps"}
                                      for m, o in settings.train_overrides.items()}
    return replace(settings, **changes)


def run_needle(args) -> int:
    from .experiments.needle import run_needle_experiment

    start = time.perf_counter()
    run_needle_experiment(needle_settings(args), args.out, progress=not args.quiet,
                          workers=args.workers, keep_runs=True,
                          fresh=args.fresh)
    print(f"needle: {time.perf_counter() - start:.1f} s in all")
    return 0


def check_needle_args(parser, args) -> None:
    """Usage errors for ``needle`` flags, before any training (argparse checks the names)."""
    for flag in ("tasks", "models", "seeds", "lengths", "train_lengths"):
        values = getattr(args, flag)
        if values is not None and len(set(values)) != len(values):
            parser.error(f"--{flag.replace('_', '-')} must not repeat a value, got "
                         f"{' '.join(map(str, values))}")
    if args.train_lengths is not None and min(args.train_lengths) < 1:
        parser.error(f"--train-lengths are multiples of the window and must be >= 1, got "
                     f"{min(args.train_lengths)}")
    _check_needle_config(parser, args)
    if args.seeds is not None and min(args.seeds) < 0:
        parser.error(f"--seeds must be >= 0, got {min(args.seeds)}")
    if args.lengths is not None and min(args.lengths) < 1:
        parser.error(f"--lengths are multiples of the window and must be >= 1, got "
                     f"{min(args.lengths)}")
    for flag in ("steps", "workers"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    try:  # e.g. W (18 tokens at least) asked only at 1x the 16-token window
        needle_settings(args)
    except ValueError as e:
        parser.error(f"--lengths (or --tasks): {e}")
    _check_out_dir(parser, "--out", args.out)


def _check_needle_config(parser, args) -> None:
    """``needle --config``: known ModelConfig fields, not the experiment's own, and values
    that every model of the run accepts."""
    if args.config is None:
        return
    try:
        extra = parse_config(args.config)
    except ValueError as e:
        parser.error(f"--config: {e}")
    _check_config_fields(parser, extra)
    owned = sorted(set(extra) & {"model", "backend", "vocab_size", "window", "segment_len"})
    if owned:
        parser.error(f"--config may not set {', '.join(owned)} (the experiment sets them; "
                     f"use --models and --backend)")
    from .experiments.needle import model_config

    settings = needle_settings(args)
    for name in settings.models:
        try:
            model_config(name, settings, 32, "reference")
        except (TypeError, ValueError) as e:
            parser.error(f"--config: {e}")


def _validate_ablate(parser, args) -> None:
    _check_positive(parser, "--seeds", args.seeds)
    _check_positive(parser, "--steps", args.steps)
    _check_positive(parser, "--workers", args.workers)
    _check_task_length(parser, "--length", args.task, args.length)
    _check_task_length(parser, "--eval-length", args.task, args.eval_length)
    _check_out_dir(parser, "--out", args.out)


def run_ablate(args) -> int:
    _validate_ablate(_parser_of(args), args)
    from .experiments.ablation import (
        ABLATIONS,
        TITANS_ROWS,
        AblationSettings,
        ablation_experiment,
        format_ablation_table,
    )
    from .io import update_results_json

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


def parse_config(text):
    """``--config``: a JSON file, a JSON object, or ``key=value,key=value``.

    Raises ``ValueError`` (with the reason) for a file that cannot be read, text that is not
    JSON, JSON that is not an object, or an item without ``=``.
    """
    if text is None:
        return {}
    path = Path(text)
    if path.suffix == ".json":
        if not path.exists():
            raise ValueError(f"no such file: {text}")
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{text} is not a readable JSON file ({e})") from e
    elif text.lstrip().startswith(("{", "[")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"not valid JSON ({e})") from e
    else:
        data = {}
        for item in text.split(","):
            key, sep, val = item.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"items must be key=value, got {item!r}")
            try:
                data[key.strip()] = json.loads(val)  # numbers, true/false, null
            except json.JSONDecodeError:
                data[key.strip()] = val.strip()  # a bare string such as silu
    if not isinstance(data, dict):
        raise ValueError(f"must be a JSON object of ModelConfig fields, got {data!r}")
    return data


# train's defaults; the flags default to None so that --resume can tell a flag given on the
# command line (which must agree with the checkpoint) from one left alone
# (steps, batch_size, lr and warmup are TrainConfig's defaults, written here so that --help
# imports nothing heavy; tests/test_cli.py checks that they are the same)
TRAIN_DEFAULTS = dict(task="needle-pk", model="lmm", length=32, window=16, seed=0,
                      backend="auto", steps=200, batch_size=8, lr=3e-3, warmup=20)


def _validate_train_flags(parser, args) -> None:
    _check_positive(parser, "--steps", args.steps)
    _check_positive(parser, "--eval-samples", args.eval_samples)
    _check_positive(parser, "--batch-size", args.batch_size)
    _check_int(parser, "--window", args.window, minimum=1, maximum=MAX_LENGTH)
    _check_nonnegative(parser, "--seed", args.seed)
    _check_positive_float(parser, "--lr", args.lr)
    _check_nonnegative(parser, "--checkpoint-every", args.checkpoint_every)
    _check_int(parser, "--length", args.length, minimum=1, maximum=MAX_LENGTH)
    _check_int(parser, "--eval-lengths", args.eval_lengths, minimum=1, maximum=MAX_LENGTH)
    if args.checkpoint_every and args.checkpoint is None:
        parser.error("--checkpoint-every needs --checkpoint PATH.npz")
    _check_out_file(parser, "--checkpoint", args.checkpoint)
    _check_out_dir(parser, "--out", args.out)


def _check_config_fields(parser, extra: dict) -> None:
    import difflib

    from .models import ModelConfig

    names = list(ModelConfig.__dataclass_fields__)
    unknown = sorted(set(extra) - set(names))
    if unknown:
        hints = [f"{u} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(u, names, 1))
                 else u for u in unknown]
        parser.error(f"--config has unknown ModelConfig fields: {', '.join(hints)}; the "
                     f"fields are {', '.join(names)}")


def _model_config_from_flags(parser, args, task, backend):
    """The ModelConfig of a new run: the needle LMM, the flags, then ``--config``."""
    from .experiments.ablation import AblationSettings
    from .models import ModelConfig

    try:
        extra = parse_config(args.config)
    except ValueError as e:
        parser.error(f"--config: {e}")
    _check_config_fields(parser, extra)
    model = args.model or TRAIN_DEFAULTS["model"]
    window = args.window or TRAIN_DEFAULTS["window"]
    # fields the flags own: in --config they may only repeat the flag's value
    owned = {"model": ("--model", model), "backend": ("--backend", backend),
             "vocab_size": ("--task", task.vocab_size)}
    if args.window is not None:
        owned.update(window=("--window", window), segment_len=("--window", window))
    for key, (flag, value) in owned.items():
        if key in extra and extra[key] != value:
            parser.error(f"--config {key}={extra[key]!r} conflicts with {flag} (which gives "
                         f"{key}={value!r}); set it with {flag}, not --config")
    fields = {**AblationSettings().model, "window": window, "segment_len": window, **extra,
              "model": model, "vocab_size": task.vocab_size, "backend": backend}
    try:
        return ModelConfig(**fields)
    except (TypeError, ValueError) as e:
        parser.error(f"--config: {e}")


def _resume_plan(parser, args, backend):
    """Model, train config and task of ``--resume``, checking every flag against it."""
    from .training import checkpoint_task, load_checkpoint

    try:
        state, model, cfg, _ = load_checkpoint(args.resume)
        task_name, length = checkpoint_task(args.resume)
    except (FileNotFoundError, ValueError) as e:
        parser.error(f"--resume: {e}")
    if task_name is None and (args.task is None or args.length is None):
        parser.error(f"--resume: {args.resume} does not record its task (an older "
                     "checkpoint); give --task and --length explicitly")
    given = {"--task": (args.task, task_name), "--length": (args.length, length),
             "--model": (args.model, model.config.model),
             "--window": (args.window, model.config.window),
             "--lr": (args.lr, cfg.lr), "--seed": (args.seed, cfg.seed),
             "--batch-size": (args.batch_size, cfg.batch_size)}
    for flag, (value, recorded) in given.items():
        if value is not None and recorded is not None and value != recorded:
            parser.error(f"{flag} {value} conflicts with the checkpoint {args.resume} "
                         f"({flag} {recorded}); drop {flag} to continue it as it was")
    if args.config is not None:
        try:
            extra = parse_config(args.config)
        except ValueError as e:
            parser.error(f"--config: {e}")
        saved = json.loads(model.config.to_json())
        for key, val in extra.items():
            _check_config_fields(parser, {key: val})
            if key == "backend":
                used = backend if args.backend is not None else model.config.backend
                if val != used:
                    parser.error(f"--config backend={val!r} conflicts with the backend of "
                                 f"this run ({used!r}); set it with --backend")
            elif saved[key] != val:
                parser.error(f"--config {key}={val!r} conflicts with the checkpoint "
                             f"{args.resume} ({key}={saved[key]!r}); a resumed run keeps "
                             "its model")
    if args.steps is not None:
        if args.steps < state.step:
            parser.error(f"--steps {args.steps} is below the checkpoint's step {state.step}")
        cfg = replace(cfg, steps=args.steps)
    if args.backend is not None and backend != model.config.backend:
        # the backend changes how the scan is computed, not what: allowed, but said
        print(f"warning: --backend {args.backend} resumes with the {backend} backend; the "
              f"checkpoint was written with {model.config.backend} (results agree to "
              "rounding, not bit for bit)", file=sys.stderr)
        model = type(model)(model.config.with_(backend=backend))  # same backbone
    return state, model, cfg, task_name or args.task, length or args.length


def _plan_train(parser, args):
    """Check every flag of ``train`` and build what it needs, before any work."""
    from .experiments.pool import resolve_backend
    from .models import model_for
    from .tasks import BabilongTask, NeedleTask, make_task
    from .training import TrainConfig

    _validate_train_flags(parser, args)
    backend = resolve_backend(args.backend or TRAIN_DEFAULTS["backend"])
    if args.resume is not None:
        state, model, cfg, task_name, length = _resume_plan(parser, args, backend)
    else:
        task_name = args.task or TRAIN_DEFAULTS["task"]
        length = args.length or TRAIN_DEFAULTS["length"]
        state = None
    _check_task_length(parser, "--length", task_name, length)
    _check_task_length(parser, "--eval-lengths", task_name, args.eval_lengths or [length])
    task = make_task(task_name, length)
    if isinstance(task, (NeedleTask, BabilongTask)):
        task = replace(task, placement="anywhere")
    if args.resume is None:  # compression needs MAD's bottleneck, or copying would do
        model = model_for(_model_config_from_flags(parser, args, task, backend), task)
        steps = args.steps or TRAIN_DEFAULTS["steps"]
        try:
            cfg = TrainConfig(steps=steps, batch_size=args.batch_size or
                              TRAIN_DEFAULTS["batch_size"], lr=args.lr or TRAIN_DEFAULTS["lr"],
                              warmup=min(TRAIN_DEFAULTS["warmup"], steps),
                              seed=args.seed or TRAIN_DEFAULTS["seed"])
        except (TypeError, ValueError) as e:
            parser.error(str(e))
    if model.config.vocab_size < task.vocab_size:
        parser.error(f"--task {task_name} has {task.vocab_size} tokens, the model only "
                     f"{model.config.vocab_size}")
    return task_name, length, task, model, cfg, state


def _report_interrupt(path) -> None:
    """Where a ``train`` stopped by Ctrl-C can be resumed from (on stderr)."""
    from .io import load_arrays

    if path is not None and Path(path).is_file():
        try:
            arrays, _ = load_arrays(path, kind="checkpoint")
            print(f"interrupted: the last checkpoint is {path} (step {int(arrays['step'])}); "
                  f"continue with: minititans train --resume {path}", file=sys.stderr)
            return
        except (ValueError, KeyError):
            pass
    print("interrupted: no checkpoint was written (give --checkpoint PATH.npz and "
          "--checkpoint-every K to be able to resume)", file=sys.stderr)


def run_train(args) -> int:
    task_name, length, task, model, cfg, state = _plan_train(_parser_of(args), args)
    import numpy as np

    from .io import update_results_json
    from .tasks import make_task
    from .training import evaluate, train

    kind = " (MAD's autoencoder backbone)" if model.backbone == "autoencoder" else ""
    print(f"training {model.name}{kind} on {task_name} (length {length}): {model.config}")
    start = time.perf_counter()
    try:
        params, _, history = train(model, task, cfg, resume=state,
                                   checkpoint=args.checkpoint,
                                   checkpoint_every=args.checkpoint_every,
                                   progress=not args.quiet, task_name=task_name)
    except KeyboardInterrupt:
        _report_interrupt(args.checkpoint)
        return 130
    if history:
        print(f"final loss {np.mean([h['loss'] for h in history[-10:]]):.4f}, "
              f"train accuracy {np.mean([h['accuracy'] for h in history[-10:]]):.3f} "
              f"({time.perf_counter() - start:.1f} s)")
    rows = []
    for n in args.eval_lengths or [length]:
        r = evaluate(model, params, make_task(task_name, n), num_samples=args.eval_samples)
        rows.append({"length": n, **r})
        print(f"length {n:5d}: accuracy {100 * r['accuracy']:5.1f}% "
              f"(token {100 * r['token_accuracy']:5.1f}%, chance "
              f"{100 * make_task(task_name, n).chance:.1f}%)")
    if args.out is not None:
        update_results_json(Path(args.out), "train", {"task": task_name, "model": model.name,
                                               "config": json.loads(model.config.to_json()),
                                               "rows": rows})
    return 0


def _common(p, out_help):
    p.add_argument("--out", metavar="DIR", default=None, help=out_help)
    p.add_argument("--backend", choices=("auto", "reference", "numba"), default="auto",
                   help="memory scan backend (default auto: numba if its gradient works)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_needle(sub):
    from .experiments.needle import CHOICES, MODELS, TASKS

    p = sub.add_parser(
        "needle", help="needles beyond the attention window, five seeds (Titans Table 2 in "
                       "small)",
        description="Train SWA, the four Titans (LMM, MAC, MAG, MAL) and the matrix-memory "
                    "baselines (linear attention, gated DeltaNet, a TTT-Linear-style memory) "
                    "on the S-NIAH needles (pk, n, w) and BABILong qa1 with five seeds, at 2-32x "
                    "the 16-token window; evaluate at 1x to 256x the window (--full: to "
                    "1024x) on sequences from seeds never used in training; print mean "
                    "(min-max) over seeds, shaped like Titans Table 2.")
    _common(p, "write needle.png and results.json (key 'needle') into DIR, and each "
               "finished run into DIR/needle_runs/; a rerun with the same DIR, settings and "
               "code reads the runs saved there instead of training them again (an "
               "interrupted run continues)")
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=None, metavar="TASK",
                   help=f"tasks, from {', '.join(TASKS)} (default: all)")
    p.add_argument("--models", nargs="+", choices=CHOICES, default=None, metavar="MODEL",
                   help=f"models, from {', '.join(CHOICES)} (default: all but "
                        f"{', '.join(c for c in CHOICES if c not in MODELS)}, the LMM with "
                        f"a deep memory)")
    p.add_argument("--seeds", nargs="+", type=int, default=None, metavar="SEED",
                   help="training seeds (default: 0 1 2 3 4)")
    p.add_argument("--lengths", nargs="+", type=int, default=None, metavar="K",
                   help="evaluation lengths as multiples of the window (default: 1 4 16 64 "
                        "256; --full adds 1024)")
    p.add_argument("--full", action="store_true",
                   help="evaluate up to 1024x the window (16,384 tokens; takes longer)")
    p.add_argument("--train-lengths", nargs="+", type=int, default=None, metavar="K",
                   help="training lengths as multiples of the window, one drawn per batch "
                        "(default: 2 8 32)")
    p.add_argument("--config", default=None, metavar="JSON|FILE|k=v,...",
                   help="ModelConfig fields changed for every model, e.g. 'alpha_init=0.01' "
                        "or 'anchored_memory=true' (default: none; model, backend, "
                        "vocab_size, window and segment_len are the experiment's, and a "
                        "variant's own fields win)")
    p.add_argument("--steps", type=int, default=None, help="training steps per model")
    p.add_argument("--workers", type=int, default=None,
                   help="parallel training processes (default: number of cores)")
    p.add_argument("--fresh", action="store_true",
                   help="train every run again, even those saved in DIR/needle_runs/ (and "
                        "save the new ones there)")
    p.set_defaults(func=run_needle)


def _add_train(sub):
    from .models.config import MODEL_NAMES
    from .tasks import TASKS

    p = sub.add_parser(
        "train", help="train any model on any task",
        description="Train a model (Titans or baseline) on a synthetic task with AdamW, "
                    "warm-up + cosine, gradient clipping; evaluate at the given lengths. "
                    "Checkpoints are .npz files that record the model, the training config "
                    "and the task; --resume continues one exactly (a flag given with --resume "
                    "must agree with the checkpoint; --steps may extend it, --backend may "
                    "change how it is computed). Ctrl-C stops a run and says where its last "
                    "checkpoint is (exit status 130).")
    p.add_argument("--task", choices=TASKS, default=None, help="default needle-pk")
    p.add_argument("--model", choices=MODEL_NAMES, default=None, help="default lmm")
    p.add_argument("--config", default=None, metavar="JSON|FILE|k=v,...",
                   help="ModelConfig fields, e.g. 'd_model=64,memory_depth=2,momentum=false' "
                        "(model, backend and vocab_size are set by --model, --backend and "
                        "--task)")
    p.add_argument("--length", type=int, default=None,
                   help=f"training length (default 32, at most {MAX_LENGTH})")
    p.add_argument("--window", type=int, default=None,
                   help="attention window and MAC segment (default 16)")
    p.add_argument("--eval-lengths", type=int, nargs="+", default=None, metavar="N",
                   help=f"evaluation lengths (default: the training length; at most "
                        f"{MAX_LENGTH})")
    p.add_argument("--eval-samples", type=int, default=200,
                   help="sequences per length (default 200)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"optimiser steps (default {TRAIN_DEFAULTS['steps']})")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"sequences per step (default {TRAIN_DEFAULTS['batch_size']})")
    p.add_argument("--lr", type=float, default=None,
                   help=f"peak learning rate (default {TRAIN_DEFAULTS['lr']:g}, as TrainConfig)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    p.add_argument("--checkpoint", default=None, metavar="PATH.npz",
                   help="write a checkpoint here (at the end, and every --checkpoint-every)")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="K",
                   help="also write the checkpoint every K steps (default 0: only at the end)")
    p.add_argument("--resume", default=None, metavar="PATH.npz",
                   help="continue from a checkpoint (its model, training config and task)")
    _common(p, "add the evaluation to DIR/results.json (key 'train')")
    p.set_defaults(func=run_train, backend=None, _parser=p)  # backend None: auto


def _add_ablate(sub):
    p = sub.add_parser(
        "ablate", help="miniature Titans Table 5: LMM vs its ablations, several seeds",
        description="Train the LMM and each ablation (w/o momentum, w/o weight decay, w/o "
                    "conv, w/o persistent memory, deep vs linear memory) with several "
                    "seeds on MQAR or needle-N; print mean and spread.")
    p.add_argument("--task", choices=("mqar", "needle-n", "needle-pk", "needle-w"),
                   default="mqar", help="default mqar")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (default 3)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default 300)")
    p.add_argument("--length", type=int, default=32,
                   help=f"training length (default 32, at most {MAX_LENGTH})")
    p.add_argument("--eval-length", type=int, default=64,
                   help=f"evaluation length (default 64, at most {MAX_LENGTH})")
    p.add_argument("--with-titans", action="store_true", help="also MAC, MAG and MAL rows")
    p.add_argument("--workers", type=int, default=None, help="parallel processes")
    _common(p, "add the table to DIR/results.json (key 'ablation')")
    p.set_defaults(func=run_ablate, _parser=p)


# --- lm ----------------------------------------------------------------------------------------


def run_lm(args) -> int:
    from .bench.timing import SINGLE_THREAD_ENV, single_threaded_blas

    if not single_threaded_blas():
        # BLAS reads its thread count when it loads: two training processes, each with a
        # multi-threaded BLAS, oversubscribe the cores (on a busy 2-core machine a
        # transformer step took 12x the CPU time), so run again in a child with one thread
        env = dict(os.environ, **{k: "1" for k in SINGLE_THREAD_ENV})
        argv = [sys.executable, "-m", "minititans.cli", *args.argv]
        return subprocess.run(argv, env=env).returncode
    from .experiments.lm import QUICK, LMSettings, format_lm_table, lm_experiment

    settings = QUICK if args.quick else LMSettings()
    changes = {"backend": args.backend}
    if args.seeds is not None:
        changes["seeds"] = tuple(range(args.seeds))
    if args.steps is not None:
        changes["train"] = {**settings.train, "steps": args.steps,
                            "warmup": min(settings.train["warmup"], args.steps)}
    if args.models is not None:
        changes["models"] = tuple(dict.fromkeys(args.models))
    settings = replace(settings, **changes)
    corpus = args.corpus  # read (and checked) by main() before any work
    if corpus is None:
        from .tasks import python_corpus

        corpus = python_corpus()
    c = corpus.info()
    print(f"corpus {c['name']}: {c['n_chars']:,} characters, {corpus.vocab_size} distinct, "
          f"Python {c['python_version']}, sha256 {c['checksum']}")
    result, timing = lm_experiment(settings, corpus, progress=not args.quiet,
                                   workers=args.workers)
    print(format_lm_table(result, settings.window))
    print(f"\nsample from {timing['best']} (seed {timing['best_seed']}; the first "
          f"{timing['prompt_chars']} characters are the prompt):\n{result['sample']}\n")
    print(f"lm: {timing['seconds']:.1f} s ({timing['cpu_seconds']:.0f} s of CPU in the jobs), "
          f"backend {timing['backend']}")
    if args.out is not None:
        from .viz import plot_lm, write_outputs

        write_outputs(args.out, "lm", result, lambda r: plot_lm(r, settings.window), "lm.png")
    return 0


def _add_lm(sub):
    from .models.config import MODEL_NAMES

    p = sub.add_parser(
        "lm", help="character-level language modelling on Python's own docs (Table 1, Fig. 7)",
        description="Train the transformer, SWA, linear attention, Gated DeltaNet and the "
                    "four Titans at the same parameter count on a character-level corpus "
                    "built from this Python's pydoc topics and a fixed set of standard-library "
                    "sources (or --text FILE), over several seeds; print validation bits per "
                    "character overall and by position (0-w, w-4w, 4w-16w), the memory-depth "
                    "study L_M = 1-4, and a sample from the best model. The default takes "
                    "about 20 minutes on 2 cores, --quick about 3.")
    _common(p, "write lm.png and results.json (key 'lm') into DIR")
    p.add_argument("--quick", action="store_true",
                   help="one seed, 100 training steps (about 3 minutes on 2 cores)")
    p.add_argument("--text", metavar="FILE", default=None,
                   help="train on this UTF-8 text file instead of the built-in corpus")
    p.add_argument("--seeds", type=int, default=None,
                   help="number of seeds (default 3; 1 with --quick)")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps per model (default 400; 100 with --quick)")
    p.add_argument("--models", nargs="+", choices=MODEL_NAMES, default=None, metavar="MODEL",
                   help=f"models to train (default all: {' '.join(MODEL_NAMES)})")
    p.add_argument("--workers", type=int, default=None,
                   help="parallel training processes (default: number of cores)")
    p.set_defaults(func=run_lm)


def _check_lm_args(parser, args) -> None:
    """Validate ``lm``'s flags, and read ``--text``, before any training starts."""
    for flag in ("seeds", "steps", "workers"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag} must be >= 1, got {value}")
    args.corpus = None
    if args.text is not None:
        from .experiments.lm import QUICK, LMSettings
        from .tasks.corpus import load_text_file, min_chars_for

        length = (QUICK if args.quick else LMSettings()).length
        try:
            args.corpus = load_text_file(args.text, min_chars=min_chars_for(length))
        except (OSError, ValueError) as e:
            parser.error(f"--text: {e}")


# --- mad ----------------------------------------------------------------------------------------


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def run_mad(args) -> int:
    from .experiments.mad import QUICK, MadSettings
    from .experiments.mad import run_mad as run_mad_experiment

    settings = QUICK if args.quick else MadSettings()
    changes = {"backend": args.backend}
    if args.seeds is not None:
        changes["seeds"] = tuple(range(args.seeds))
    if args.models is not None:
        changes["models"] = tuple(dict.fromkeys(args.models))
    if args.tasks is not None:
        changes["tasks"] = tuple(dict.fromkeys(args.tasks))
    if args.lrs is not None:
        changes["lrs"] = tuple(args.lrs)
    if args.steps is not None:
        warmup = min(settings.train["warmup"], args.steps // 2)
        changes["train"] = {**settings.train, "steps": args.steps, "warmup": warmup}
    start = time.perf_counter()
    run_mad_experiment(replace(settings, **changes), None if args.out is None else Path(args.out),
                       progress=not args.quiet, workers=args.workers)
    print(f"mad: {time.perf_counter() - start:.0f} s in all")
    return 0


def _add_mad(sub):
    from .models.config import MODEL_NAMES
    from .tasks.mad import MAD_TASKS

    p = sub.add_parser(
        "mad", help="MAD-mini: the six MAD tasks for every model (Titans NeurIPS Table 10)",
        description="Train every model (Transformer, SWA, linear attention, Gated DeltaNet, "
                    "LMM, MAC, MAG, MAL) at about equal parameter count, 2 blocks, on the six "
                    "MAD tasks (in-context recall, fuzzy and noisy recall, selective copying, "
                    "compression, memorization), with a sweep of two learning rates and three "
                    "seeds; print accuracy per task and the mean next to the published rows. "
                    "A miniature (smaller width, shorter sequences and training, no "
                    "difficulty sweeps): MAD-mini, not MAD. About 20 minutes on 2 cores; "
                    "--quick: one seed, a few steps, under 3 minutes.")
    _common(p, "write mad.png and results.json (key 'mad') into DIR")
    p.add_argument("--quick", action="store_true",
                   help="one seed, 25 steps of batch 4, shorter sequences (a smoke run)")
    p.add_argument("--seeds", type=_positive_int, default=None, metavar="N",
                   help="number of seeds 0..N-1 (default 3; --quick: 1)")
    p.add_argument("--models", nargs="+", choices=MODEL_NAMES, default=None, metavar="MODEL",
                   help=f"models to run (default all: {' '.join(MODEL_NAMES)})")
    p.add_argument("--tasks", nargs="+", choices=tuple(MAD_TASKS), default=None,
                   metavar="TASK", help=f"tasks to run (default all: {' '.join(MAD_TASKS)})")
    p.add_argument("--lrs", nargs="+", type=_positive_float, default=None, metavar="LR",
                   help="learning rates swept per run (default 0.003 0.01)")
    p.add_argument("--steps", type=_positive_int, default=None,
                   help="training steps per run (default 150; --quick: 25)")
    p.add_argument("--workers", type=_positive_int, default=None,
                   help="parallel training processes (default: number of cores)")
    p.set_defaults(func=run_mad)


# --- bench --------------------------------------------------------------------------------------


def run_bench_command(args) -> int:
    """The ``bench`` subcommand: run, print the table, write JSON to ``--out``."""
    parser = _parser_of(args)
    _check_positive(parser, "--tokens", args.tokens)
    _check_positive(parser, "--depth", args.depth)
    _check_out_file(parser, "--out", args.out)
    from .bench import (
        SINGLE_THREAD_ENV,
        format_stream,
        format_table,
        run_bench,
        run_stream,
        single_threaded_blas,
    )

    if not single_threaded_blas():
        # BLAS reads its thread count at load time: run again in a child that has it
        env = dict(os.environ, **{k: "1" for k in SINGLE_THREAD_ENV})
        argv = [sys.executable, "-m", "minititans.cli", "bench"]
        argv += ["--quick"] if args.quick else []
        if args.stream:
            argv += ["--stream", "--tokens", str(args.tokens), "--depth", str(args.depth)]
        if args.out is not None:
            argv += ["--out", str(args.out)]
        return subprocess.run(argv, env=env).returncode
    if args.stream:
        prefix = max(10_000, min(100_000, args.tokens // 10_000 * 10_000))
        result = run_stream(tokens=args.tokens, prefix=prefix, depth=args.depth)
        print(format_stream(result))
    else:
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


BENCH_HELP = """Benchmark the numba kernels and the models against the reference path.

Prints a table (tokens/s, GFLOP/s, % of peak, speedup over the reference path) for the
memory scan at d in {32, 64, 128}, depth 1-4, chunk 1/16/64 (T = 4096, float32), the
headline depth-2 d=64 memory in float64, forward+VJP against forward, a batch of two
sequences on two threads against one, the first call in a fresh process, and the attention
kernels; then whether the goals of docs/performance.md are met. Then the model rows: for
each model of `minititans needle` at its default settings (SWA, LMM, MAC, MAG, MAL, linear
attention, Gated DeltaNet, TTT-Linear-style), tokens/s of a training step (loss + gradient,
batch 8, length 512) and of inference (model.apply without a gradient, batch 8, lengths
512 and 4,096), on the reference and, where the model has a numba path, on numba, with
the speedup numba/reference from interleaved runs (warm-up and compilation excluded).
--quick runs a small subset (the headline memory, attention at T=1024, LMM and MAG
inference at 512 and one LMM training step) in under a minute; the full run took 15
minutes on a busy 2-core machine (about 4 of them the model rows).

--out PATH writes JSON: the kernel rows under "rows" (with "machine", "peak_gflops",
"goals", "noise" as before) and the model rows under "models": {"settings",
"load_average_start_end", "rows": [{"model", "what" ("train" | "inference"), "length",
"batch", "backend", "tokens_per_s", "seconds", "runs", "loss", "speedup"}]}, where
"speedup" is numba / reference tokens/s on the numba row (null on reference rows); "loss"
(and "grad_norm" on training rows) is what the timed runs computed."""


def _add_bench(sub):
    p = sub.add_parser("bench", help="benchmark the numba kernels and the models",
                       description=BENCH_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="a small subset (headline memory, attention at T=1024, LMM and MAG "
                        "inference at 512, one LMM training step), about a minute")
    p.add_argument("--out", type=Path, default=None, metavar="PATH",
                   help="also write the results as JSON to PATH (kernel rows under 'rows', "
                        "model rows under 'models')")
    p.add_argument("--stream", action="store_true",
                   help="long-stream check instead: --tokens tokens through the numba scan in "
                        "calls of 10,000 (finite? memory norm bounded? RSS flat? streamed == "
                        "whole on a 100,000-token prefix?)")
    p.add_argument("--tokens", type=int, default=1_000_000,
                   help="tokens for --stream (default 1,000,000)")
    p.add_argument("--depth", type=int, default=2,
                   help="memory depth for --stream (default 2; d = 64, expansion 4)")
    p.set_defaults(func=run_bench_command, _parser=p)


# --- the parser ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minititans",
        description="minititans: Titans (Learning to Memorize at Test Time) in NumPy. "
                    "Neural long-term memory trained while it reads.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    demo = sub.add_parser(
        "demo", help="the headline demo: test-time recall, then a passkey beyond the window",
        description="Run the headline demo (a few minutes on 2 cores). Part 1 writes "
                    "random key->value pairs into linear attention, the delta rule and "
                    "Titans memories (linear and deep, with and without momentum and "
                    "forgetting) and prints how well each recalls them as the number of "
                    "pairs passes the key width d (also `minititans recall`). Part 2 trains "
                    "sliding-window attention and the four Titans (LMM, MAC, MAG, MAL) on a "
                    "passkey task with seeds --seed, +1, +2 and tests them at 1-64x the "
                    "attention window, a cut of `minititans needle` (Titans Table 2 in "
                    "small).")
    _add_recall_options(demo, "write recall.png, needle.png and results.json (keys 'recall' "
                              "and 'needle') into DIR")
    demo.add_argument("--full", action="store_true",
                      help="part 2 with five seeds up to 256x the window (longer)")
    demo.add_argument("--skip-needle", action="store_true", help="run part 1 only")
    demo.set_defaults(func=run_demo)
    recall = sub.add_parser(
        "recall", help="test-time recall table (demo part 1 alone)",
        description="Write N random key->value pairs into several memories and read them "
                    "back; print the relative recall error table and optionally save a plot.")
    _add_recall_options(recall)
    recall.set_defaults(func=run_recall, _parser=recall)
    _add_needle(sub)
    _add_train(sub)
    _add_ablate(sub)
    _add_lm(sub)
    _add_mad(sub)
    _add_bench(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.func in (run_demo, run_recall):
        if args.d < 1:
            parser.error("--d must be >= 1")
        for name in ("sizes", "passes"):
            if any(v < 1 for v in getattr(args, name)):
                parser.error(f"--{name} values must be >= 1")
    if args.func is run_demo and args.seed < 0:  # recall checks its own flags (run_recall)
        parser.error(f"--seed must be >= 0, got {args.seed}")
    if args.func is run_needle:
        check_needle_args(parser, args)
    if args.func is run_lm:
        _check_lm_args(parser, args)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
