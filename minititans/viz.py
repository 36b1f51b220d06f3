"""Plots shared by the CLI and the notebooks. Each takes an optional matplotlib ``ax``."""

from __future__ import annotations


def _axes(ax, ncols=1, figsize=(6, 4)):
    if ax is not None:
        return ax.figure, ax
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=figsize, squeeze=False)
    return fig, axes[0] if ncols > 1 else axes[0, 0]


# one marker and line style per curve, so curves that coincide stay visible
_MARKERS = ("o", "s", "^", "v", "D", "P", "X", "<", ">")
_STYLES = ("-", "--", "-.", (0, (3, 1, 1, 1)), (0, (5, 2)))


def plot_recall(result: dict, axes=None):
    """Recall error vs number of stored pairs, one panel per pass count, key width marked.

    Curves that coincide (the delta rule and Titans linear without momentum are nearly the
    same rule) are told apart by marker, line style and a small horizontal offset; a curve
    that leaves the plotted range is labelled at the top edge with its largest value.
    """
    passes = result["passes"]
    top = 1.6  # linear attention leaves the top: its cross-talk grows with N
    fig, axes = _axes(axes, ncols=len(passes), figsize=(5.5 * len(passes) + 2.2, 4.4))
    axes = list(axes) if len(passes) > 1 else [axes]
    labels = list(dict.fromkeys(r["memory"] for r in result["rows"]))
    curves = [label for label in labels if "least squares" not in label]
    for ax, p in zip(axes, passes):
        rows = [r for r in result["rows"] if r["passes"] == p]
        off_scale = []
        for label in labels:
            pts = [(r["n_pairs"], r["error"]) for r in rows
                   if r["memory"] == label and r["error"] is not None]
            if not pts:
                continue
            xs, ys = zip(*pts)
            if "least squares" in label:  # the floor of every matrix memory
                ax.plot(xs, ys, color="black", linestyle=":", marker="x", label=label)
                continue
            i = curves.index(label)
            shift = 2 ** (0.035 * (i - (len(curves) - 1) / 2))  # offset on the log axis
            ax.plot([x * shift for x in xs], [min(y, top) for y in ys], label=label,
                    marker=_MARKERS[i % len(_MARKERS)], linestyle=_STYLES[i % len(_STYLES)],
                    markersize=5, clip_on=False)
            if max(ys) > top:
                off_scale.append(f"{label}: up to {max(ys):.0f}" if max(ys) >= 10
                                 else f"{label}: up to {max(ys):.2f}")
        if off_scale:
            ax.text(0.02, 0.97, "off the scale (drawn at the top edge):\n" + "\n".join(off_scale),
                    transform=ax.transAxes, va="top", fontsize=7, color="dimgray")
        ax.axvline(result["d"], color="gray", linestyle="--", linewidth=1)
        ax.text(result["d"] * 1.04, 0.55, f"N = d = {result['d']}", color="gray", rotation=90,
                fontsize=8, transform=ax.get_xaxis_transform())
        ax.axhline(1.0, color="black", linewidth=0.8, alpha=0.5)
        ax.set_xscale("log", base=2)
        ax.set_xticks(result["sizes"], [str(n) for n in result["sizes"]])
        ax.minorticks_off()
        ax.set_ylim(0, top)
        ax.set_xlabel("number of stored pairs N")
        ax.set_ylabel("relative recall error (1 = empty memory)")
        what = "one write per pair" if p == 1 else f"{p} writes per pair"
        ax.set_title(f"{what}: the dotted line is the best any matrix can do", fontsize=10)
    axes[-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    return fig


def plot_recall_by_age(ages, curves: dict, *, window=None, ax=None, ylabel="recall accuracy",
                       xlabel="age of the pair (tokens since it was written)", title=None):
    """Recall against how long ago a pair was written, one line per setting.

    Args:
        ages: ``(n,)`` ages (or distances) in tokens, the x-axis.
        curves: ``{label: (n,) values}``, e.g. accuracy per distance, error per age.
        window: if given, the ages ``0 .. window - 1`` that an attention window still sees
            are shaded and the edge is drawn at ``window - 0.5``.
        ax: a matplotlib Axes to draw on (a new figure if None).

    Returns:
        The Axes.
    """
    _, ax = _axes(ax)
    for label, ys in curves.items():
        ax.plot(ages, ys, marker=".", label=label)
    if window is not None:
        ax.axvspan(-0.5, window - 0.5, color="tab:green", alpha=0.12, label=f"window w = {window}")
        ax.axvline(window - 0.5, color="tab:green", linestyle="--", linewidth=1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title is not None:
        ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return ax


def plot_per_token(series: dict, *, marks=(), marks_label="marked tokens", ax=None,
                   ylabel="value", xlabel="token t", title=None, logy=False):
    """Per-token signals of one sequence, with chosen token positions marked.

    Args:
        series: ``{label: (T,) values}`` drawn against the token index ``0 .. T-1``.
        marks: token positions to highlight (planted tokens, an event): red vertical bands,
            named ``marks_label`` in the legend.
        logy: use a logarithmic y-axis.

    Returns:
        The Axes.
    """
    _, ax = _axes(ax, figsize=(8, 3.4))
    for label, ys in series.items():
        ax.plot(range(len(ys)), ys, linewidth=1.2, label=label)
    for i, t in enumerate(marks):
        ax.axvspan(t - 0.5, t + 0.5, color="tab:red", alpha=0.25,
                   label=marks_label if i == 0 else None)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title is not None:
        ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return ax


def plot_capacity(sizes, curves: dict, *, d: int, ax=None, ylabel="relative recall error",
                  title=None, styles=None):
    """Recall error against the number of stored pairs N, the key width d marked.

    Args:
        sizes: ``(n,)`` numbers of pairs N (drawn on a log-2 axis).
        curves: ``{label: (n,) errors}``; NaN entries (a diverged memory) leave a gap.
        d: key width; a dashed line at N = d marks where a matrix memory runs out of room.
        styles: optional ``{label: dict of plot keywords}`` (e.g. a dotted floor).

    Returns:
        The Axes.
    """
    _, ax = _axes(ax)
    styles = styles or {}
    for label, ys in curves.items():
        ax.plot(sizes, ys, **{"marker": "o", **styles.get(label, {})}, label=label)
    ax.axvline(d, color="gray", linestyle="--", linewidth=1)
    ax.text(d, 0.97, " N = d", color="gray", va="top", transform=ax.get_xaxis_transform())
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(sizes), [str(n) for n in sizes])
    ax.set_xlabel("number of stored pairs N")
    ax.set_ylabel(ylabel)
    if title is not None:
        ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return ax
def plot_needle(result: dict, axes=None):
    """Accuracy against length, one panel per task, one curve per model, a band over seeds.

    Each curve is the mean over seeds with the min-max range shaded; the curves are shifted
    a little along the (log) length axis and carry their own markers, so none hides
    another. The window is a vertical line, chance a dotted horizontal one.

    Args:
        result: the ``"needle"`` dict (``window``, ``train_length``, ``rows`` with ``task``,
            ``model``, ``length``, ``seed``, ``accuracy``, ``chance``).
        axes: optional sequence of Axes, one per task.

    Returns:
        The Figure.
    """
    import matplotlib.pyplot as plt
    import numpy as np

    rows, w = result["rows"], result["window"]
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    models = list(dict.fromkeys(r["model"] for r in rows))
    if axes is None:
        _, axes = plt.subplots(1, len(tasks), figsize=(max(6.5, 4.6 * len(tasks)), 4.6),
                               squeeze=False, sharey=True)
        axes = axes[0]
    markers = "osD^vP*Xh<>"
    titles = {"pk": "passkey (PK)", "n": "number (N)", "w": "hex value (W)",
              "babilong": "BABILong qa1"}
    for ax, task in zip(axes, tasks):
        mine = [r for r in rows if r["task"] == task]
        lengths = sorted({r["length"] for r in mine})
        for i, m in enumerate(models):
            acc = {}
            for r in mine:
                if r["model"] == m:
                    acc.setdefault(r["length"], []).append(100 * r["accuracy"])
            if not acc:
                continue
            xs = sorted(acc)
            shift = 2.0 ** (0.07 * (i - (len(models) - 1) / 2))  # spread along the log axis
            x = np.array(xs, dtype=float) * shift
            mean = np.array([np.mean(acc[n]) for n in xs])
            lo, hi = (np.array([f(acc[n]) for n in xs]) for f in (np.min, np.max))
            line, = ax.plot(x, mean, marker=markers[i % len(markers)], markersize=5, label=m,
                            linestyle="--" if m == "SWA" else "-", linewidth=1.3)
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.12, linewidth=0)
        chance = 100 * mine[0]["chance"]
        ax.axhline(chance, color="gray", linewidth=1, linestyle=":")
        ax.text(lengths[0], chance + 2, " chance", color="gray", fontsize=8)
        ax.axvline(w, color="black", linewidth=0.8, alpha=0.5)
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [f"{n}\n({n // w}w)" for n in lengths], fontsize=8)
        ax.minorticks_off()
        ax.set_ylim(-3, 105)
        ax.set_xlabel("sequence length (tokens)")
        ax.set_title(titles.get(task, task), fontsize=10)
    axes[0].set_ylabel("accuracy (%)")
    fig = axes[0].figure
    handles, labels = axes[0].get_legend_handles_labels()
    fig.suptitle(f"Needle beyond a {w}-token window, trained at up to "
                 f"{result['train_length']} tokens\nmean over seeds, band: min-max", fontsize=10)
    # one legend row for up to five models, two rows beyond (eight names do not fit in one
    # row of a one-task figure)
    ncol = len(labels) if len(labels) <= 5 else (len(labels) + 1) // 2
    fig.tight_layout(rect=(0, 0.08 if ncol == len(labels) else 0.13, 1, 1))
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    return fig


def plot_lm(result: dict, window: int, axes=None):
    """Character-level LM: bpc by position bucket per model, and bpc against memory depth.

    Args:
        result: the ``"lm"`` results of :func:`minititans.experiments.lm.lm_experiment`.
        window: the attention window ``w`` (the bucket edges are drawn in units of it).
        axes: two matplotlib Axes (a new figure if None).

    Returns:
        The Figure. Points are means over seeds; bars span the seeds' min to max.
    """
    import numpy as np

    if axes is None:
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(12, 4.4), gridspec_kw={"width_ratios": [2, 1]})
    ax, ax_d = axes
    rows = result["rows"]
    buckets = [(b["start"], b["stop"]) for b in rows[0]["bpc_by_position"]]
    xs = np.arange(len(buckets))
    models = list(dict.fromkeys(r["model"] for r in rows))
    for i, m in enumerate(models):
        per = np.array([[b["bpc"] for b in r["bpc_by_position"]]
                        for r in rows if r["model"] == m])  # (seeds, buckets)
        mean = per.mean(axis=0)
        off = (i - (len(models) - 1) / 2) * 0.04  # keep the bars of the seeds apart
        style = {"SWA": "--", "Transformer": ":"}.get(m, "-")
        ax.errorbar(xs + off, mean, yerr=[mean - per.min(axis=0), per.max(axis=0) - mean],
                    marker="o", linestyle=style, capsize=2, label=m)

    def edge(n):
        return "0" if n == 0 else (f"{n // window}w" if n % window == 0 else str(n))

    ax.set_xticks(xs, [f"{edge(a)}-{edge(b)}\n({a}-{b})" for a, b in buckets])
    ax.set_xlabel(f"position in the window (w = {window} characters)")
    ax.set_ylabel("validation bits per character")
    ax.set_title("bpc by position (beyond w, SWA sees nothing new)", fontsize=10)
    ax.legend(fontsize=8, ncol=2)
    depth = result["depth"]
    if depth:
        Ls = sorted({r["memory_depth"] for r in depth})
        vals = [np.array([r["bpc"] for r in depth if r["memory_depth"] == L]) for L in Ls]
        mean = np.array([v.mean() for v in vals])
        lo = mean - np.array([v.min() for v in vals])
        hi = np.array([v.max() for v in vals]) - mean
        ax_d.errorbar(Ls, mean, yerr=[lo, hi], marker="o", capsize=3, color="tab:purple")
        ax_d.set_xticks(Ls)
    ax_d.set_xlabel("memory depth $L_\\mathcal{M}$ (LMM)")
    ax_d.set_ylabel("validation bits per character")
    ax_d.set_title("bpc vs memory depth (Fig. 7 in small)", fontsize=10)
    c = result["corpus"]
    ax.figure.suptitle(f"{c['name']}: {c['n_chars']:,} characters, Python "
                       f"{c['python_version']}, sha256 {c['checksum'][:12]}", fontsize=10)
    ax.figure.tight_layout()
    return ax.figure


def plot_mad(result: dict, *, stats: dict, published: dict, columns: dict, order, ax=None):
    """MAD-mini: accuracy per task, one bar per model (mean over seeds, min-max whiskers,
    seeds as dots); the published full-MAD values as hollow diamonds, chance as grey ticks.

    ``stats`` is ``{model: {task: (mean, min, max)}}`` in % (``experiments.mad.summarize``),
    ``published`` the paper's rows, ``columns`` the short task names, ``order`` the tasks.
    """
    import numpy as np

    PUBLISHED, COLUMNS = published, columns
    tasks = [t for t in order if t in result["chance"]]
    models = list(stats)
    fig, ax = _axes(ax, figsize=(max(8, 1.6 * len(tasks) + 2), 4.4))
    width = 0.8 / len(models)
    for i, m in enumerate(models):
        xs = np.arange(len(tasks)) - 0.4 + (i + 0.5) * width
        mean = [stats[m][t][0] for t in tasks]
        err = [[stats[m][t][0] - stats[m][t][1] for t in tasks],
               [stats[m][t][2] - stats[m][t][0] for t in tasks]]
        bars = ax.bar(xs, mean, width, yerr=err, capsize=2, label=m)
        for x, t in zip(xs, tasks):
            accs = [100 * r["accuracy"] for r in result["rows"]
                    if r["model"] == m and r["task"] == t]
            ax.plot([x] * len(accs), accs, ".", color="black", markersize=3)
            if m in PUBLISHED:
                ax.plot(x, PUBLISHED[m][t], "D", markerfacecolor="none",
                        color=bars.patches[0].get_facecolor(), markeredgecolor="black",
                        markersize=5)
    for j, t in enumerate(tasks):
        ax.hlines(100 * result["chance"][t], j - 0.45, j + 0.45, color="gray", linewidth=1,
                  linestyle=":")
    ax.plot([], [], "D", markerfacecolor="none", markeredgecolor="black",
            label="published (full MAD)")
    ax.set_xticks(range(len(tasks)), [COLUMNS[t] for t in tasks])
    ax.set_ylim(0, 105)
    ax.set_ylabel("accuracy (%)")
    ax.set_title("MAD-mini: every model at ~equal parameter count (dotted: chance)",
                 fontsize=10)
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    return fig


def write_outputs(out_dir, key: str, result: dict, plot, png: str) -> None:
    """An experiment's ``--out DIR``: ``DIR/png`` from ``plot(result)`` (a function that
    returns a Figure) and ``result`` under ``key`` in ``DIR/results.json``; says both."""
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .io import update_results_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fig = plot(result)
    fig.savefig(out / png, dpi=120)
    plt.close(fig)
    path = update_results_json(out, key, result)
    print(f"wrote {out / png} and {path}")
