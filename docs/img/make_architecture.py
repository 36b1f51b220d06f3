"""Draw docs/img/architecture.svg, the picture of the three Titans on the home page.

Run from the repository root to regenerate it (the output is deterministic)::

    .venv/bin/python docs/img/make_architecture.py

Each panel is one Titans block of Section 4 (Figures 2-4 of the paper), drawn from the
equations: MAC (Eqs. 21-25), MAG (Eqs. 26-28), MAL (Eqs. 29-31). Colours: persistent
memory (Eq. 19) purple, the neural long-term memory (Section 3) orange, attention (the
short-term memory, Eq. 2) blue.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

OUT = Path(__file__).resolve().parent / "architecture.svg"
COLOURS = {"persistent": "#d9c8f0", "memory": "#ffd8a8", "attention": "#c5dcf5",
           "input": "#eeeeee", "gate": "#ffffff"}


def box(ax, x, y, w, h, text, kind, fontsize=9):
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.02",
                                facecolor=COLOURS[kind], edgecolor="#444444", linewidth=1))
    ax.text(x, y, text, ha="center", va="center", fontsize=fontsize)


def arrow(ax, start, end, **kw):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=10,
                                 color="#444444", linewidth=1, shrinkA=0, shrinkB=0, **kw))


def gate(ax, x, y):
    ax.add_patch(plt.Circle((x, y), 0.16, facecolor="white", edgecolor="#444444"))
    ax.text(x, y, r"$\otimes$", ha="center", va="center", fontsize=11)


def panel_mac(ax):
    ax.set_title("MAC: memory as a context\n(Eqs. 21-25)", fontsize=10)
    box(ax, 2.0, 0.5, 2.6, 0.5, r"segment $S^{(t)}$", "input")
    box(ax, 0.9, 1.7, 1.7, 0.6, "read\n" + r"$h_t=\mathcal{M}^*_{t-1}(q_t)$", "memory", 8)
    box(ax, 2.0, 3.0, 3.6, 0.6, r"$[p_1..p_{N_p}] \,\|\, h_t \,\|\, S^{(t)}$", "persistent", 8)
    box(ax, 2.0, 4.2, 2.6, 0.6, r"attention $y_t$ (Eq. 23)", "attention")
    box(ax, 0.9, 5.4, 1.7, 0.6, "write, read\n" + r"$\mathcal{M}_t(y_t)$", "memory", 8)
    gate(ax, 2.6, 6.3)
    box(ax, 2.6, 7.2, 1.8, 0.5, r"$o_t = y_t \otimes \mathcal{M}^*_t(y_t)$", "input", 8)
    arrow(ax, (1.4, 0.75), (1.0, 1.4))
    arrow(ax, (2.6, 0.75), (2.6, 2.7))
    arrow(ax, (0.9, 2.0), (1.2, 2.7))
    arrow(ax, (2.0, 3.3), (2.0, 3.9))
    arrow(ax, (1.5, 4.5), (1.0, 5.1))
    arrow(ax, (2.6, 4.5), (2.6, 6.14))
    arrow(ax, (1.4, 5.7), (2.45, 6.25))
    arrow(ax, (2.6, 6.46), (2.6, 6.95))


def panel_mag(ax):
    ax.set_title("MAG: memory as a gate\n(Eqs. 26-28)", fontsize=10)
    box(ax, 2.0, 0.5, 2.6, 0.5, r"input $x$", "input")
    box(ax, 2.0, 1.7, 3.0, 0.6, r"$\tilde x = [p_1..p_{N_p}] \,\|\, x$", "persistent", 9)
    box(ax, 0.95, 3.6, 1.9, 0.9, "sliding-window\nattention\n(Eq. 27)", "attention", 8)
    box(ax, 3.05, 3.6, 1.9, 0.9, "neural memory\n" + r"$\mathcal{M}(\tilde x)$" + "\n(Eqs. 13-15)",
        "memory", 8)
    gate(ax, 2.0, 5.6)
    box(ax, 2.0, 7.2, 1.8, 0.5, r"$o = y \otimes \mathcal{M}(\tilde x)$", "input", 8)
    arrow(ax, (2.0, 0.75), (2.0, 1.4))
    arrow(ax, (1.4, 2.0), (1.0, 3.15))
    arrow(ax, (2.6, 2.0), (3.0, 3.15))
    arrow(ax, (1.0, 4.05), (1.87, 5.5))
    arrow(ax, (3.0, 4.05), (2.13, 5.5))
    arrow(ax, (2.0, 5.76), (2.0, 6.95))


def panel_mal(ax):
    ax.set_title("MAL: memory as a layer\n(Eqs. 29-31)", fontsize=10)
    box(ax, 2.0, 0.5, 2.6, 0.5, r"input $x$", "input")
    box(ax, 2.0, 1.7, 3.0, 0.6, r"$\tilde x = [p_1..p_{N_p}] \,\|\, x$", "persistent", 9)
    box(ax, 2.0, 3.3, 2.6, 0.8, "neural memory\n" + r"$y = \mathcal{M}(\tilde x)$", "memory", 9)
    box(ax, 2.0, 5.1, 2.6, 0.8, "sliding-window\nattention (Eq. 31)", "attention", 9)
    box(ax, 2.0, 7.2, 1.8, 0.5, r"$o = \mathrm{SW\text{-}Attn}(y)$", "input", 8)
    arrow(ax, (2.0, 0.75), (2.0, 1.4))
    arrow(ax, (2.0, 2.0), (2.0, 2.9))
    arrow(ax, (2.0, 3.7), (2.0, 4.7))
    arrow(ax, (2.0, 5.5), (2.0, 6.95))


def main() -> Path:
    plt.rcParams["svg.hashsalt"] = "minititans"  # stable ids: the SVG is reproducible
    plt.rcParams["svg.fonttype"] = "path"  # glyphs as paths: looks the same in every browser
    fig, axes = plt.subplots(1, 3, figsize=(10, 4.6))
    for ax, draw in zip(axes, (panel_mac, panel_mag, panel_mal)):
        ax.set_xlim(-0.2, 4.2)
        ax.set_ylim(0.0, 7.7)
        ax.set_aspect("equal")
        ax.axis("off")
        draw(ax)
    legend = [("persistent memory (Eq. 19)", "persistent"),
              ("neural long-term memory (Section 3)", "memory"),
              ("attention, the short-term memory (Eq. 2)", "attention")]
    handles = [plt.Rectangle((0, 0), 1, 1, facecolor=COLOURS[k], edgecolor="#444444")
               for _, k in legend]
    fig.legend(handles, [t for t, _ in legend], loc="lower center", ncol=3, frameon=False,
               fontsize=9)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.9, bottom=0.08, wspace=0.05)
    fig.savefig(OUT, format="svg", metadata={"Date": None})
    plt.close(fig)
    return OUT


if __name__ == "__main__":
    print(f"wrote {main()}")
