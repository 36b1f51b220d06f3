"""The ``minititans`` command line: ``demo``, ``recall`` and ``bench``.

Run ``minititans --help`` or ``minititans COMMAND --help`` for the options.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _save_results(out: Path, key: str, payload: dict) -> Path:
    """Add ``payload`` under ``key`` in ``out/results.json`` (other keys are kept)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results[key] = payload
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(path)
    return path


def run_recall(args) -> int:
    from .recall import format_recall_table, recall_experiment

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
        path = _save_results(out, "recall", result)
        print(f"wrote {out / 'recall.png'} and {path}")
    return 0


def run_demo(args) -> int:
    print("Part 1 - test-time memorization, no training: write N random key->value pairs")
    print("into memories of the Titans family, then read every key back.\n")
    return run_recall(args)


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minititans",
        description="minititans: Titans (Learning to Memorize at Test Time) in NumPy. "
                    "Neural long-term memory trained while it reads.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    demo = sub.add_parser(
        "demo", help="the headline demo (part 1: test-time recall)",
        description="Run the headline demo. Part 1 writes random key->value pairs into "
                    "linear attention, the delta rule and Titans memories (linear and deep, "
                    "with and without momentum and forgetting) and prints how well each "
                    "recalls them as the number of pairs passes the key width d.")
    _add_recall_options(demo)
    demo.set_defaults(func=run_demo)
    recall = sub.add_parser(
        "recall", help="test-time recall table (demo part 1 alone)",
        description="Write N random key->value pairs into several memories and read them "
                    "back; print the relative recall error table and optionally save a plot.")
    _add_recall_options(recall)
    recall.set_defaults(func=run_recall)
    try:
        from .bench import add_parser as add_bench
    except ImportError:
        add_bench = None
    if add_bench is not None:
        add_bench(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("d",):
        if getattr(args, name, 1) < 1:
            parser.error(f"--{name} must be >= 1")
    for name in ("sizes", "passes"):
        if any(v < 1 for v in getattr(args, name, [1])):
            parser.error(f"--{name} values must be >= 1")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
