"""The plotting helpers draw the data they are given, on labelled axes."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from minititans.viz import plot_capacity, plot_per_token, plot_recall_by_age  # noqa: E402


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def span_x(patch):
    """(x0, x1) of an axvspan: a Rectangle in recent matplotlib, a Polygon in older ones."""
    if hasattr(patch, "get_width"):
        return patch.get_x(), patch.get_x() + patch.get_width()
    xs = np.asarray(patch.get_xy())[:, 0]
    return xs.min(), xs.max()


def lines_by_label(ax):
    return {line.get_label(): line for line in ax.get_lines()}


def test_plot_recall_by_age_draws_each_curve_and_the_window():
    ages = np.arange(10)
    curves = {"w = 4": (ages < 4).astype(float), "full": np.ones(10)}
    ax = plot_recall_by_age(ages, curves, window=4, ylabel="accuracy", title="t")
    lines = lines_by_label(ax)
    for label, ys in curves.items():
        np.testing.assert_array_equal(lines[label].get_xdata(), ages)
        np.testing.assert_array_equal(lines[label].get_ydata(), ys)
    # the window is a shaded span from -0.5 to w - 0.5 and a dashed edge at w - 0.5
    spans = [p for p in ax.patches if p.get_label() == "window w = 4"]
    assert len(spans) == 1
    assert span_x(spans[0]) == pytest.approx((-0.5, 3.5))
    edges = [ln for ln in ax.get_lines() if np.all(np.asarray(ln.get_xdata()) == 3.5)]
    assert len(edges) == 1
    assert ax.get_xlabel() and ax.get_ylabel() == "accuracy" and ax.get_title() == "t"


def test_plot_recall_by_age_without_window_draws_no_span():
    ax = plot_recall_by_age([0, 1, 2], {"a": [1.0, 0.5, 0.0]})
    assert not ax.patches
    assert ax.get_xlabel() and ax.get_ylabel()


def test_plot_per_token_draws_series_and_marks_on_given_axes():
    fig, ax = plt.subplots()
    s = np.array([1.0, 3.0, 2.0, 5.0])
    out = plot_per_token({"surprise": s}, marks=[1, 3], marks_label="planted", ax=ax,
                         ylabel="norm", logy=True)
    assert out is ax
    line = lines_by_label(ax)["surprise"]
    np.testing.assert_array_equal(line.get_xdata(), np.arange(4))
    np.testing.assert_array_equal(line.get_ydata(), s)
    bands = sorted(span_x(p) for p in ax.patches)
    assert bands == [pytest.approx((0.5, 1.5)), pytest.approx((2.5, 3.5))]  # one per mark
    assert [p.get_label() for p in ax.patches].count("planted") == 1   # one legend entry
    assert ax.get_yscale() == "log"
    assert ax.get_xlabel() == "token t" and ax.get_ylabel() == "norm"


def test_plot_capacity_draws_curves_on_log2_axis_with_d_marked():
    sizes = [2, 4, 8, 16]
    curves = {"linear": np.array([0.1, 0.2, 0.4, 0.9]), "floor": np.array([0, 0, 0, 0.5])}
    ax = plot_capacity(sizes, curves, d=8, styles={"floor": {"linestyle": ":"}}, title="cap")
    lines = lines_by_label(ax)
    for label, ys in curves.items():
        np.testing.assert_array_equal(lines[label].get_xdata(), sizes)
        np.testing.assert_array_equal(lines[label].get_ydata(), ys)
    assert lines["floor"].get_linestyle() == ":"
    assert any(np.all(np.asarray(ln.get_xdata()) == 8) for ln in ax.get_lines())  # N = d
    assert ax.get_xscale() == "log"
    assert ax.get_xlabel() == "number of stored pairs N"
    assert ax.get_ylabel() == "relative recall error" and ax.get_title() == "cap"


def test_plot_recall_keeps_coinciding_curves_apart_and_labels_off_scale_ones():
    from minititans.viz import plot_recall

    rows = [{"memory": m, "passes": 1, "n_pairs": n, "error": e}
            for m, errs in {"a": [0.1, 0.5], "b": [0.1, 0.5], "c": [0.2, 40.0],
                            "best matrix (least squares)": [0.0, 0.3]}.items()
            for n, e in zip([4, 32], errs)]
    fig = plot_recall({"passes": [1], "d": 16, "sizes": [4, 32], "rows": rows})
    ax = fig.axes[0]
    lines = lines_by_label(ax)
    # the identical curves a and b differ in marker or style and are shifted apart in x
    assert (lines["a"].get_marker(), lines["a"].get_linestyle()) != (
        lines["b"].get_marker(), lines["b"].get_linestyle())
    assert lines["a"].get_xdata()[0] != lines["b"].get_xdata()[0]
    np.testing.assert_allclose(lines["a"].get_ydata(), [0.1, 0.5])
    # c leaves the 0-1.6 range: drawn at the edge and named with its largest value
    assert max(lines["c"].get_ydata()) == pytest.approx(ax.get_ylim()[1])
    assert any("c: up to 40" in t.get_text() for t in ax.texts)
