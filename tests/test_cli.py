"""The command line: `minititans recall` / `demo` part 1, `--help`, bad arguments."""

import json

import pytest

from minititans.cli import main
from minititans.experiments.recall import LEAST_SQUARES, format_recall_table, recall_experiment


def test_recall_demo_writes_plot_and_results(tmp_path, capsys):
    assert main(["recall", "--out", str(tmp_path), "--sizes", "4", "32", "--passes", "1",
                 "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "delta rule" in printed and "N=32" in printed
    assert (tmp_path / "recall.png").stat().st_size > 10_000
    result = json.loads((tmp_path / "results.json").read_text())["recall"]
    assert result["d"] == 16 and result["sizes"] == [4, 32]
    errors = {(r["memory"], r["n_pairs"]): r["error"] for r in result["rows"]}
    # a matrix memory holds a few pairs well and runs out of room past the key width d = 16
    assert errors[("delta rule", 4)] < 0.2
    assert errors[("delta rule", 32)] > 0.8
    # linear attention has no erasing: past d its cross-talk exceeds an empty memory's error
    assert errors[("linear attention", 32)] > 1.0


def test_results_json_keeps_other_keys(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps({"needle": {"window": 8}}))
    main(["recall", "--out", str(tmp_path), "--sizes", "4", "--passes", "1", "--quiet"])
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["needle"] == {"window": 8} and "recall" in results


def test_recall_is_reproducible_by_seed():
    a = recall_experiment(d=8, sizes=(4, 8), passes=(1,), seed=3, progress=False)
    b = recall_experiment(d=8, sizes=(4, 8), passes=(1,), seed=3, progress=False)
    assert a == b
    assert "Titans deep" in format_recall_table(a)


def test_deep_memory_beats_every_matrix_past_capacity_with_repeated_writes():
    # the claim of the demo's second table: at N = 2d pairs written 16 times, the 2-layer
    # memory recalls better than the best any matrix can do (the least-squares optimum)
    res = recall_experiment(d=16, sizes=(32,), passes=(16,), progress=False)
    err = {r["memory"]: r["error"] for r in res["rows"]}
    assert 0.4 < err[LEAST_SQUARES] < 0.6  # ≈ (N - d) / N for random pairs
    for matrix in ("linear attention", "delta rule", "Titans linear"):
        assert err[matrix] >= err[LEAST_SQUARES] - 1e-9
    assert err["Titans deep"] < 0.75 * err[LEAST_SQUARES]


@pytest.mark.parametrize("cmd", [["--help"], ["demo", "--help"], ["recall", "--help"]])
def test_help_explains(cmd, capsys):
    with pytest.raises(SystemExit) as info:
        main(cmd)
    assert info.value.code == 0
    assert "usage: minititans" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["recall", "--d", "0"], ["recall", "--sizes", "-3"],
                                  ["recall", "--passes", "0"], ["nonsense"]])
def test_bad_arguments_exit_with_a_message(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "error" in capsys.readouterr().err


def test_train_command_defaults_are_train_configs():
    """One source of truth: the optimiser defaults of ``minititans train`` are TrainConfig's."""
    from minititans.cli import TRAIN_DEFAULTS
    from minititans.training import TrainConfig

    for name in ("steps", "batch_size", "lr", "warmup"):
        assert TRAIN_DEFAULTS[name] == getattr(TrainConfig(), name), name


def test_every_option_of_every_command_states_its_default(capsys):
    """``--help`` says the default of every option that has one."""
    from minititans.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    missing = []
    for name, p in sub.choices.items():
        for action in p._actions:
            if (action.option_strings and action.default not in (None, False)
                    and action.help and "default" not in action.help.lower()
                    and action.dest != "help"):
                missing.append(f"{name} {action.option_strings[-1]}")
    assert not missing, missing
