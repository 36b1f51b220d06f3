"""Plots shared by the CLI and the notebooks. Each takes an optional matplotlib ``ax``."""

from __future__ import annotations


def _axes(ax, ncols=1, figsize=(6, 4)):
    if ax is not None:
        return ax.figure, ax
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=figsize, squeeze=False)
    return fig, axes[0] if ncols > 1 else axes[0, 0]


def plot_recall(result: dict, axes=None):
    """Recall error vs number of stored pairs, one panel per pass count, key width marked."""
    passes = result["passes"]
    fig, axes = _axes(axes, ncols=len(passes), figsize=(5.5 * len(passes), 4.2))
    axes = list(axes) if len(passes) > 1 else [axes]
    for ax, p in zip(axes, passes):
        rows = [r for r in result["rows"] if r["passes"] == p]
        for label in dict.fromkeys(r["memory"] for r in rows):
            pts = [(r["n_pairs"], r["error"]) for r in rows
                   if r["memory"] == label and r["error"] is not None]
            if pts:
                xs, ys = zip(*pts)
                if "least squares" in label:  # the floor of every matrix memory
                    ax.plot(xs, ys, color="black", linestyle=":", marker="x", label=label)
                else:
                    ax.plot(xs, ys, marker="o", label=label)
        ax.axvline(result["d"], color="gray", linestyle="--", linewidth=1)
        ax.text(result["d"], 0.02, " N = d", color="gray", transform=ax.get_xaxis_transform())
        ax.axhline(1.0, color="black", linewidth=0.8, alpha=0.5)
        ax.set_xscale("log", base=2)
        ax.set_xticks(result["sizes"], [str(n) for n in result["sizes"]])
        ax.set_ylim(0, 1.6)  # linear attention leaves the top: its cross-talk grows with N
        ax.set_xlabel("number of stored pairs N")
        ax.set_ylabel("relative recall error")
        what = "one write per pair" if p == 1 else f"{p} writes per pair"
        ax.set_title(f"{what}: the dotted line is the best any matrix can do", fontsize=10)
    axes[0].legend(fontsize=8)
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




def plot_mad(result: dict, ax=None):
    """MAD-mini: accuracy per task, one bar per model (mean over seeds, min-max whiskers,
    seeds as dots); the published full-MAD values as hollow diamonds, chance as grey ticks."""
    import numpy as np

    from .experiments.mad import COLUMNS, PUBLISHED, TABLE_ORDER, summarize

    stats = summarize(result)
    tasks = [t for t in TABLE_ORDER if t in result["chance"]]
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
