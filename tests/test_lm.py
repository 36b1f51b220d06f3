"""``minititans lm``: bits per character, position buckets, matched sizes, the output contract.

bpc is checked against a hand computation on hand-made logits and against a naive loop
over positions written here (``math.log2`` of a softmax computed term by term); the end
to end run is tiny (a few steps) and checks the exact keys of the results.
"""

import hashlib
import json
import math

import numpy as np
import pytest

from minititans.cli import main
from minititans.experiments.lm import (
    LMSettings,
    bits_per_position,
    bpc_report,
    evaluate_bpc,
    model_config,
    parameter_count,
    position_buckets,
)
from minititans.models import DISPLAY_NAMES, MODEL_NAMES, Model, ModelConfig


def naive_bits(logits, targets):
    """-log2 softmax(logits)[target], one position at a time."""
    B, T, V = np.shape(logits)
    out = np.zeros((B, T))
    for b in range(B):
        for t in range(T):
            row = [float(x) for x in logits[b, t]]
            top = max(row)
            z = sum(math.exp(x - top) for x in row)
            out[b, t] = -math.log2(math.exp(row[targets[b, t]] - top) / z)
    return out


def test_bpc_by_hand_on_hand_made_logits():
    # position 0: uniform over 4 -> 2 bits; position 1: p = e^2 / (e^2 + 3) on the target;
    # position 2: the target has logit 0 against [ln 3, 0, 0]: p = 1/(3+1+1+1) -> log2 6
    logits = np.array([[[0.0, 0.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0],
                        [math.log(3.0), 0.0, 0.0, 0.0]]])
    targets = np.array([[3, 0, 1]])
    bits = bits_per_position(logits, targets)
    want = [2.0, -math.log2(math.e**2 / (math.e**2 + 3)), math.log2(6.0)]
    np.testing.assert_allclose(bits, [want], rtol=0, atol=1e-12)
    bpc, by_pos = bpc_report(bits, window=1)
    assert bpc == pytest.approx(sum(want) / 3, abs=1e-12)
    assert by_pos == [{"start": 0, "stop": 1, "bpc": pytest.approx(want[0], abs=1e-12)},
                      {"start": 1, "stop": 3, "bpc": pytest.approx((want[1] + want[2]) / 2,
                                                                   abs=1e-12)}]


def test_bits_per_position_equals_a_naive_loop_on_large_logits(rng):
    logits = 30 * rng.standard_normal((3, 7, 11))  # large: a naive exp would overflow
    targets = rng.integers(11, size=(3, 7))
    np.testing.assert_allclose(bits_per_position(logits, targets), naive_bits(logits, targets),
                               rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("window, length, want", [
    (16, 256, [(0, 16), (16, 64), (64, 256)]),
    (8, 100, [(0, 8), (8, 32), (32, 100)]),
    (4, 1024, [(0, 4), (4, 16), (16, 64), (64, 256), (256, 1024)]),
    (16, 10, [(0, 10)]),
    (16, 17, [(0, 16), (16, 17)]),
])
def test_position_buckets_are_0_w_4w_16w(window, length, want):
    assert position_buckets(window, length) == want


def test_bucket_bpc_is_the_mean_over_its_positions(rng):
    bits = rng.uniform(0, 8, size=(5, 40))
    bpc, rows = bpc_report(bits, window=4)
    assert [(r["start"], r["stop"]) for r in rows] == [(0, 4), (4, 16), (16, 40)]
    for r in rows:
        want = sum(bits[b, t] for b in range(5) for t in range(r["start"], r["stop"]))
        assert r["bpc"] == pytest.approx(want / (5 * (r["stop"] - r["start"])), rel=1e-12)
    # overall = the bucket means weighted by their widths
    assert bpc == pytest.approx(sum(r["bpc"] * (r["stop"] - r["start"]) for r in rows) / 40,
                                rel=1e-12)


def test_evaluate_bpc_equals_naive_bits_of_apply(rng):
    model = Model(ModelConfig(model="swa", vocab_size=9, d_model=8, window=4))
    params = model.init(rng)
    windows = rng.integers(9, size=(5, 13))
    got = evaluate_bpc(model, params, windows, batch_size=2)
    logits = np.asarray(model.apply(params, windows[:, :-1]))
    np.testing.assert_allclose(got, naive_bits(logits, windows[:, 1:]), rtol=1e-10, atol=1e-10)


def test_models_are_matched_to_the_parameter_target():
    s = LMSettings()
    for name in MODEL_NAMES:
        cfg = model_config(name, s, 106, "reference")
        n = parameter_count(cfg)
        assert abs(n - s.params_target) <= 0.06 * s.params_target, (name, n)
        # no other width (a multiple of the head count) comes closer
        for d in (cfg.d_model - 2, cfg.d_model + 2):
            other = parameter_count(cfg.with_(d_model=d))
            assert abs(other - s.params_target) >= abs(n - s.params_target), (name, d)
    # the count is the number of floats in the parameter tree
    cfg = model_config("lmm", s, 106, "reference")
    from minititans.models import ravel

    assert parameter_count(cfg) == ravel(Model(cfg).init(np.random.default_rng(1)))[0].size


def _text_file(tmp_path):
    path = tmp_path / "doc.txt"
    text = "".join(f"The memory at step {i} learns that {i % 7} follows {i % 5}.\n"
                   for i in range(120))
    path.write_text(text, encoding="utf-8")
    return path, text


def test_lm_command_writes_the_output_contract_exactly(tmp_path, capfd):
    path, text = _text_file(tmp_path)
    out = tmp_path / "out"
    assert main(["lm", "--quick", "--text", str(path), "--models", "swa", "lmm",
                 "--steps", "2", "--seeds", "2", "--workers", "1", "--quiet",
                 "--out", str(out)]) == 0
    assert (out / "lm.png").stat().st_size > 10_000
    res = json.loads((out / "results.json").read_text())["lm"]
    assert set(res) == {"corpus", "rows", "depth", "sample"}
    assert res["corpus"] == {"name": "doc.txt", "n_chars": len(text),
                             "checksum": hashlib.sha256(text.encode()).hexdigest(),
                             "python_version": res["corpus"]["python_version"]}
    assert [(r["model"], r["seed"]) for r in res["rows"]] == [
        (DISPLAY_NAMES["swa"], 0), (DISPLAY_NAMES["swa"], 1),
        (DISPLAY_NAMES["lmm"], 0), (DISPLAY_NAMES["lmm"], 1)]
    for r in res["rows"]:
        assert set(r) == {"model", "params", "seed", "bpc", "bpc_by_position"}
        assert type(r["params"]) is int and type(r["seed"]) is int and type(r["bpc"]) is float
        assert [(b["start"], b["stop"]) for b in r["bpc_by_position"]] == [
            (0, 16), (16, 64), (64, 256)]
        for b in r["bpc_by_position"]:
            assert set(b) == {"start", "stop", "bpc"} and type(b["bpc"]) is float
        # two steps from initialisation: near a uniform guess over the vocabulary
        V = len(set(text))
        assert abs(r["bpc"] - math.log2(V)) < 1.0, r["bpc"]
        widths = [b["stop"] - b["start"] for b in r["bpc_by_position"]]
        assert r["bpc"] == pytest.approx(
            sum(b["bpc"] * w for b, w in zip(r["bpc_by_position"], widths)) / 256, rel=1e-9)
    assert [(d["memory_depth"], d["seed"]) for d in res["depth"]] == [
        (L, s) for L in (1, 2, 3, 4) for s in (0, 1)]
    for d in res["depth"]:
        assert set(d) == {"memory_depth", "seed", "bpc"} and type(d["bpc"]) is float
    # L_M = 2 is the LMM row itself, not a second run
    lmm = {r["seed"]: r["bpc"] for r in res["rows"] if r["model"] == "LMM"}
    assert {d["seed"]: d["bpc"] for d in res["depth"] if d["memory_depth"] == 2} == lmm
    # the sample starts with the prompt (a validation window's first 64 characters)
    assert isinstance(res["sample"], str) and len(res["sample"]) == 64 + 120
    assert res["sample"][:64] in text
    assert set(res["sample"]) <= set(text)
    printed = capfd.readouterr().out  # the command may run in a child process
    assert "sha256 " + hashlib.sha256(text.encode()).hexdigest() in printed


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "0"], "--seeds must be >= 1"),
    (["--steps", "-1"], "--steps must be >= 1"),
    (["--workers", "0"], "--workers must be >= 1"),
])
def test_lm_command_rejects_bad_numbers(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["lm", *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"\x7fELF\x02\x01\x01\x00\x00\x00" * 300, "NUL bytes"),
    (b"tiny text\n" * 20, "too short"),
])
def test_lm_command_rejects_bad_text_files_naming_them(tmp_path, content, message, capsys):
    path = tmp_path / "mine.txt"
    path.write_bytes(content)
    with pytest.raises(SystemExit) as e:
        main(["lm", "--text", str(path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--text" in err and "mine.txt" in err and message in err


def test_plot_lm_draws_seed_means_by_position_and_by_depth():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from minititans.viz import plot_lm

    def row(model, seed, vals):
        return {"model": model, "params": 100, "seed": seed, "bpc": float(np.mean(vals)),
                "bpc_by_position": [{"start": a, "stop": b, "bpc": v}
                                    for (a, b), v in zip([(0, 4), (4, 16), (16, 64)], vals)]}

    result = {"corpus": {"name": "toy", "checksum": "ab" * 32, "n_chars": 1000,
                         "python_version": "3.x"},
              "rows": [row("SWA", 0, [3.0, 2.0, 2.0]), row("SWA", 1, [3.2, 2.2, 2.4]),
                       row("LMM", 0, [3.1, 2.1, 1.5]), row("LMM", 1, [2.9, 1.9, 1.7])],
              "depth": [{"memory_depth": L, "seed": s, "bpc": 2.0 + 0.1 * L + 0.2 * s}
                        for L in (1, 2, 3) for s in (0, 1)],
              "sample": "x"}
    fig = plot_lm(result, window=4)
    ax, ax_d = fig.axes
    means = {c.get_label(): c.lines[0].get_ydata() for c in ax.containers}
    np.testing.assert_allclose(means["SWA"], [3.1, 2.1, 2.2], atol=1e-12)
    np.testing.assert_allclose(means["LMM"], [3.0, 2.0, 1.6], atol=1e-12)
    # the bars span the seeds' min to max: SWA's last bucket from 2.0 to 2.4
    segs = {c.get_label(): c.lines[2][0].get_segments() for c in ax.containers}
    np.testing.assert_allclose([segs["SWA"][2][0][1], segs["SWA"][2][1][1]], [2.0, 2.4],
                               atol=1e-12)
    assert [t.get_text().split("\n")[0] for t in ax.get_xticklabels()] == [
        "0-1w", "1w-4w", "4w-16w"]
    depth_line = ax_d.containers[0].lines[0]
    np.testing.assert_allclose(np.asarray(depth_line.get_xdata(), float), [1, 2, 3])
    np.testing.assert_allclose(depth_line.get_ydata(), [2.2, 2.3, 2.4], atol=1e-12)
    plt.close(fig)
