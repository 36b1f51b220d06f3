"""The ``minititans`` command line: every subcommand and every flag lives here.

``demo`` (recall, then needle), ``recall``, ``needle``, ``ablate``, ``train`` and ``bench``.
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

# --- demo and recall --------------------------------------------------------------------------


def run_recall(args) -> int:
    from .experiments.recall import format_recall_table, recall_experiment
    from .io import update_results_json

    start = time.perf_counter()
    result = recall_experiment(d=args.d, sizes=args.sizes, passes=args.passes, seed=args.seed,
                               progress=not args.quiet)
    print(format_recall_table(result))
    print(f"recall: {time.perf_counter() - start:.1f} s")
    if args.out is not None:
        import matplotlib

        matplotlib.use("Agg")
        from .viz import plot_recall

        out = Path(args.out)
        fig = plot_recall(result)
        out.mkdir(parents=True, exist_ok=True)
        fig.savefig(out / "recall.png", dpi=120)
        path = update_results_json(out, "recall", result)
        print(f"wrote {out / 'recall.png'} and {path}")
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


def _add_recall_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", metavar="DIR", default=None,
                   help="write recall.png and results.json (key 'recall') into DIR")
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
    if args.steps is not None:
        changes["train"] = {**settings.train, "steps": args.steps}
        changes["train_overrides"] = {m: {k: v for k, v in o.items() if k != "steps"}
                                      for m, o in settings.train_overrides.items()}
    return replace(settings, **changes)


def run_needle(args) -> int:
    from .experiments.needle import run_needle_experiment

    start = time.perf_counter()
    run_needle_experiment(needle_settings(args), args.out, progress=not args.quiet,
                          workers=args.workers)
    print(f"needle: {time.perf_counter() - start:.1f} s in all")
    return 0


def check_needle_args(parser, args) -> None:
    """Usage errors for ``needle`` flags, before any training (argparse checks the names)."""
    for flag in ("tasks", "models", "seeds", "lengths"):
        values = getattr(args, flag)
        if values is not None and len(set(values)) != len(values):
            parser.error(f"--{flag} must not repeat a value, got {' '.join(map(str, values))}")
    if args.seeds is not None and min(args.seeds) < 0:
        parser.error(f"--seeds must be >= 0, got {min(args.seeds)}")
    if args.lengths is not None and min(args.lengths) < 1:
        parser.error(f"--lengths are multiples of the window and must be >= 1, got "
                     f"{min(args.lengths)}")
    for flag in ("steps", "workers"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")


def run_ablate(args) -> int:
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


def run_train(args) -> int:
    import numpy as np

    from .experiments.ablation import AblationSettings
    from .experiments.pool import resolve_backend
    from .io import update_results_json
    from .models import Model, ModelConfig
    from .tasks import BabilongTask, NeedleTask, make_task
    from .training import TrainConfig, evaluate, load_checkpoint, train

    task = make_task(args.task, args.length)
    if isinstance(task, (NeedleTask, BabilongTask)):
        task = replace(task, placement="anywhere")
    if args.resume is not None:
        state, model, cfg, _ = load_checkpoint(args.resume)
        cfg = replace(cfg, steps=args.steps) if args.steps is not None else cfg
        resume = state
    else:
        extra = parse_config(args.config)
        unknown = set(extra) - set(ModelConfig.__dataclass_fields__)
        if unknown:
            raise ValueError("--config has unknown ModelConfig fields: "
                             f"{', '.join(sorted(unknown))}")
        # the base model: the LMM of the needle and ablation experiments
        fields = {**AblationSettings().model, "window": args.window,
                  "segment_len": args.window, **extra, "model": args.model,
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


def _common(p, out_help):
    p.add_argument("--out", metavar="DIR", default=None, help=out_help)
    p.add_argument("--backend", choices=("auto", "reference", "numba"), default="auto",
                   help="memory scan backend (default auto: numba if its gradient works)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_needle(sub):
    from .experiments.needle import MODELS, TASKS

    p = sub.add_parser(
        "needle", help="needles beyond the attention window, five seeds (Titans Table 2 in "
                       "small)",
        description="Train SWA, the four Titans (LMM, MAC, MAG, MAL) and the matrix-memory "
                    "baselines (linear attention, gated DeltaNet, a TTT-Linear-style memory) "
                    "on the S-NIAH needles (pk, n, w) and BABILong qa1 with five seeds, at 2-32x "
                    "the 16-token window; evaluate at 1x to 256x the window (--full: to "
                    "1024x) on sequences from seeds never used in training; print mean "
                    "(min-max) over seeds, shaped like Titans Table 2.")
    _common(p, "write needle.png and results.json (key 'needle') into DIR")
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=None, metavar="TASK",
                   help=f"tasks, from {', '.join(TASKS)} (default: all)")
    p.add_argument("--models", nargs="+", choices=MODELS, default=None, metavar="MODEL",
                   help=f"models, from {', '.join(MODELS)} (default: all)")
    p.add_argument("--seeds", nargs="+", type=int, default=None, metavar="SEED",
                   help="training seeds (default: 0 1 2 3 4)")
    p.add_argument("--lengths", nargs="+", type=int, default=None, metavar="K",
                   help="evaluation lengths as multiples of the window (default: 1 4 16 64 "
                        "256; --full adds 1024)")
    p.add_argument("--full", action="store_true",
                   help="evaluate up to 1024x the window (16,384 tokens; takes longer)")
    p.add_argument("--steps", type=int, default=None, help="training steps per model")
    p.add_argument("--workers", type=int, default=None,
                   help="parallel training processes (default: number of cores)")
    p.set_defaults(func=run_needle)


def _add_train(sub):
    from .models.config import MODEL_NAMES
    from .tasks import TASKS

    p = sub.add_parser(
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
    p.set_defaults(func=run_train)


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
    p.add_argument("--length", type=int, default=32, help="training length (default 32)")
    p.add_argument("--eval-length", type=int, default=64, help="default 64")
    p.add_argument("--with-titans", action="store_true", help="also MAC, MAG and MAL rows")
    p.add_argument("--workers", type=int, default=None, help="parallel processes")
    _common(p, "add the table to DIR/results.json (key 'ablation')")
    p.set_defaults(func=run_ablate)


# --- bench --------------------------------------------------------------------------------------


def run_bench_command(args) -> int:
    """The ``bench`` subcommand: run, print the table, write JSON to ``--out``."""
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
        if args.tokens < 1 or args.depth < 1:
            raise ValueError(f"--tokens and --depth must be >= 1, got {args.tokens} and "
                             f"{args.depth}")
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


BENCH_HELP = """Benchmark the numba kernels against the single-thread matmul peak of this machine.

Prints a table (tokens/s, GFLOP/s, % of peak, speedup over the reference path) for the
memory scan at d in {32, 64, 128}, depth 1-4, chunk 1/16/64 (T = 4096, float32), the
headline depth-2 d=64 memory in float64, forward+VJP against forward, a batch of two
sequences on two threads against one, the first call in a fresh process, and the attention
kernels; then whether the goals of docs/performance.md are met. --quick runs a small
subset in about a minute; the full run takes a few minutes on two cores."""


def _add_bench(sub):
    p = sub.add_parser("bench", help="benchmark the numba kernels", description=BENCH_HELP,
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
    p.set_defaults(func=run_bench_command)


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
        description="Run the headline demo (about 1-2 minutes on 2 cores). Part 1 writes "
                    "random key->value pairs into linear attention, the delta rule and "
                    "Titans memories (linear and deep, with and without momentum and "
                    "forgetting) and prints how well each recalls them as the number of "
                    "pairs passes the key width d (also `minititans recall`). Part 2 trains "
                    "sliding-window attention and the four Titans (LMM, MAC, MAG, MAL) on a "
                    "passkey task with seeds --seed, +1, +2 and tests them at 1-64x the "
                    "attention window, a cut of `minititans needle` (Titans Table 2 in "
                    "small).")
    _add_recall_options(demo)
    demo.add_argument("--full", action="store_true",
                      help="part 2 with five seeds up to 256x the window (longer)")
    demo.add_argument("--skip-needle", action="store_true", help="run part 1 only")
    demo.set_defaults(func=run_demo)
    recall = sub.add_parser(
        "recall", help="test-time recall table (demo part 1 alone)",
        description="Write N random key->value pairs into several memories and read them "
                    "back; print the relative recall error table and optionally save a plot.")
    _add_recall_options(recall)
    recall.set_defaults(func=run_recall)
    _add_needle(sub)
    _add_train(sub)
    _add_ablate(sub)
    _add_bench(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.func in (run_demo, run_recall):
        if args.d < 1:
            parser.error("--d must be >= 1")
        for name in ("sizes", "passes"):
            if any(v < 1 for v in getattr(args, name)):
                parser.error(f"--{name} values must be >= 1")
        if args.seed < 0:
            parser.error(f"--seed must be >= 0, got {args.seed}")
    if args.func is run_needle:
        check_needle_args(parser, args)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
