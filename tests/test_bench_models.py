"""``minititans bench``'s model rows: what they hold, and that both backends time the same sums.

Tiny setting (batch 2, 32 tokens); no timing is asserted, only that the rates are positive
and finite and that the numba and reference runs computed the same loss and gradient.
"""

import json
import math

import numpy as np
import pytest

from minititans.bench import ModelBenchSettings, format_table, goals, run_model_bench
from minititans.bench.models import bench_batch
from minititans.experiments.needle import DEFAULT, model_config
from minititans.models import Model

TINY = ModelBenchSettings(cases=(("lmm", "train", 32), ("lmm", "inference", 32),
                                 ("gated_delta", "train", 32), ("swa", "inference", 32)),
                          batch_size=2, repeats=1, ref_repeats=1)
FIELDS = {"model", "what", "length", "batch", "backend", "tokens_per_s", "seconds", "runs",
          "loss", "speedup"}


@pytest.fixture(scope="module")
def tiny():
    return run_model_bench(TINY, progress=False)


def _rows(result, model, what):
    return {r["backend"]: r for r in result["rows"] if r["model"] == model and r["what"] == what}


def naive_cross_entropy(logits, targets, mask):
    """Mean -log softmax(logits)[target] over the masked positions, one position at a time."""
    total, count = 0.0, 0
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1]):
            if mask[b, t]:
                z = logits[b, t] - logits[b, t].max()
                total += -(z[targets[b, t]] - math.log(np.exp(z).sum()))
                count += 1
    return total / count


def test_model_rows_have_the_fields_and_positive_finite_rates(tiny):
    # LMM and Gated DeltaNet: a numba and a reference row per case; SWA at 32 keys: the
    # reference only (its numba attention starts at 2,048 keys: no numba path)
    assert [(r["model"], r["what"], r["backend"]) for r in tiny["rows"]] == [
        ("LMM", "train", "numba"), ("LMM", "train", "reference"),
        ("LMM", "inference", "numba"), ("LMM", "inference", "reference"),
        ("Gated DeltaNet", "train", "numba"), ("Gated DeltaNet", "train", "reference"),
        ("SWA", "inference", "reference")]
    for r in tiny["rows"]:
        assert FIELDS <= set(r)
        assert r["length"] == 32 and r["batch"] == 2 and r["runs"] == 1
        assert math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0
        # tokens/s is the batch's tokens over the best time
        assert r["tokens_per_s"] * r["seconds"] == pytest.approx(2 * 32, rel=1e-12)
    for what in ("train", "inference"):
        rows = _rows(tiny, "LMM", what)
        assert rows["reference"]["speedup"] is None
        assert rows["numba"]["speedup"] == pytest.approx(
            rows["numba"]["tokens_per_s"] / rows["reference"]["tokens_per_s"], rel=1e-12)
    assert tiny["rows"][-1]["note"] == "no numba path"
    assert json.loads(json.dumps(tiny)) == tiny  # JSON-ready as it is


def test_numba_and_reference_model_rows_compute_the_same_loss_and_gradient(tiny):
    for model, what in (("LMM", "train"), ("LMM", "inference"), ("Gated DeltaNet", "train")):
        rows = _rows(tiny, model, what)
        assert rows["numba"]["loss"] == pytest.approx(rows["reference"]["loss"], rel=1e-9)
    for model in ("LMM", "Gated DeltaNet"):
        train = _rows(tiny, model, "train")
        assert train["numba"]["grad_norm"] > 0
        assert train["numba"]["grad_norm"] == pytest.approx(train["reference"]["grad_norm"],
                                                            rel=1e-8)


def test_the_timed_loss_is_the_cross_entropy_of_the_models_logits_on_the_bench_batch(tiny):
    for what in ("train", "inference"):
        task, batch = bench_batch("pk", what, 32, 2)
        model = Model(model_config("lmm", DEFAULT, task.vocab_size, "reference"))
        logits = model.apply(model.init(np.random.default_rng(0)), batch.inputs)
        expected = naive_cross_entropy(logits, batch.targets, batch.mask)
        assert _rows(tiny, "LMM", what)["reference"]["loss"] == pytest.approx(expected,
                                                                             rel=1e-12)


def test_the_bench_table_shows_the_model_rows(tiny):
    result = dict(machine=dict(cpu="x", cores=2, python="3", numpy="2", numba="0",
                               load_average_start_end=[0.1, 0.2]),
                  peak_gflops=dict(float32=100.0, float64=50.0), rows=[], models=tiny)
    result["goals"] = goals(result)
    table = format_table(result)
    speedup = _rows(tiny, "LMM", "train")["numba"]["speedup"]
    assert "| LMM | train | 32 | numba | " in table
    assert f"| {speedup:.1f}x |" in table
    assert "| Gated DeltaNet | train | 32 | numba |" in table
    assert "| SWA | inference | 32 | reference |" in table
    assert "no numba path |" in table


@pytest.mark.parametrize("changes, match", [
    (dict(cases=(("lmm", "fly", 32),)), "what"),
    (dict(cases=(("rnn", "train", 32),)), "model"),
    (dict(cases=(("lmm", "train", 0),)), "length"),
    (dict(batch_size=0), "batch_size"),
    (dict(task="qa"), "task"),
])
def test_bad_model_bench_settings_name_the_field(changes, match):
    with pytest.raises(ValueError, match=match):
        ModelBenchSettings(**changes)


def test_cases_must_be_tuples_of_three():
    with pytest.raises(TypeError, match="cases"):
        ModelBenchSettings(cases=[("lmm", "train", 32)])
    with pytest.raises(TypeError, match="case"):
        ModelBenchSettings(cases=(("lmm", "train"),))
    with pytest.raises(TypeError, match="settings must be a ModelBenchSettings"):
        run_model_bench("quick")


def test_run_bench_refuses_model_settings_of_another_type_before_any_work():
    from minititans.bench import run_bench

    with pytest.raises(TypeError, match="models must be a ModelBenchSettings"):
        run_bench(quick=True, models=("lmm", "train", 512))


def test_bench_help_names_the_models_key_and_its_row_fields(capsys):
    from minititans.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert 'the model rows under "models"' in text
    assert '"tokens_per_s", "seconds", "runs", "loss", "speedup"' in text
