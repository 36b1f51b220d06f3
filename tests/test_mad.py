"""MAD-mini: the six MAD task generators and the `minititans mad` experiment.

Each task has a hand-checked tiny instance, a naive solver written here that reads the
answer off the input (so the answer is recoverable and the mask is exactly the positions
that can be answered), and seeded determinism. The experiment runs once on a tiny setting.
"""

import json
import math

import numpy as np
import pytest

from minititans.cli import main
from minititans.experiments.mad import (
    PUBLISHED,
    MadSettings,
    _mad_job,
    format_mad_table,
    mad_experiment,
    rankings,
)
from minititans.models import (
    DISPLAY_NAMES,
    AutoEncoder,
    Model,
    ModelConfig,
    model_for,
    position_code,
)
from minititans.tasks import (
    FACTORIES,
    CompressionTask,
    FuzzyInContextRecallTask,
    InContextRecallTask,
    MemorizationTask,
    NoisyInContextRecallTask,
    SelectiveCopyingTask,
    make_task,
)
from minititans.training import TrainConfig, evaluate, train

CONTRACT = ("in_context_recall", "fuzzy_in_context_recall", "noisy_in_context_recall",
            "selective_copying", "compression", "memorization")


def one(task, seed=0):
    b = task.sample(np.random.default_rng(seed), 1)
    return b.inputs[0].tolist(), b.targets[0].tolist(), b.mask[0].astype(int).tolist()


# --- hand-checked tiny instances (seed 0) ---------------------------------------------------


def test_in_context_recall_tiny_instance_by_hand():
    # keys 0-2, values 3-5; pairs (1 4) (0 3) (0 3) (0 3) (0 3): key 0 is asked from its
    # second pair on (positions 4, 6, 8 predict 3); the last target is a dummy
    x, y, m = one(InContextRecallTask(vocab_size=6, length=10))
    assert x == [1, 4, 0, 3, 0, 3, 0, 3, 0, 3]
    assert m == [0, 0, 0, 0, 1, 0, 1, 0, 1, 0]
    assert [t for t, k in zip(y, m) if k] == [3, 3, 3]


def test_noisy_in_context_recall_tiny_instance_by_hand():
    # keys 0-1, values 2-3, noise 4-7: two noise pairs (6 5) (4 4), then (1 3) three times
    x, y, m = one(NoisyInContextRecallTask(vocab_size=8, noise_vocab_size=4, frac_noise=0.5,
                                           length=10))
    assert x == [6, 5, 4, 4, 1, 3, 1, 3, 1, 3]
    assert m == [0, 0, 0, 0, 0, 0, 1, 0, 1, 0]
    assert [t for t, k in zip(y, m) if k] == [3, 3]


def test_fuzzy_in_context_recall_tiny_instance_by_hand():
    # pad 6, keys 0-2, values 3-5: the planted pair (2 1 -> 3) and its final query
    x, y, m = one(FuzzyInContextRecallTask(vocab_size=7, length=12, motif_size=2))
    assert x == [6] * 7 + [2, 1, 3, 2, 1]
    assert m == [0] * 11 + [1]
    assert y[-1] == 3


def test_selective_copying_tiny_instance_by_hand():
    # content 0-2, BLANK 3, COPY 4: tokens 2 1 1 among blanks, then COPY and three blanks
    x, y, m = one(SelectiveCopyingTask(vocab_size=5, length=10, num_tokens=3))
    assert x == [2, 1, 3, 3, 1, 3, 4, 3, 3, 3]
    assert m == [0] * 7 + [1, 1, 1]
    assert y[7:] == [2, 1, 1]


def test_compression_tiny_instance_by_hand():
    x, y, m = one(CompressionTask(vocab_size=4, length=6))
    assert x == [2, 1, 1, 0, 0, 3] and y == x  # COMPRESS = 3 at the end
    assert m == [1, 1, 1, 1, 1, 0]


def test_memorization_tiny_instance_by_hand():
    # keys 0-2, values 3-5, INSERT 6; the fixed map of seed 12345 is 0->3, 1->5, 2->4
    task = MemorizationTask(vocab_size=7, length=6)
    assert task.kv_map.tolist() == [3, 5, 4]
    x, y, m = one(task)
    assert x == [2, 6, 1, 6, 1, 6]
    assert m == [0, 1, 0, 1, 0, 1]
    assert [t for t, k in zip(y, m) if k] == [4, 5, 5]


# --- naive solvers: the answer is recoverable from the input -------------------------------


def solve_recall(x, num_keys):
    """Walk the pairs; a key seen before is answered with its stored value."""
    answers, kv = {}, {}
    for t in range(0, len(x) - 1, 2):
        k, v = x[t], x[t + 1]
        if k >= 2 * num_keys:  # a noise pair
            continue
        if k in kv:
            answers[t] = kv[k]
        kv[k] = v
    return answers


@pytest.mark.parametrize("task", [InContextRecallTask(length=64),
                                  NoisyInContextRecallTask(length=64),
                                  NoisyInContextRecallTask(length=32, frac_noise=0.8)])
def test_recall_answers_are_the_stored_values(task):
    b = task.sample(np.random.default_rng(3), 64)
    assert b.inputs.shape == (64, task.length)
    for x, y, m in zip(b.inputs.tolist(), b.targets.tolist(), b.mask):
        answers = solve_recall(x, task.num_keys)
        assert sorted(answers) == np.flatnonzero(m).tolist()
        assert all(y[t] == v for t, v in answers.items())
        assert x[-2] < task.num_keys and m[-2]  # the final pair is always a query
        np.testing.assert_array_equal(x[1:], y[:-1])  # next-token data


def runs(x, split):
    """Maximal runs of tokens below / at or above ``split``: (start, tokens, is_key)."""
    out, start = [], 0
    for t in range(1, len(x) + 1):
        if t == len(x) or (x[t] < split) != (x[start] < split):
            out.append((start, x[start:t], x[start] < split))
            start = t
    return out


@pytest.mark.parametrize("fixed", [False, True])
def test_fuzzy_recall_answers_are_recoverable_by_vocabulary_runs(fixed):
    # keys and values come from disjoint vocabularies, so a key run then a value run is a pair
    task = FuzzyInContextRecallTask(length=64, fixed_keys=fixed)
    b = task.sample(np.random.default_rng(4), 48)
    for x, y, m in zip(b.inputs.tolist(), b.targets.tolist(), b.mask):
        s = x + [y[-1]]  # the whole sequence
        body = [t for t in s if t != task.pad]
        pieces = runs(body, task.num_keys)
        offset = len(s) - len(body)
        assert len(pieces) % 2 == 0 and all(p[2] for p in pieces[0::2])
        expect, kv = set(), {}
        for (_, key, _), (start, value, _) in zip(pieces[0::2], pieces[1::2]):
            assert 1 <= len(key) <= 3 and 1 <= len(value) <= 3
            assert len(set(key)) == len(key) and len(set(value)) == len(value)  # motifs
            if fixed:
                assert len(key) == 3
            if tuple(key) in kv:
                assert kv[tuple(key)] == value  # one value per key within a sequence
                expect |= {offset + start + i - 1 for i in range(len(value))}
            kv[tuple(key)] = value
        assert sorted(expect) == np.flatnonzero(m).tolist()
        assert m[-1]  # the final query is always answerable
        np.testing.assert_array_equal(x[1:], y[:-1])


def test_selective_copying_answers_are_the_non_blank_tokens_in_order():
    task = SelectiveCopyingTask(length=48, num_tokens=8)
    b = task.sample(np.random.default_rng(5), 32)
    for x, y, m in zip(b.inputs, b.targets, b.mask):
        copy_at = int(np.flatnonzero(x == task.copy)[0])
        before = x[:copy_at]
        content = before[before != task.blank]
        assert copy_at == 48 - 8 - 1 and np.all(x[copy_at + 1:] == task.blank)
        np.testing.assert_array_equal(y[m], content)
        assert np.flatnonzero(m).tolist() == list(range(40, 48))


def test_compression_targets_are_the_inputs_before_the_compress_token():
    task = CompressionTask()
    b = task.sample(np.random.default_rng(6), 16)
    assert np.all(b.inputs[:, -1] == task.compress) and not b.mask[:, -1].any()
    np.testing.assert_array_equal(b.targets[b.mask], b.inputs[b.mask])
    assert b.inputs[:, :-1].max() < task.compress


def test_memorization_map_is_fixed_injective_and_absent_from_the_input():
    task = MemorizationTask()
    kv = task.kv_map
    assert len(kv) == 127 and len(set(kv.tolist())) == 127  # injective
    assert kv.min() >= 127 and kv.max() < 255
    for seed in (7, 8):
        b = task.sample(np.random.default_rng(seed), 16)
        np.testing.assert_array_equal(b.targets[:, 1::2], kv[b.inputs[:, 0::2]])
        assert not np.isin(b.inputs, kv).any()  # nothing to recall in context
    assert not np.array_equal(MemorizationTask(map_seed=1).kv_map, kv)


# --- determinism, registry, bad input ---------------------------------------------------------


@pytest.mark.parametrize("name", CONTRACT)
def test_mad_tasks_are_reproducible_by_seed(name):
    task = make_task(name, 64)
    a = task.sample(np.random.default_rng(11), 4)
    b = task.sample(np.random.default_rng(11), 4)
    c = task.sample(np.random.default_rng(12), 4)
    for f in ("inputs", "targets", "mask"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    assert not np.array_equal(a.inputs, c.inputs)
    assert a.inputs.shape == (4, 64) and a.inputs.max() < task.vocab_size
    assert task.metric == "token" and 0 < task.chance < 1


def test_registered_under_the_contract_names_with_mads_settings():
    assert set(CONTRACT) <= set(FACTORIES)
    assert make_task("in_context_recall", 128).chance == pytest.approx(1 / 8)
    assert make_task("noisy_in_context_recall", 128).vocab_size == 32
    assert make_task("memorization", 32).chance == pytest.approx(1 / 128)
    assert make_task("selective_copying", 256).chance == pytest.approx(1 / 14)


@pytest.mark.parametrize("make, match", [
    (lambda: InContextRecallTask(length=9), "length must be even"),
    (lambda: InContextRecallTask(frac_noise=0.3), "noise_vocab_size"),
    (lambda: NoisyInContextRecallTask(frac_noise=1.0), "frac_noise"),
    (lambda: SelectiveCopyingTask(length=20, num_tokens=16), "length"),
    (lambda: FuzzyInContextRecallTask(length=10), "length"),
    (lambda: MemorizationTask(length=7), "length must be even"),
])
def test_bad_task_settings_name_the_argument(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# --- the compression bottleneck --------------------------------------------------------------


def test_position_code_is_the_sinusoid():
    code = position_code(5, 6)
    for t in range(5):
        for i in range(3):
            angle = t / 10_000 ** (2 * i / 6)
            assert code[t, 2 * i] == pytest.approx(math.sin(angle), abs=1e-12)
            assert code[t, 2 * i + 1] == pytest.approx(math.cos(angle), abs=1e-12)


def test_autoencoder_sees_the_sequence_only_through_the_last_position():
    # two sequences that end alike but differ before: with a one-block SWA of window 1
    # and no conv, the last position sees only itself, so the decoder cannot tell them apart
    cfg = ModelConfig(model="swa", vocab_size=6, d_model=8, num_layers=1, window=1,
                      conv_kernel=0)
    ae = AutoEncoder(cfg)
    params = ae.init(np.random.default_rng(0))
    a = ae.apply(params, np.array([[0, 1, 2, 5]]))
    b = ae.apply(params, np.array([[4, 3, 3, 5]]))
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)
    c = AutoEncoder(cfg.with_(window=4)).apply(params, np.array([[4, 3, 3, 5]]))
    assert np.abs(a - c).max() > 1e-3  # a wider window lets the earlier tokens in


def test_autoencoder_is_what_compression_gets_and_reads_whole_sequences_only():
    cfg = ModelConfig(model="lmm", vocab_size=6, d_model=8, num_heads=2, memory_depth=1)
    ae = model_for(cfg, CompressionTask(vocab_size=6, length=5))
    assert type(ae) is AutoEncoder and ae.backbone == "autoencoder"
    assert type(model_for(cfg, InContextRecallTask())) is Model
    params = ae.init(np.random.default_rng(0))
    one = ae.apply(params, np.array([1, 2, 0, 5]))
    np.testing.assert_array_equal(one, ae.apply(params, np.array([[1, 2, 0, 5]]))[0])
    with pytest.raises(ValueError, match="tokens must be in"):
        ae.apply(params, np.array([[1, 9]]))
    with pytest.raises(TypeError, match="decoder"):
        ae.apply(Model(cfg).init(np.random.default_rng(0)), np.array([[1, 2]]))
    for call in (lambda: ae.initial_state(1), lambda: ae.stream(params, np.array([1]), None),
                 lambda: ae.generate(params, np.array([1]), 2, np.random.default_rng(0))):
        with pytest.raises(TypeError, match="whole sequence"):
            call()


# --- the experiment -------------------------------------------------------------------------

TINY = MadSettings(models=("transformer", "lmm"), tasks=("in_context_recall", "compression"),
                   seeds=(0,), lrs=(3e-3, 3e-2),
                   task_sizes={"in_context_recall": dict(vocab_size=8, length=8),
                               "compression": dict(vocab_size=6, length=6)},
                   d_model={"transformer": 8, "lmm": 8},
                   train=dict(steps=3, batch_size=2, warmup=1), val_samples=4,
                   eval_samples=6, backend="reference")


@pytest.fixture(scope="module")
def tiny_result():
    return mad_experiment(TINY, progress=False, workers=1)


def test_mad_rows_follow_the_output_contract(tiny_result):
    result, timing = tiny_result
    assert len(result["rows"]) == 2 * 2 * 1
    for r in result["rows"]:
        assert set(r) == {"task", "model", "seed", "lr", "accuracy"}
        assert r["task"] in CONTRACT and r["model"] in DISPLAY_NAMES.values()
        assert type(r["seed"]) is int and type(r["lr"]) is float
        assert type(r["accuracy"]) is float and 0.0 <= r["accuracy"] <= 1.0
        assert r["lr"] in TINY.lrs
    assert {r["model"] for r in result["rows"]} == {"Transformer", "LMM"}
    assert json.loads(json.dumps(result)) == result  # JSON-ready
    assert timing["jobs"] == 8


def test_mad_best_lr_is_picked_on_validation_and_reported_on_test(tiny_result):
    result, _ = tiny_result
    for r in result["rows"]:
        name = {v: k for k, v in DISPLAY_NAMES.items()}[r["model"]]
        jobs = [_mad_job((name, r["task"], 0, lr, TINY, "reference")) for lr in TINY.lrs]
        best = max(jobs, key=lambda d: (d["val"], -d["val_loss"], -d["lr"]))
        assert r["lr"] == best["lr"]
        assert r["accuracy"] == pytest.approx(best["accuracy"], abs=0)


def test_mad_accuracy_is_the_held_out_evaluation_of_the_trained_model(tiny_result):
    from minititans.experiments.mad import build_model
    from minititans.experiments.mad import make_task as mad_task

    result, _ = tiny_result
    r = next(r for r in result["rows"] if r["model"] == "Transformer"
             and r["task"] == "in_context_recall")
    task = mad_task("in_context_recall", TINY)
    model = build_model("transformer", task, TINY, "reference")
    params, _, _ = train(model, task, TrainConfig(seed=0, lr=r["lr"], **TINY.train),
                         progress=False)
    acc = evaluate(model, params, task, num_samples=6, seed=40_000)["accuracy"]
    assert r["accuracy"] == pytest.approx(acc, abs=1e-12)


def test_mad_parameter_counts_match_within_ten_percent():
    from minititans.experiments.mad import build_model, count_params
    from minititans.experiments.mad import make_task as mad_task

    s = MadSettings()
    task = mad_task("in_context_recall", s)
    counts = {m: count_params(build_model(m, task, s, "reference")) for m in s.models}
    mean = np.mean(list(counts.values()))
    assert all(abs(n / mean - 1) < 0.10 for n in counts.values()), counts


def test_mad_table_shows_seeds_published_rows_and_rankings(tiny_result):
    result, _ = tiny_result
    text = format_mad_table(result)
    assert "Transformer (paper)" in text and "MAD-mini" in text and "not MAD" in text
    assert "49.4" in text  # the published Transformer compression score
    r = rankings(result)
    assert r["compression"]["published"] == ["LMM", "Transformer"]
    rows = {(x["model"], x["task"]): x["accuracy"] for x in result["rows"]}
    a, b = r["compression"]["here"]
    assert rows[(a, "compression")] >= rows[(b, "compression")]
    # one seed: separated exactly when the first is strictly better
    assert r["compression"]["separated"] == (rows[(a, "compression")] > rows[(b, "compression")])
    assert set(PUBLISHED) == {"Transformer", "Gated DeltaNet", "LMM"}


def test_mad_cli_writes_plot_and_results(tmp_path, capsys):
    assert main(["mad", "--quick", "--models", "transformer", "--tasks", "memorization",
                 "--steps", "2", "--backend", "reference", "--workers", "1", "--quiet",
                 "--out", str(tmp_path)]) == 0
    assert "not MAD" in capsys.readouterr().out
    assert (tmp_path / "mad.png").stat().st_size > 10_000
    rows = json.loads((tmp_path / "results.json").read_text())["mad"]["rows"]
    assert [(r["task"], r["model"], r["seed"]) for r in rows] == [
        ("memorization", "Transformer", 0)]


@pytest.mark.parametrize("argv, flag", [
    (["mad", "--seeds", "0"], "--seeds"),
    (["mad", "--models", "rnn"], "--models"),
    (["mad", "--tasks", "copying"], "--tasks"),
    (["mad", "--lrs", "-1"], "--lrs"),
    (["mad", "--steps", "x"], "--steps"),
])
def test_mad_cli_bad_flags_are_usage_errors(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and flag in capsys.readouterr().err


def test_mad_settings_refuse_unknown_models_and_tasks():
    with pytest.raises(ValueError, match="models"):
        MadSettings(models=("rnn",))
    with pytest.raises(ValueError, match="tasks"):
        MadSettings(tasks=())
