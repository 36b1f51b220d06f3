"""The outer loop: cross-entropy, AdamW with clipping, schedule, checkpoints, determinism."""

import numpy as np
import pytest

from minititans.models import Model, ModelConfig, ravel
from minititans.tasks import MQARTask, NeedleTask
from minititans.training import (
    TrainConfig,
    TrainState,
    adamw_step,
    cross_entropy,
    evaluate,
    learning_rate,
    load_checkpoint,
    save_checkpoint,
    train,
)

SMALL = dict(d_model=8, num_heads=2, memory_depth=1, chunk_size=1, window=4, segment_len=4,
             num_persistent=2, ffn_expansion=1)


def small(model="lmm", **changes):
    return Model(ModelConfig(model=model, vocab_size=32, **{**SMALL, **changes}))


def test_cross_entropy_matches_a_plain_loop():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 3, 5))
    targets = rng.integers(0, 5, (2, 3))
    mask = np.array([[True, False, True], [False, False, True]])
    want = []
    for b in range(2):
        for t in range(3):
            if mask[b, t]:
                z = logits[b, t]
                want.append(-(z[targets[b, t]] - np.log(np.sum(np.exp(z)))))
    assert cross_entropy(logits, targets, mask) == pytest.approx(np.mean(want), rel=1e-12)


def test_warmup_then_cosine_schedule():
    cfg = TrainConfig(steps=110, warmup=10, lr=1.0, min_lr_ratio=0.1)
    assert learning_rate(0, cfg) == pytest.approx(0.1)
    assert learning_rate(9, cfg) == pytest.approx(1.0)
    assert learning_rate(60, cfg) == pytest.approx(0.1 + 0.9 * 0.5)
    assert learning_rate(110, cfg) == pytest.approx(0.1)


def test_adamw_step_clips_and_matches_the_formula():
    cfg = TrainConfig(steps=10, warmup=0, lr=0.5, max_grad_norm=1.0, weight_decay=0.1)
    p = np.array([1.0, -2.0])
    g = np.array([3.0, 4.0])  # norm 5 -> clipped to (0.6, 0.8)
    state, norm = adamw_step(TrainState(p, np.zeros(2), np.zeros(2), 0), g, cfg)
    assert norm == pytest.approx(5.0)
    gc = g / 5.0
    m_hat = gc  # first step: bias correction undoes (1 - beta)
    v_hat = gc**2
    want = p - 0.5 * (m_hat / (np.sqrt(v_hat) + cfg.eps) + 0.1 * p)
    np.testing.assert_allclose(state.params, want, rtol=1e-12)
    assert state.step == 1


def test_a_tiny_training_run_lowers_the_loss():
    model = small("swa")
    cfg = TrainConfig(steps=30, batch_size=8, lr=1e-2, warmup=5, seed=0)
    _, _, history = train(model, MQARTask(12, num_keys=8, num_values=4), cfg, progress=False)
    first = np.mean([h["loss"] for h in history[:5]])
    last = np.mean([h["loss"] for h in history[-5:]])
    assert last < first - 0.2


def test_checkpoint_round_trip(tmp_path):
    model = small("mac")
    cfg = TrainConfig(steps=2, batch_size=2, warmup=1)
    params, state, _ = train(model, NeedleTask("pk", 10), cfg, progress=False)
    path = save_checkpoint(tmp_path / "ck.npz", state, model, cfg)
    with np.load(path, allow_pickle=False) as f:
        assert set(f.files) == {"params", "m", "v", "step", "__meta__"}  # configs in __meta__
    state2, model2, cfg2, params2 = load_checkpoint(path)
    assert model2 == model and cfg2 == cfg and state2.step == 2
    for a, b in ((state.params, state2.params), (state.m, state2.m), (state.v, state2.v)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ravel(params)[0], ravel(params2)[0])


def test_resume_from_checkpoint_equals_training_straight_through(tmp_path):
    model = small("lmm")
    task = NeedleTask("pk", 10, "anywhere")
    cfg = TrainConfig(steps=6, batch_size=3, warmup=2, seed=3)
    _, straight, h_straight = train(model, task, cfg, progress=False)
    path = tmp_path / "run.npz"
    _, cut, _ = train(model, task, cfg, checkpoint=path, until=3, progress=False)
    assert cut.step == 3
    _, resumed, h_resumed = train(model, task, cfg, resume=path, progress=False)
    assert resumed.step == 6
    np.testing.assert_array_equal(resumed.params, straight.params)
    np.testing.assert_array_equal(resumed.m, straight.m)
    np.testing.assert_array_equal(resumed.v, straight.v)
    assert [h["loss"] for h in h_resumed] == [h["loss"] for h in h_straight[3:]]


def test_training_is_deterministic_and_evaluate_is_seeded():
    model = small("swa")
    cfg = TrainConfig(steps=3, batch_size=2, warmup=1, seed=5)
    task = NeedleTask("pk", 12)
    p1, s1, _ = train(model, task, cfg, progress=False)
    p2, s2, _ = train(model, task, cfg, progress=False)
    np.testing.assert_array_equal(s1.params, s2.params)
    assert evaluate(model, p1, task, num_samples=8) == evaluate(model, p2, task, num_samples=8)


def _cli(argv):
    from minititans.cli import build_parser

    args = build_parser().parse_args(argv)
    return args.func(args)


@pytest.mark.parametrize("command", ["needle", "train", "ablate"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        _cli([command, "--help"])
    assert e.value.code == 0
    assert f"usage: minititans {command}" in capsys.readouterr().out


def test_train_command_writes_a_checkpoint_and_resumes_it(tmp_path, capsys):
    import json

    ck = tmp_path / "ck.npz"
    common = ["--task", "mqar", "--length", "12", "--eval-samples", "4", "--quiet",
              "--backend", "reference"]
    assert _cli(["train", "--model", "swa", "--steps", "2", "--checkpoint", str(ck),
                 "--config", "d_model=8,num_heads=1", *common]) == 0
    state, model, cfg, _ = load_checkpoint(ck)
    assert state.step == 2 and model.config.d_model == 8
    assert _cli(["train", "--resume", str(ck), "--steps", "3", "--out", str(tmp_path),
                 *common]) == 0
    assert "length    12" in capsys.readouterr().out
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["train"]["model"] == "SWA" and len(results["train"]["rows"]) == 1


def test_train_command_on_compression_trains_mads_autoencoder_and_resumes_it(tmp_path, capsys):
    """``train --task compression`` wraps the model in the bottleneck (a next-token model
    would copy its input, since ``targets[t] = inputs[t]``); the checkpoint keeps it."""
    from minititans.models import AutoEncoder

    ck = tmp_path / "ck.npz"
    common = ["--task", "compression", "--length", "8", "--eval-samples", "4", "--quiet",
              "--backend", "reference"]
    assert _cli(["train", "--model", "swa", "--steps", "2", "--checkpoint", str(ck),
                 "--config", "d_model=8,num_heads=1", *common]) == 0
    assert "autoencoder backbone" in capsys.readouterr().out
    state, model, _, params = load_checkpoint(ck)
    assert type(model) is AutoEncoder and "decoder" in params
    assert _cli(["train", "--resume", str(ck), "--steps", "3", "--checkpoint", str(ck),
                 *common]) == 0
    state3, model3, _, _ = load_checkpoint(ck)
    assert state3.step == 3 and type(model3) is AutoEncoder


def test_checkpoint_records_the_backbone_and_refuses_an_unknown_one(tmp_path):
    from minititans.io import load_arrays, save_arrays
    from minititans.models import AutoEncoder

    model = AutoEncoder(small("lmm").config)
    cfg = TrainConfig(steps=1, batch_size=2, warmup=0)
    params, state, _ = train(model, NeedleTask("pk", 10), cfg, progress=False)
    path = save_checkpoint(tmp_path / "ae.npz", state, model, cfg)
    state2, model2, _, params2 = load_checkpoint(path)
    assert model2 == model and type(model2) is AutoEncoder
    np.testing.assert_array_equal(ravel(params)[0], ravel(params2)[0])
    arrays, meta = load_arrays(path, kind="checkpoint")
    assert meta["backbone"] == "autoencoder"
    save_arrays(tmp_path / "bad.npz", arrays, kind="checkpoint", meta={**meta, "backbone": "vae"})
    with pytest.raises(ValueError, match="backbone"):
        load_checkpoint(tmp_path / "bad.npz")
    del meta["backbone"]  # a checkpoint from before backbones were recorded: a plain model
    save_arrays(tmp_path / "old.npz", arrays, kind="checkpoint", meta=meta)
    with pytest.raises(ValueError, match="parameters"):  # the decoder's do not fit it
        load_checkpoint(tmp_path / "old.npz")


def test_table5_ablation_experiment_reports_mean_and_spread():
    from minititans.experiments.ablation import AblationSettings, ablation_experiment

    settings = AblationSettings(task="mqar", train_length=8, eval_length=8, seeds=(0, 1),
                                eval_samples=4, rows=("LMM", "w/o momentum"),
                                train=dict(steps=1, batch_size=2, lr=1e-2, warmup=1),
                                backend="reference")
    result = ablation_experiment(settings, progress=False, workers=1)
    assert [r["model"] for r in result["rows"]] == ["LMM", "w/o momentum"]
    for r in result["rows"]:
        assert len(r["accuracies"]) == 2
        assert r["mean"] == pytest.approx(np.mean(r["accuracies"]))
        assert r["std"] == pytest.approx(np.std(r["accuracies"]))


def _naive_clip(g, max_norm):
    norm = np.sqrt(np.sum(g * g))
    return g * (max_norm / norm) if max_norm and norm > max_norm else g


def test_adamw_over_four_steps_matches_the_closed_form_moments():
    # m_t = (1 - β1) Σ_i β1^(t-i) g_i, v_t = (1 - β2) Σ_i β2^(t-i) g_i², bias-corrected by
    # 1 - β^t; p_t = p_{t-1} - lr (m̂_t / (√v̂_t + ε) + λ p_{t-1}). Constant lr (no schedule).
    cfg = TrainConfig(steps=4, warmup=0, min_lr_ratio=1.0, lr=0.05, beta1=0.8, beta2=0.95,
                      max_grad_norm=2.0, weight_decay=0.1)
    rng = np.random.default_rng(7)
    grads = [rng.standard_normal(3) * s for s in (0.5, 3.0, 1.0, 4.0)]  # 2 and 4 are clipped
    p = rng.standard_normal(3)
    state = TrainState(p.copy(), np.zeros(3), np.zeros(3), 0)
    clipped = [_naive_clip(g, cfg.max_grad_norm) for g in grads]
    for t in range(1, 5):
        state, norm = adamw_step(state, grads[t - 1], cfg)
        assert norm == pytest.approx(np.linalg.norm(grads[t - 1]), rel=1e-12)
        m = (1 - cfg.beta1) * sum(cfg.beta1 ** (t - i) * clipped[i - 1] for i in range(1, t + 1))
        v = (1 - cfg.beta2) * sum(cfg.beta2 ** (t - i) * clipped[i - 1] ** 2
                                  for i in range(1, t + 1))
        m_hat, v_hat = m / (1 - cfg.beta1 ** t), v / (1 - cfg.beta2 ** t)
        p = p - cfg.lr * (m_hat / (np.sqrt(v_hat) + cfg.eps) + cfg.weight_decay * p)
        np.testing.assert_allclose(state.m, m, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(state.v, v, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(state.params, p, rtol=1e-12, atol=1e-15)
        assert state.step == t


def test_answer_accuracy_on_hand_made_logits_and_masks():
    from minititans.tasks import Batch
    from minititans.training import answer_accuracy

    V = 3
    # argmax per position, written as the predicted token
    pred = np.array([[2, 0, 1, 1],
                     [0, 2, 2, 1],
                     [1, 1, 0, 2]])
    logits = np.eye(V)[pred] * 5.0 - 1.0  # (3, 4, 3), the argmax is `pred`
    targets = np.array([[0, 0, 1, 2],    # answers at 1, 2: both right -> sequence right
                        [0, 1, 2, 0],    # answers at 0, 3: 0 right, 3 wrong -> wrong
                        [0, 1, 0, 0]])   # answer at 2 right; 0 and 3 wrong but not answers
    mask = np.array([[False, True, True, False],
                     [True, False, False, True],
                     [False, False, True, False]])
    batch = Batch(np.zeros((3, 4), int), targets, mask)
    seq, tok = answer_accuracy(logits, batch)
    assert seq == pytest.approx(2 / 3, rel=1e-12)  # sequences 0 and 2
    assert tok == pytest.approx(4 / 5, rel=1e-12)  # 4 of the 5 answer tokens
    # a batch whose mask covers the wrong tokens scores otherwise
    everywhere = Batch(batch.inputs, targets, np.ones((3, 4), bool))
    seq_all, tok_all = answer_accuracy(logits, everywhere)
    assert seq_all == 0.0 and tok_all == pytest.approx(6 / 12, rel=1e-12)


def test_table5_each_ablation_row_changes_exactly_its_switch():
    from dataclasses import asdict

    from minititans.experiments.ablation import (
        ABLATIONS,
        TITANS_ROWS,
        AblationSettings,
        row_config,
    )

    s = AblationSettings()
    base = row_config("LMM", s, 32, "reference")
    assert (base.model, base.momentum, base.forgetting) == ("lmm", True, True)
    assert base.memory_depth == 1
    assert base.conv_kernel > 0 and base.num_persistent > 0 and base.max_grad_norm == 0.0
    assert (base.window, base.segment_len, base.vocab_size) == (s.window, s.window, 32)
    want = {  # Titans Table 5's rows, written out here rather than read from ABLATIONS
        "LMM": {},
        "w/o momentum": {"momentum": False},
        "w/o weight decay": {"forgetting": False},
        "w/o conv": {"conv_kernel": 0},
        "w/o persistent memory": {"num_persistent": 0},
        "deep memory (L_M = 2)": {"memory_depth": 2, "max_grad_norm": 1.0},
        "MAC": {"model": "mac"}, "MAG": {"model": "mag"}, "MAL": {"model": "mal"},
    }
    assert set(ABLATIONS) | set(TITANS_ROWS) == set(want)
    b = asdict(base)
    for label, changes in want.items():
        cfg = asdict(row_config(label, s, 32, "reference"))
        assert {k: v for k, v in cfg.items() if b[k] != v} == changes, label
