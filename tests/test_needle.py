"""The needle experiment (Titans Table 2 in miniature): its output contract, its seeds, its CLI."""

import json
from dataclasses import replace

import numpy as np
import pytest

from minititans.experiments import needle as nd
from minititans.models import Model
from minititans.tasks import Batch
from minititans.training import TrainConfig, batch_for_step, init_state

TINY = nd.NeedleSettings(
    tasks=nd.TASKS, models=("swa", "ttt_linear"), seeds=(0, 1), window=6,
    train_multiples=(3,), eval_multiples=(3, 4), eval_samples=3, min_eval_samples=1,
    model=dict(d_model=8, num_heads=1, memory_depth=1, chunk_size=3),
    train=dict(steps=1, batch_size=2, lr=1e-2, warmup=1), backend="reference")
CHANCE = {"pk": 0.1, "n": 0.001, "w": 16.0 ** -4, "babilong": 1 / 6}


def test_needle_results_follow_the_contract_one_row_per_task_model_length_seed(tmp_path,
                                                                                capsys):
    result = nd.run_needle_experiment(TINY, tmp_path, progress=False, workers=1)
    assert set(result) == {"window", "train_length", "rows"}
    assert result["window"] == 6 and result["train_length"] == 18
    rows = result["rows"]
    assert len(rows) == 4 * 2 * 2 * 2  # tasks x models x lengths x seeds
    assert all(set(r) == {"task", "model", "length", "seed", "accuracy", "chance"} for r in rows)
    cells = {(r["task"], r["model"], r["length"], r["seed"]) for r in rows}
    assert cells == {(t, m, n, s) for t in ("pk", "n", "w", "babilong")
                     for m in ("SWA", "TTT-Linear-style") for n in (18, 24)
                     for s in (0, 1)}
    for r in rows:
        assert isinstance(r["accuracy"], float) and 0.0 <= r["accuracy"] <= 1.0
        assert r["chance"] == pytest.approx(CHANCE[r["task"]], rel=1e-12)
        assert isinstance(r["length"], int) and isinstance(r["seed"], int)
    on_disk = json.loads((tmp_path / "results.json").read_text())["needle"]
    assert on_disk == result and (tmp_path / "needle.png").stat().st_size > 10_000
    table = capsys.readouterr().out
    assert "S-NIAH-W" in table and "BABILong" in table and "over 2 seeds" in table


def test_w_is_evaluated_only_at_lengths_its_needle_fits_in():
    # W's needle (key, 4 symbols, the question and the answer) needs 4 * 4 + 2 = 18 tokens:
    # with the 16-token window it has no 1w row; the other tasks have all five
    assert nd.DEFAULT.eval_lengths("w") == (64, 256, 1024, 4096)
    for task in ("pk", "n", "babilong"):
        assert nd.DEFAULT.eval_lengths(task) == (16, 64, 256, 1024, 4096)
    s = nd.NeedleSettings(tasks=("pk", "w"), models=("swa",), seeds=(0,), window=4,
                          train_multiples=(5,), eval_multiples=(4, 5), eval_samples=2,
                          min_eval_samples=1, model=TINY.model, train=TINY.train,
                          backend="reference")
    rows = nd.needle_experiment(s, progress=False, workers=1)[0]["rows"]
    assert sorted((r["task"], r["length"]) for r in rows) == [("pk", 16), ("pk", 20),
                                                              ("w", 20)]
    with pytest.raises(ValueError, match="eval_multiples"):
        nd.NeedleSettings(tasks=("w",), eval_multiples=(1,))
    with pytest.raises(ValueError, match="train_multiples"):
        nd.NeedleSettings(tasks=("w",), train_multiples=(1, 2))


def test_needle_row_is_the_accuracy_on_the_evaluation_stream_of_its_seed():
    # recompute one cell by hand: train with TrainConfig.seed, evaluate on eval_rng(seed, n)
    s = nd.NeedleSettings(tasks=("pk",), models=("lmm",), seeds=(1,), window=6,
                          train_multiples=(3,), eval_multiples=(3,), eval_samples=5,
                          min_eval_samples=1, model=TINY.model, train=TINY.train,
                          backend="reference")
    (row,) = nd.needle_experiment(s, progress=False, workers=1)[0]["rows"]
    from minititans.tasks import MixedLengths
    from minititans.training import train

    task = MixedLengths((nd.make_task("pk", 18, "anywhere"),))
    model = Model(nd.model_config("lmm", s, task.vocab_size, "reference"))
    params, _, _ = train(model, task, TrainConfig(seed=1, **s.train), progress=False)
    rng = nd.eval_rng(1, 18)
    right = 0
    for _ in range(5):
        b = nd.make_task("pk", 18).sample(rng, 1)
        pred = np.argmax(model.apply(params, b.inputs), axis=-1)
        right += bool(np.all((pred == b.targets)[b.mask]))
    assert row["accuracy"] == pytest.approx(right / 5, abs=1e-12)


def _fingerprint(rng):
    return tuple(rng.integers(2**62, size=4).tolist())


def test_evaluation_streams_are_disjoint_from_every_training_stream():
    seeds, steps, lengths = range(5), range(400), [16 * m for m in (1, 4, 16, 64, 256, 1024)]
    cfg = TrainConfig(steps=400)
    training = {_fingerprint(np.random.default_rng([s, i])) for s in seeds for i in steps}
    training |= {_fingerprint(np.random.default_rng(s)) for s in seeds}  # initial params
    evaluation = {_fingerprint(nd.eval_rng(s, n)) for s in seeds for n in lengths}
    assert len(evaluation) == 5 * 6 and not (evaluation & training)
    # the trap this avoids: an integer seed s *is* the training stream of step 0
    assert _fingerprint(np.random.default_rng(3)) == _fingerprint(np.random.default_rng([3, 0]))
    task = nd.make_task("pk", 32, "anywhere")
    a = batch_for_step(task, TrainConfig(seed=3, steps=1), 0).inputs
    b = task.sample(np.random.default_rng(3), cfg.batch_size).inputs
    np.testing.assert_array_equal(a, b)


def test_swa_answer_logits_depend_only_on_its_receptive_field():
    s = nd.NeedleSettings(tasks=("pk",), window=6,
                          model=dict(d_model=8, num_heads=2, num_layers=2))
    cfg = nd.model_config("swa", s, 32, "reference")
    model = Model(cfg)
    params = model.init(np.random.default_rng(0))
    batch = nd.make_task("n", 80).sample(np.random.default_rng(1), 3)
    short = nd.answer_inputs(batch, cfg)
    rf = nd.receptive_field(cfg)
    assert rf == 2 * (5 + 3) and short.inputs.shape == (3, 3 + rf)
    full = model.apply(params, batch.inputs)[batch.mask]
    np.testing.assert_allclose(model.apply(params, short.inputs)[short.mask], full,
                               rtol=0, atol=1e-12)
    # one token fewer and the first answer logit changes: the field is not larger than needed
    first = int(np.argmax(batch.mask[0]))
    cut = Batch(batch.inputs[:, first - rf + 1:], batch.targets[:, first - rf + 1:],
                batch.mask[:, first - rf + 1:])
    assert np.abs(model.apply(params, cut.inputs)[cut.mask] - full).max() > 1e-6
    assert nd.receptive_field(nd.model_config("mag", s, 32, "reference")) is None


def test_ttt_linear_style_is_the_lmm_with_plain_gradient_steps():
    cfg = nd.model_config("ttt_linear", nd.DEFAULT, 32, "reference")
    assert (cfg.model, cfg.memory_depth, cfg.momentum, cfg.forgetting) == ("lmm", 1, False,
                                                                            False)
    assert init_state(Model(cfg), TrainConfig()).params.size > 0


def test_lmm_deep_is_the_lmm_with_a_two_layer_anchored_memory_clipped_and_its_recipe():
    lmm = nd.model_config("lmm", nd.DEFAULT, 32, "reference")
    deep = nd.model_config("lmm_deep", nd.DEFAULT, 32, "reference")
    assert (deep.model, deep.memory_depth, deep.max_grad_norm) == ("lmm", 2, 1.0)
    # every other field is the LMM's: the same chunking, gates and sizes
    assert deep == lmm.with_(memory_depth=2, max_grad_norm=1.0, anchored_memory=True)
    assert lmm.memory_depth == 1 and lmm.chunk_size == 1 and not lmm.anchored_memory
    lmm_train = nd.train_config("lmm", nd.DEFAULT, 3)
    # the same training as the LMM (600 steps, the recipe chosen on validation seeds), so
    # depth 2 against depth 1 is like for like; the demo's cut trains half as long
    assert nd.train_config("lmm_deep", nd.DEFAULT, 3) == lmm_train
    assert lmm_train.steps == 600 and nd.train_config("lmm", nd.DEMO, 3).steps == 300
    assert lmm.alpha_init == 1e-5 and nd.model_config("lmm", nd.DEMO, 32, "reference") == lmm
    # selectable, but not in the default table, and its rows keep a name of their own
    assert "lmm_deep" not in nd.DEFAULT.models and "lmm_deep" in nd.CHOICES
    assert nd.NAMES["lmm_deep"] == "LMM (L_M = 2)" and nd.NAMES["lmm"] == "LMM"
    params = init_state(Model(deep), TrainConfig()).params
    shallow = init_state(Model(lmm), TrainConfig()).params
    assert params.size > shallow.size  # the second memory layer's weights


def _main(argv):
    from minititans.cli import main

    return main(argv)


@pytest.mark.parametrize("argv, flag", [
    (["--tasks", "pk", "qa2"], "--tasks"),
    (["--models", "lmm", "mamba"], "--models"),
    (["--seeds", "-1"], "--seeds"),
    (["--seeds", "0", "0"], "--seeds"),
    (["--seeds", "one"], "--seeds"),
    (["--lengths", "0", "4"], "--lengths"),
    (["--lengths", "4", "4"], "--lengths"),
    (["--tasks", "pk", "pk"], "--tasks"),
    (["--steps", "0"], "--steps"),
    (["--tasks", "w", "--lengths", "1"], "--lengths"),
    (["--train-lengths", "0", "8"], "--train-lengths"),
    (["--train-lengths", "8", "8"], "--train-lengths"),
    (["--config", "alpha_innit=0.01"], "--config"),          # unknown field
    (["--config", "window=8"], "--config"),                  # the experiment's own
    (["--config", "alpha_init=2.0"], "--config"),            # a value ModelConfig refuses
    (["--config", "alpha_init"], "--config"),                # not key=value
])
def test_needle_cli_bad_flags_are_usage_errors_before_any_training(argv, flag, monkeypatch,
                                                                   capsys):
    def boom(*a, **k):
        raise AssertionError("training started")

    monkeypatch.setattr(nd, "needle_experiment", boom)
    with pytest.raises(SystemExit) as e:
        _main(["needle", *argv])
    assert e.value.code == 2
    assert flag in capsys.readouterr().err


def test_needle_cli_flags_become_the_settings(monkeypatch):
    seen = {}

    def fake(settings, *a, **k):
        seen["s"] = settings
        return {"window": settings.window, "train_length": settings.train_length, "rows": []}, {}

    monkeypatch.setattr(nd, "run_needle_experiment", lambda s, *a, **k: fake(s)[0])
    assert _main(["needle", "--tasks", "babilong", "w", "--models", "mal", "gated_delta",
                  "--seeds", "7", "9", "--lengths", "2", "8", "--steps", "5", "--quiet"]) == 0
    s = seen["s"]
    assert (s.tasks, s.models, s.seeds, s.eval_multiples) == (("babilong", "w"),
                                                              ("mal", "gated_delta"), (7, 9),
                                                              (2, 8))
    assert s.train["steps"] == 5 and "steps" not in s.train_overrides["mac"]
    _main(["needle", "--tasks", "pk", "--models", "lmm_deep", "lmm", "--quiet"])
    assert seen["s"].models == ("lmm_deep", "lmm") and seen["s"].tasks == ("pk",)
    _main(["needle", "--full", "--quiet"])
    assert seen["s"].eval_multiples == (1, 4, 16, 64, 256, 1024) and len(seen["s"].seeds) == 5
    # the length-generalisation ablation's flags: training lengths and model fields
    _main(["needle", "--tasks", "pk", "--models", "lmm", "--train-lengths", "32",
           "--config", "alpha_init=0.01,anchored_memory=true", "--quiet"])
    expected = replace(nd.DEFAULT, tasks=("pk",), models=("lmm",), train_multiples=(32,),
                       model={**nd.DEFAULT.model, "alpha_init": 0.01, "anchored_memory": True})
    assert seen["s"] == expected


def test_demo_seed_seeds_part_two(monkeypatch):
    seen = {}
    monkeypatch.setattr(nd, "run_needle_experiment",
                        lambda s, *a, **k: seen.setdefault("s", s))
    assert _main(["demo", "--seed", "4", "--d", "4", "--sizes", "2", "--passes", "1",
                  "--quiet"]) == 0
    s = seen["s"]
    assert s.seeds == (4, 5, 6) and s.tasks == ("pk",) and s.eval_multiples == (1, 4, 16, 64)
    assert s.models == ("swa", "lmm", "mac", "mag", "mal")
    with pytest.raises(SystemExit) as e:
        _main(["demo", "--seed", "-1"])
    assert e.value.code == 2


_STARTED = []


def _record_start(job):
    _STARTED.append(job)
    return job * 10


@pytest.mark.parametrize("workers", [1, 2])
def test_run_jobs_starts_the_costly_jobs_first_and_returns_results_in_job_order(workers):
    from minititans.experiments.pool import run_jobs

    jobs = [3, 1, 4, 1, 5, 9, 2, 6]
    _STARTED.clear()
    out = run_jobs(_record_start, jobs, desc="t", progress=False, workers=workers,
                   cost=lambda j: j)
    assert out == [j * 10 for j in jobs]
    if workers == 1:  # in-process: the start order is visible
        assert _STARTED == sorted(jobs, reverse=True)
    # the needle experiment's costs put MAC first and SWA last
    order = sorted(nd.MODELS, key=lambda m: -nd.RELATIVE_COST[m])
    assert set(nd.RELATIVE_COST) == set(nd.CHOICES)
    assert order[-1] == "swa" and nd.RELATIVE_COST["mac"] > nd.RELATIVE_COST["lmm"]


def _blas_threads(_):
    from threadpoolctl import threadpool_info

    return sorted({pool["num_threads"] for pool in threadpool_info()
                   if pool["user_api"] == "blas"})


@pytest.mark.parametrize("workers", [1, 2])
def test_run_jobs_runs_every_job_on_one_blas_thread(workers):
    from minititans.experiments.pool import run_jobs

    assert run_jobs(_blas_threads, [0, 1], desc="t", progress=False,
                    workers=workers) == [[1], [1]]


def _numba_threads(_):
    import numba

    return numba.get_num_threads()


def test_run_jobs_workers_run_numba_on_one_thread():
    from minititans.experiments.pool import run_jobs

    assert run_jobs(_numba_threads, [0, 1], desc="t", progress=False, workers=2) == [1, 1]


def test_needle_saves_each_run_at_once_and_a_rerun_continues_where_it_stopped(tmp_path,
                                                                              monkeypatch,
                                                                              capsys):
    settings = replace(TINY, tasks=("pk", "n"))
    whole = nd.needle_experiment(settings, progress=False, workers=1)[0]
    real, calls = nd._run_one, []

    def interrupted(job):  # Ctrl-C during the third run
        calls.append(job[:3])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(job)

    monkeypatch.setattr(nd, "_run_one", interrupted)
    with pytest.raises(KeyboardInterrupt):
        nd.run_needle_experiment(settings, tmp_path, progress=False, workers=1, keep_runs=True)
    runs = tmp_path / nd.RUNS_DIR
    assert sorted(p.name for p in runs.iterdir()) == sorted(
        f"{t}-{m}-seed{s}.json" for t, m, s in calls[:2])
    # the rerun trains only the runs that are not saved, and its table is the whole one's
    calls.clear()
    monkeypatch.setattr(nd, "_run_one", lambda job: calls.append(job[:3]) or real(job))
    result = nd.run_needle_experiment(settings, tmp_path, progress=False, workers=1,
                                      keep_runs=True)
    assert result == whole and len(calls) == 8 - 2
    assert "2 of 8 runs read from" in capsys.readouterr().out
    assert len(list(runs.iterdir())) == 8
    # everything saved: nothing is trained again
    calls.clear()
    assert nd.run_needle_experiment(settings, tmp_path, progress=False, workers=1,
                                    keep_runs=True) == whole
    assert calls == []
    # a damaged file is said and run again; so is every run after the code changes, or
    # with another setting, and every run with fresh
    (runs / "n-swa-seed1.json").write_text("{ truncated")
    nd.run_needle_experiment(settings, tmp_path, progress=False, workers=1, keep_runs=True)
    assert calls == [("n", "swa", 1)] and "is not a saved run" in capsys.readouterr().err
    for changed, kwargs in ((settings, {"fresh": True}),
                            (replace(settings, eval_samples=2), {})):
        calls.clear()
        nd.run_needle_experiment(changed, tmp_path, progress=False, workers=1,
                                 keep_runs=True, **kwargs)
        assert len(calls) == 8
    calls.clear()
    monkeypatch.setattr(nd, "source_digest", lambda: "other code")
    nd.run_needle_experiment(changed, tmp_path, progress=False, workers=1, keep_runs=True)
    assert len(calls) == 8 and "other settings or code" in capsys.readouterr().err


def test_run_jobs_reports_each_result_as_it_finishes():
    from minititans.experiments.pool import run_jobs

    for workers in (1, 2):
        seen = {}
        out = run_jobs(_record_start, [1, 2, 3], desc="t", progress=False, workers=workers,
                       on_result=seen.__setitem__)
        assert out == [10, 20, 30] and seen == {0: 10, 1: 20, 2: 30}


def test_needle_cli_keeps_runs_under_out_and_fresh_trains_them_again(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(nd, "run_needle_experiment",
                        lambda s, out, **k: seen.append((out, k["keep_runs"], k["fresh"])))
    _main(["needle", "--tasks", "pk", "--out", str(tmp_path), "--quiet"])
    _main(["needle", "--tasks", "pk", "--out", str(tmp_path), "--fresh", "--quiet"])
    assert [(str(o), keep, fresh) for o, keep, fresh in seen] == [
        (str(tmp_path), True, False), (str(tmp_path), True, True)]
