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
