"""The ``minititans`` command line: demo, recall, needle, train, ablate, bench.

Run ``minititans --help`` or ``minititans COMMAND --help`` for the options.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .io import update_results_json


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
        path = update_results_json(out, "recall", result)
        print(f"wrote {out / 'recall.png'} and {path}")
    return 0


def run_demo(args) -> int:
    start = time.perf_counter()
    print("Part 1 - test-time memorization, no training: write N random key->value pairs")
    print("into memories of the Titans family, then read every key back.\n")
    run_recall(args)
    if not args.skip_needle:
        from .needle import run_needle_demo

        print()
        run_needle_demo(None if args.out is None else Path(args.out), full=args.full,
                        progress=not args.quiet)
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
                    "passkey task and tests them at 1-8x the attention window, a miniature "
                    "of the paper's Table 2 (also `minititans needle`).")
    _add_recall_options(demo)
    demo.add_argument("--full", action="store_true",
                      help="part 2 with larger settings (window 32; several minutes)")
    demo.add_argument("--skip-needle", action="store_true", help="run part 1 only")
    demo.set_defaults(func=run_demo)
    recall = sub.add_parser(
        "recall", help="test-time recall table (demo part 1 alone)",
        description="Write N random key->value pairs into several memories and read them "
                    "back; print the relative recall error table and optionally save a plot.")
    _add_recall_options(recall)
    recall.set_defaults(func=run_recall)
    from .bench import add_parser as add_bench
    from .needle import add_parser as add_needle_train_ablate

    add_needle_train_ablate(sub)
    add_bench(sub)
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
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
