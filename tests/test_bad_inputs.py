"""Bad input across the whole public API: a ValueError/TypeError that names the argument.

The memory basics (wrong widths, gate ranges, chunk_size, read, loss, ...) are in
tests/test_memory_validation.py; this table covers the rest of the API and, for
``memory_scan``, runs every case on both backends: the numba wrapper must raise the same
message as the reference (no numba typing error, no IndexError, no silent NaN). Empty and
one-token sequences, non-contiguous and read-only arrays must *work*; they are at the end.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from naive_memory import naive_grad

import minititans as mt
from minititans import layers
from minititans.cli import main as cli_main
from minititans.io import load_memory_state, save_arrays, save_memory_state
from minititans.kernels import attention as nb_attention
from minititans.models import Model, ModelConfig
from minititans.tasks import MQARTask, NeedleTask, make_task
from minititans.training import (
    TrainConfig,
    init_state,
    load_checkpoint,
    save_checkpoint,
    train,
)

RNG = np.random.default_rng(0)
P = mt.init_memory(RNG, 3, 2, depth=2, expansion=2)
S0 = mt.MemoryState.initial(P)
K, V, Q = RNG.standard_normal((5, 3)), RNG.standard_normal((5, 2)), RNG.standard_normal((5, 3))
GATES = dict(alpha=0.1, eta=0.9, theta=0.1)
MP = mt.MemoryParams


def state_of(weights, activation="gelu", residual=False):
    return mt.MemoryState.initial(MP(weights, activation, residual))


# --- memory_scan, both backends ----------------------------------------------------------

SCAN_CASES = [
    # (description, arguments that replace the good ones, exception, message regex)
    ("state from a wider memory (keys width changed)",
     dict(state=mt.MemoryState.initial(mt.init_memory(RNG, 4, 2))), ValueError,
     r"keys must have last dimension 4"),
    ("state whose layers do not chain", dict(state=state_of([np.ones((3, 4)), np.ones((5, 2))])),
     ValueError, r"state.params\[1\] must have 4 rows"),
    ("integer weights", dict(state=state_of([np.ones((3, 2), dtype=int)])), TypeError,
     r"state.params\[0\] must be a float32 or float64 array"),
    ("float16 weights", dict(state=state_of([np.ones((3, 2), np.float16)])), TypeError,
     r"state.params\[0\] must be a float32 or float64 array, got dtype float16"),
    ("1-D weight", dict(state=state_of([np.ones(3)])), ValueError,
     r"state.params\[0\] must have 2 dimensions"),
    ("batched (3-D) weights", dict(state=state_of([np.ones((1, 3, 2))])), ValueError,
     r"state.params\[0\] must have 2 dimensions"),
    ("no weights at all", dict(state=state_of([])), ValueError,
     "state.params must hold at least one weight matrix"),
    ("NaN in the initial weights", dict(state=state_of([np.full((3, 2), np.nan)])), ValueError,
     r"state.params\[0\] contains NaN or inf"),
    ("inf in the momentum", dict(state=mt.MemoryState(P, P.like(np.full_like(w, np.inf)
                                                                 for w in P))),
     ValueError, r"state.momentum\[0\] contains NaN or inf"),
    ("unknown activation on hand-built params", dict(state=state_of(list(P), "relu")),
     ValueError, "state.params.activation must be one of"),
    ("residual form that is not square", dict(state=state_of(list(P), "gelu", True)),
     ValueError, "residual_norm=True needs d_in == d_out"),
    ("keys wrong width, empty sequence", dict(keys=np.zeros((0, 4)), values=V[:0],
                                              queries=Q[:0]), ValueError, "keys must have last"),
    ("boolean keys", dict(keys=np.ones((5, 3), bool)), TypeError, "keys must be a float32"),
    ("complex queries", dict(queries=np.ones((5, 3), complex)), TypeError, "queries must be"),
    ("object values", dict(values=np.empty((5, 2), object)), TypeError, "values must be"),
    ("scalar keys", dict(keys=np.float64(1.0)), ValueError, "keys must have 2 dimensions"),
    ("NaN in queries", dict(queries=np.full((5, 3), np.nan)), ValueError,
     "queries contains NaN"),
    ("float16 gate", dict(alpha=np.zeros(5, np.float16)), TypeError,
     "alpha must be a float or a float array, got dtype float16"),
    # alpha may have a column per output channel (channel-wise), but not another number
    ("gate of shape (T, 1)", dict(alpha=np.zeros((5, 1))), ValueError,
     r"alpha must be a float, have shape \(5,\), or have shape \(5, 8\) \(a rate per output "
     "channel"),
    ("eta of shape (T, 1)", dict(eta=np.zeros((5, 1))), ValueError,
     r"eta must be a float or have shape \(5,\)"),
    # theta may have a column per memory layer (Appendix B.3), but not another number
    ("theta of shape (T, 3)", dict(theta=np.zeros((5, 3))), ValueError,
     r"theta must be a float, have shape \(5,\), or have shape \(5, 2\)"),
    ("gate as a string", dict(eta="0.9"), TypeError, "eta must be a float"),
    ("complex gate", dict(alpha=0.1 + 0j), TypeError, "alpha must be a float"),
    ("inf gate", dict(theta=np.array([0.1, 0.1, np.inf, 0.1, 0.1])), ValueError,
     "theta contains NaN or inf"),
    ("max_grad_norm a string", dict(max_grad_norm="big"), TypeError,
     "max_grad_norm must be a float > 0 or None"),
    ("max_grad_norm NaN", dict(max_grad_norm=float("nan")), ValueError, "max_grad_norm must be"),
    ("max_grad_norm negative", dict(max_grad_norm=-1.0), ValueError, "max_grad_norm must be"),
    ("chunk_size True", dict(chunk_size=True), TypeError, "chunk_size must be an int"),
    ("chunk_size negative", dict(chunk_size=-3), ValueError, "chunk_size must be >= 1"),
    ("lp exponent a string", dict(loss="lp", p="3"), TypeError, "p must be a float"),
    ("lp exponent NaN", dict(loss="lp", p=float("nan")), ValueError, "p must be finite"),
    ("huber delta inf", dict(loss="huber", delta=float("inf")), ValueError,
     "delta must be finite"),
    ("read None", dict(read=None), ValueError, "read must be one of"),
]


def _scan(backend, **over):
    args = dict(state=S0, keys=K, values=V, queries=Q, **GATES)
    args.update(over)
    state, keys, values, queries = (args.pop(n) for n in ("state", "keys", "values", "queries"))
    return mt.memory_scan(state, keys, values, queries, backend=backend, **args)


@pytest.mark.parametrize("backend", ["reference", "numba"])
@pytest.mark.parametrize("what,over,exc,match", SCAN_CASES, ids=[c[0] for c in SCAN_CASES])
def test_memory_scan_bad_input_same_error_on_both_backends(what, over, exc, match, backend):
    with pytest.raises(exc, match=match) as err:
        _scan(backend, **over)
    # the numba wrapper raises exactly the reference's error, not a variant of it
    with pytest.raises(exc) as ref:
        _scan("reference", **over)
    assert str(err.value) == str(ref.value)


# --- the rest of the API -----------------------------------------------------------------

q4 = RNG.standard_normal((5, 4))
v3 = RNG.standard_normal((5, 3))
CFG = ModelConfig(model="lmm", vocab_size=8, d_model=8, num_heads=2, segment_len=4, window=4,
                  chunk_size=2, num_persistent=2)
MODEL = Model(CFG)
PARAMS = MODEL.init(np.random.default_rng(0))
TCFG = TrainConfig(steps=1, batch_size=1)
TASK = NeedleTask(length=16)


def _ckpt_of(model, tmp):
    return save_checkpoint(tmp / "c.npz", init_state(model, TCFG), model, TCFG)


API_CASES = [
    # memory helpers
    ("memory_forward with chained-wrong params",
     lambda: mt.memory_forward(MP([np.ones((3, 4)), np.ones((5, 2))]), K), ValueError,
     r"params\[1\] must have 4 rows"),
    ("memory_step with NaN weights",
     lambda: mt.memory_step(state_of([np.full((3, 2), np.nan)]), K[0], V[0][:2], **GATES),
     ValueError, r"state.params\[0\] contains NaN"),
    ("memory_step max_grad_norm string",
     lambda: mt.memory_step(S0, K[0], V[0], max_grad_norm="x", **GATES), TypeError,
     "max_grad_norm"),
    ("MemoryState with mismatched momentum",
     lambda: mt.MemoryState(P, P.like(np.zeros((2, 2)) for _ in P)), ValueError,
     "momentum shapes"),
    ("compute_gates width", lambda: mt.compute_gates(mt.init_gates(RNG, 4), np.ones((3, 5))),
     ValueError, "x must have last dimension 4"),
    ("compute_gates theta_max 0",
     lambda: mt.compute_gates(mt.init_gates(RNG, 4), np.ones((3, 4)), theta_max=0), ValueError,
     "theta_max must be > 0"),
    ("init_gates eta_init 1", lambda: mt.init_gates(RNG, 4, eta_init=1.0), ValueError,
     r"eta_init must be in \(0, 1\)"),
    # attention (both implementations)
    *[(f"{name} integer q", lambda f=f: f(q4.astype(int), q4, v3), TypeError,
       "q must be a float32 or float64 array")
      for name, f in (("attention", mt.causal_attention),
                      ("numba attention", nb_attention.causal_attention))],
    *[(f"{name} float16 k", lambda f=f: f(q4, q4.astype(np.float16), v3), TypeError,
       "k must be a float32 or float64 array, got dtype float16")
      for name, f in (("attention", mt.causal_attention),
                      ("numba attention", nb_attention.causal_attention))],
    *[(f"{name} 1-D q", lambda f=f: f(q4[0], q4[0], v3[0]), ValueError,
       r"q must have shape \(..., T, d\)")
      for name, f in (("attention", mt.causal_attention),
                      ("numba attention", nb_attention.causal_attention))],
    *[(f"{name} v rows", lambda f=f: f(q4, q4, v3[:4]), ValueError, "v must have shape")
      for name, f in (("attention", mt.causal_attention),
                      ("numba attention", nb_attention.causal_attention))],
    *[(f"{name} window 0", lambda f=f: f(q4, q4, v3, window=0), ValueError,
       "window must be >= 1")
      for name, f in (("attention", mt.causal_attention),
                      ("numba attention", nb_attention.causal_attention))],
    *[(f"{name} prefix > T", lambda f=f: f(q4, q4, v3, prefix=9), ValueError,
       "prefix must be <= the sequence length 5")
      for name, f in (("attention", mt.causal_attention),
                      ("numba attention", nb_attention.causal_attention))],
    ("multi-head: d not divisible", lambda: mt.multi_head_attention(q4, q4, v3, 3), ValueError,
     "divisible by num_heads=3"),
    ("attention_mask T float", lambda: mt.attention_mask(3.0), TypeError, "T must be an int"),
    # linear attention and the delta rule (both implementations)
    *[(f"{name} unknown feature map", lambda f=f: f(q4, q4, v3, feature_map="relu"),
       ValueError, "feature_map must be one of")
      for name, f in (("linear attention", mt.linear_attention_recurrent),
                      ("numba linear attention", nb_attention.linear_attention_recurrent))],
    *[(f"{name} state of another width",
       lambda f=f: f(q4, q4, v3, state=(np.zeros((3, 3)), np.zeros(4))), ValueError,
       r"state must be \(M, z\) of shapes")
      for name, f in (("linear attention", mt.linear_attention_recurrent),
                      ("numba linear attention", nb_attention.linear_attention_recurrent))],
    *[(f"{name} beta wrong length", lambda f=f: f(q4, q4, v3, np.ones(4)), ValueError,
       r"beta must be a float or have shape \(5,\)")
      for name, f in (("delta rule", mt.delta_rule), ("numba delta rule",
                                                       nb_attention.delta_rule))],
    *[(f"{name} 3-D q", lambda f=f: f(q4[None], q4[None], v3[None], 0.5), ValueError,
       "q must have 2 dimensions")
      for name, f in (("delta rule", mt.delta_rule), ("numba delta rule",
                                                       nb_attention.delta_rule))],
    *[(f"{name} integer state", lambda f=f: f(q4, q4, v3, 0.5, state=np.zeros((4, 3), int)),
       TypeError, "state must be a float32 or float64 array")
      for name, f in (("delta rule", mt.delta_rule), ("numba delta rule",
                                                       nb_attention.delta_rule))],
    *[(f"{name} alpha > 1", lambda f=f: f(q4, q4, v3, 0.5, 1.5), ValueError,
       "alpha must be <= 1")
      for name, f in (("gated delta rule", mt.gated_delta_rule),
                      ("numba gated delta rule", nb_attention.gated_delta_rule))],
    # layers
    ("init_linear rng is a seed", lambda: layers.init_linear(0, 3, 3), TypeError, "rng"),
    ("linear wrong width", lambda: layers.linear(layers.init_linear(RNG, 4, 3), np.ones((2, 5))),
     ValueError, "x must have last dimension 4"),
    ("l2_normalize integer x", lambda: layers.l2_normalize(np.ones(3, int)), TypeError,
     "x must be a float32"),
    ("l2_normalize eps negative", lambda: layers.l2_normalize(np.zeros(3), eps=-1e-6),
     ValueError, "eps must be a float >= 0"),
    ("rms_norm eps negative",
     lambda: layers.rms_norm(layers.init_rms_norm(RNG, 4), np.zeros((2, 4)), eps=-1.0),
     ValueError, "eps must be a float >= 0"),
    ("layer_norm width",
     lambda: layers.layer_norm(layers.init_layer_norm(RNG, 4), np.ones((2, 3))), ValueError,
     "x must have last dimension 4"),
    ("depthwise_conv state shape",
     lambda: layers.depthwise_conv(layers.init_depthwise_conv(RNG, 4, 3), np.ones((5, 4)),
                                   state=np.ones((3, 4))), ValueError,
     r"state must have shape \(2, 4\)"),
    ("prepend_persistent 1-D x",
     lambda: layers.prepend_persistent(layers.init_persistent(RNG, 2, 4), np.ones(4)),
     ValueError, r"x must have shape \(..., T, 4\)"),
    ("init_rms_norm float16", lambda: layers.init_rms_norm(RNG, 4, dtype=np.float16), TypeError,
     "dtype must be float32 or float64"),
    # model configs
    ("config memory_activation relu", lambda: ModelConfig(memory_activation="relu"), ValueError,
     "memory_activation must be one of"),
    ("config momentum a string", lambda: ModelConfig(momentum="yes"), TypeError,
     "momentum must be True or False"),
    ("config theta_init a string", lambda: ModelConfig(theta_init="0.02"), TypeError,
     "theta_init must be a float"),
    ("config vocab_size float", lambda: ModelConfig(vocab_size=32.0), TypeError,
     "vocab_size must be an int"),
    ("config heads do not divide", lambda: ModelConfig(d_model=10, num_heads=3), ValueError,
     "num_heads=3"),
    ("config unknown JSON field", lambda: ModelConfig.from_json('{"foo": 1}'), ValueError,
     "unknown config fields: foo"),
    # model apply
    ("apply tokens outside the vocab", lambda: MODEL.apply(PARAMS, np.array([0, 8])),
     ValueError, r"tokens must be in \[0, 8\)"),
    ("apply negative tokens", lambda: MODEL.apply(PARAMS, np.array([-1, 2])), ValueError,
     "tokens must be in"),
    ("apply float tokens", lambda: MODEL.apply(PARAMS, np.zeros(4)), TypeError,
     "tokens must be integers, got dtype float64"),
    ("apply bool tokens", lambda: MODEL.apply(PARAMS, np.array([True, False])), TypeError,
     "tokens must be integers"),
    ("apply empty sequence", lambda: MODEL.apply(PARAMS, np.zeros(0, int)), ValueError,
     r"tokens must have shape \(T,\) or \(B, T\)"),
    ("apply empty batch", lambda: MODEL.apply(PARAMS, np.zeros((0, 3), int)), ValueError,
     r"with B, T >= 1"),
    ("apply 3-D tokens", lambda: MODEL.apply(PARAMS, np.zeros((1, 1, 3), int)), ValueError,
     "tokens must have shape"),
    ("apply params of a wider model",
     lambda: MODEL.apply(Model(CFG.with_(d_model=16)).init(RNG), np.zeros(3, int)), ValueError,
     "params do not fit config"),
    ("apply params of a depth-1 memory",
     lambda: MODEL.apply(Model(CFG.with_(memory_depth=1)).init(RNG), np.zeros(3, int)),
     ValueError, "params do not fit config"),
    ("apply params of a larger vocab",
     lambda: MODEL.apply(Model(CFG.with_(vocab_size=16)).init(RNG), np.zeros(3, int)),
     ValueError, "params do not fit config"),
    ("apply params not a dict", lambda: MODEL.apply([], np.zeros(3, int)), TypeError,
     "params must be the dict returned by init"),
    ("numba model, params of another config",
     lambda: Model(CFG.with_(backend="numba")).apply(Model(CFG.with_(d_model=16)).init(RNG),
                                                     np.zeros(3, int)),
     ValueError, "params do not fit config"),
    ("init rng is a seed", lambda: MODEL.init(0), TypeError, "rng must be a numpy"),
    # tasks
    ("needle placement", lambda: NeedleTask(placement="late"), ValueError,
     "placement must be one of"),
    ("needle sample batch 0", lambda: TASK.sample(RNG, 0), ValueError,
     "batch_size must be >= 1"),
    ("mqar too short", lambda: MQARTask(length=2), ValueError, "length must be >= 4"),
    ("make_task float length", lambda: make_task("needle-pk", 64.0), TypeError,
     "length must be an int"),
    # training
    ("TrainConfig beta1 = 1", lambda: TrainConfig(beta1=1.0), ValueError,
     r"beta1 must be in \[0, 1\)"),
    ("TrainConfig eps 0", lambda: TrainConfig(eps=0.0), ValueError, "eps must be > 0"),
    ("TrainConfig max_grad_norm negative", lambda: TrainConfig(max_grad_norm=-1.0), ValueError,
     "max_grad_norm must be >= 0"),
    ("TrainConfig min_lr_ratio 2", lambda: TrainConfig(min_lr_ratio=2.0), ValueError,
     "min_lr_ratio must be in"),
    ("TrainConfig lr a string", lambda: TrainConfig(lr="0.1"), TypeError, "lr must be a float"),
    ("train a config, not a model", lambda: train(CFG, TASK, TCFG, progress=False), TypeError,
     "model must be a Model"),
    ("train a dict of settings", lambda: train(MODEL, TASK, {"steps": 1}, progress=False),
     TypeError, "cfg must be a TrainConfig"),
    ("train a task name", lambda: train(MODEL, "needle", TCFG, progress=False), TypeError,
     "task must have a sample"),
    ("train resume from an int", lambda: train(MODEL, TASK, TCFG, resume=5, progress=False),
     TypeError, "resume must be a TrainState or a checkpoint path"),
    ("train task vocab larger than the model",
     lambda: train(Model(CFG.with_(vocab_size=4)), TASK, TCFG, progress=False), ValueError,
     r"tokens must be in \[0, 4\)"),
]


@pytest.mark.parametrize("what,call,exc,match", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_bad_input_raises_a_clear_error(what, call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# --- checkpoints and memory-state files ----------------------------------------------------

def test_checkpoint_loaded_into_another_config_is_refused(tmp_path):
    path = _ckpt_of(MODEL, tmp_path)
    other = Model(CFG.with_(d_model=16))
    with pytest.raises(ValueError, match="another config"):
        train(other, TASK, TCFG, resume=path, progress=False)


def test_checkpoint_of_another_model_is_not_written(tmp_path):
    state = init_state(MODEL, TCFG)
    with pytest.raises(ValueError, match="another model's state"):
        save_checkpoint(tmp_path / "c.npz", state, Model(CFG.with_(d_model=16)), TCFG)
    assert not (tmp_path / "c.npz").exists()


def test_file_of_the_other_kind_is_refused(tmp_path):
    ckpt = _ckpt_of(MODEL, tmp_path)
    mem = save_memory_state(tmp_path / "m.npz", S0)
    with pytest.raises(ValueError, match="holds a 'checkpoint', expected a 'memory_state'"):
        load_memory_state(ckpt)
    with pytest.raises(ValueError, match="holds a 'memory_state', expected a 'checkpoint'"):
        load_checkpoint(mem)


def test_loaded_memory_state_fed_to_a_scan_of_another_width(tmp_path):
    state = load_memory_state(save_memory_state(tmp_path / "m.npz", S0))
    for backend in ("reference", "numba"):
        with pytest.raises(ValueError, match="keys must have last dimension 3"):
            mt.memory_scan(state, np.ones((2, 4)), np.ones((2, 2)), np.ones((2, 4)),
                           backend=backend, **GATES)


def test_save_arrays_refuses_object_arrays(tmp_path):
    with pytest.raises(TypeError, match=r"arrays\['a'\] is an object array"):
        save_arrays(tmp_path / "x.npz", {"a": np.array([None])}, kind="x")


# --- the command line ----------------------------------------------------------------------

@pytest.mark.parametrize("argv,match", [
    (["recall", "--d", "0"], "--d must be >= 1"),
    (["recall", "--sizes", "4", "0"], "--sizes values must be >= 1"),
    (["recall", "--d", "x"], "invalid int value"),
    (["train", "--model", "gpt"], "invalid choice"),
    (["bench", "--bogus"], "unrecognized arguments"),
], ids=lambda x: " ".join(x) if isinstance(x, list) else None)
def test_cli_bad_arguments_exit_with_usage(argv, match, capsys):
    with pytest.raises(SystemExit) as info:
        cli_main(argv)
    assert info.value.code == 2
    assert match in capsys.readouterr().err


# --- edge cases that must work ------------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference", "numba"])
@pytest.mark.parametrize("chunk", [1, 4])
def test_empty_and_one_token_scans_work(backend, chunk):
    out, state = mt.memory_scan(S0, K[:0], V[:0], Q[:0], chunk_size=chunk, backend=backend,
                                **GATES)
    assert out.shape == (0, 2) and state is S0
    out, state = mt.memory_scan(S0, K[:1], V[:1], Q[:1], chunk_size=chunk, backend=backend,
                                **GATES)
    manual = mt.memory_step(S0, K[0], V[0], **GATES)
    np.testing.assert_allclose(out[0], mt.memory_forward(manual.params, Q[0]), rtol=1e-12)


@pytest.mark.parametrize("backend", ["reference", "numba"])
def test_non_contiguous_read_only_and_mixed_precision_inputs_work(backend):
    Kr = np.asfortranarray(K)
    Kr.setflags(write=False)
    Vw = np.repeat(V, 2, axis=1)[:, ::2]  # a strided view
    Qr = Q[::-1][::-1]
    alpha = np.broadcast_to(0.1, (5,))  # read-only, stride 0
    ref, s_ref = mt.memory_scan(S0, K, V, Q, backend="reference", **GATES)
    out, s = mt.memory_scan(S0, Kr, Vw, Qr, backend=backend, alpha=alpha, eta=0.9, theta=0.1)
    np.testing.assert_allclose(out, ref, rtol=1e-12)
    for a, b in zip(s.params, s_ref.params):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    # a float32 state with float64 inputs computes in float64, like the reference
    s32 = mt.MemoryState.initial(P.like(w.astype(np.float32) for w in P))
    out32, _ = mt.memory_scan(s32, K, V, Q, backend=backend, **GATES)
    assert out32.dtype == np.float64 and np.all(np.isfinite(out32))


@pytest.mark.parametrize("f", [mt.causal_attention, nb_attention.causal_attention],
                         ids=["reference", "numba"])
def test_attention_of_empty_and_one_token_sequences(f):
    assert f(q4[:0], q4[:0], v3[:0]).shape == (0, 3)
    assert f(np.zeros((2, 0, 4)), np.zeros((2, 0, 4)), np.zeros((2, 0, 3))).shape == (2, 0, 3)
    np.testing.assert_allclose(f(q4[:1], q4[:1], v3[:1]), v3[:1], rtol=1e-12)


@pytest.mark.parametrize("f", [mt.linear_attention_recurrent,
                               nb_attention.linear_attention_recurrent],
                         ids=["reference", "numba"])
def test_linear_attention_of_an_empty_sequence_returns_the_state(f):
    y, (M, z) = f(q4[:0], q4[:0], v3[:0])
    assert y.shape == (0, 3) and M.shape == (4, 3) and not M.any() and z.shape == (4,)


def test_model_apply_one_token_and_uint8_tokens():
    logits = MODEL.apply(PARAMS, np.zeros(1, np.uint8))
    assert logits.shape == (1, 8) and np.all(np.isfinite(logits))


# --- issue 14, item 6: arguments that used to be accepted silently ---------------------------

@pytest.mark.parametrize("what,call,exc,match", [
    ("misspelled loss", lambda: mt.per_token_surprise(P, K, V, "l3"), ValueError,
     "loss must be one of"),
    ("lp with p < 1", lambda: mt.per_token_surprise(P, K, V, "lp", p=0.5), ValueError,
     "p must be >= 1"),
    ("huber with delta 0", lambda: mt.per_token_surprise(P, K, V, "huber", delta=0.0),
     ValueError, "delta must be > 0"),
    ("keys of another width", lambda: mt.per_token_surprise(P, Q[:, :2], V), ValueError,
     "k must have last dimension 3"),
    ("1-D keys", lambda: mt.per_token_surprise(P, K[0], V[0]), ValueError,
     "k must have 2 dimensions"),
    ("more values than keys", lambda: mt.per_token_surprise(P, K[:3], V), ValueError,
     "k and v must have the same number of rows"),
    ("integer values", lambda: mt.per_token_surprise(P, K, V.astype(int)), TypeError,
     "v must be a float32 or float64 array"),
    ("params not a MemoryParams", lambda: mt.per_token_surprise([np.ones((3, 2))], K, V),
     TypeError, "params must be a MemoryParams"),
    ("residual_norm a string", lambda: mt.init_memory(RNG, 3, 3, residual_norm="no"),
     TypeError, "residual_norm must be True or False, got 'no'"),
    ("residual_norm an int", lambda: mt.init_memory(RNG, 3, 3, residual_norm=1),
     TypeError, "residual_norm must be True or False"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_per_token_surprise_and_init_memory_check_their_arguments(what, call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_per_token_surprise_of_each_loss_is_the_stack_of_single_token_surprises():
    # the checks must not change the result: u_i = ∇ℓ(M; k_i, v_i) for every loss
    for loss in mt.LOSSES:
        u = mt.per_token_surprise(P, K, V, loss)
        for i in range(K.shape[0]):
            one = mt.surprise(P, K[i:i + 1], V[i:i + 1], loss)
            for a, b in zip(u, one):
                np.testing.assert_allclose(a[i], b, rtol=1e-12, atol=1e-14)


def test_init_memory_accepts_numpy_bools_for_residual_norm():
    params = mt.init_memory(np.random.default_rng(0), 3, 3, residual_norm=np.True_)
    assert params.residual_norm is True


@pytest.mark.parametrize("scalar", [np.float32, np.float64, float])
def test_model_config_float_fields_accept_numpy_scalars_alike(scalar):
    cfg = ModelConfig(theta_init=scalar(0.05), theta_max=scalar(0.5), alpha_init=scalar(0.25),
                      num_heads=np.int64(2))
    assert type(cfg.theta_init) is float and type(cfg.num_heads) is int
    assert cfg.theta_init == pytest.approx(0.05, rel=1e-7) and cfg.alpha_init == 0.25
    assert ModelConfig.from_json(cfg.to_json()) == cfg  # serialises like a Python float
    with pytest.raises(TypeError, match="theta_init must be a float"):
        ModelConfig(theta_init=np.True_)


# --- issue 14, item 7: every loaded array is checked against the recorded model -------------

def _rewrite(path, change_arrays=None, change_meta=None):
    """Rewrite a saved file with some arrays or metadata keys changed (None deletes one)."""
    from minititans.io import load_arrays

    kind = "checkpoint" if "checkpoint" in path.name else "memory_state"
    arrays, meta = load_arrays(path, kind=kind)
    for source, changes in ((arrays, change_arrays or {}), (meta, change_meta or {})):
        for key, value in changes.items():
            if value is None:
                source.pop(key, None)
            else:
                source[key] = value(source[key]) if callable(value) else value
    out = path.with_name("bad_" + path.name)
    save_arrays(out, arrays, kind=kind, meta=meta)
    return out


CHECKPOINT_CASES = [
    # (description, array changes, metadata changes, message regex)
    ("m of the wrong shape", dict(m=lambda m: m[:-3]), {}, r"array 'm' must have shape"),
    ("v of the wrong shape", dict(v=lambda v: np.concatenate([v, v])), {},
     r"array 'v' must have shape"),
    ("params of the wrong shape", dict(params=lambda p: p[:10]), {},
     r"array 'params' has shape \(10,\)"),
    ("integer params", dict(params=lambda p: p.astype(np.int64)), {},
     r"array 'params' must be float32 or float64, got dtype int64"),
    ("complex params", dict(params=lambda p: p.astype(complex)), {},
     r"array 'params' must be float32 or float64, got dtype complex128"),
    ("string params", dict(params=lambda p: p.astype(str)), {},
     r"array 'params' must be float32 or float64, got dtype <U"),
    ("NaN params", dict(params=lambda p: np.where(np.arange(p.size) == 3, np.nan, p)), {},
     r"array 'params' contains NaN or inf"),
    ("inf in m", dict(m=lambda m: m + np.inf), {}, r"array 'm' contains NaN or inf"),
    ("negative v", dict(v=lambda v: v - 1.0), {}, r"array 'v' \(Adam's second moment\) has "
     "negative"),
    ("negative step", dict(step=np.int64(-1)), {}, r"array 'step' = -1 must be in \[0, 1\]"),
    ("step past the schedule", dict(step=np.int64(5)), {}, r"array 'step' = 5 must be in"),
    ("float step", dict(step=np.float64(1.0)), {}, r"array 'step' must be an integer scalar"),
    ("step a vector", dict(step=np.zeros(2, np.int64)), {},
     r"array 'step' must be an integer scalar"),
    ("missing m", dict(m=None), {}, r"missing the array 'm'"),
    ("an extra array", dict(extra=np.ones(2)), {}, r"unexpected arrays \['extra'\]"),
    ("missing model_config", {}, dict(model_config=None), r"missing the metadata key "
     "'model_config'"),
    ("missing train_config", {}, dict(train_config=None), r"missing the metadata key "
     "'train_config'"),
    ("model_config a string", {}, dict(model_config="lmm"), r"'model_config' = 'lmm'; "
     "expected a JSON object"),
    ("model_config with an unknown field", {}, dict(model_config=lambda c: {**c, "dmodel": 8}),
     r"'model_config' that is not a valid ModelConfig: unknown config fields: dmodel"),
    ("model_config with a bad value", {}, dict(model_config=lambda c: {**c, "d_model": "8"}),
     r"'model_config' that is not a valid ModelConfig: d_model must be an int"),
    ("train_config with an unknown field", {}, dict(train_config=lambda c: {**c, "lr0": 1}),
     r"'train_config' that is not a valid TrainConfig"),
    ("train_config with a bad value", {}, dict(train_config=lambda c: {**c, "lr": -1.0}),
     r"'train_config' that is not a valid TrainConfig: lr must be > 0"),
    ("unknown task", {}, dict(task="needle-x"), r"bad metadata 'task'/'length'"),
    ("length zero", {}, dict(length=0), r"bad metadata 'task'/'length': length must be >= 1"),
]


@pytest.mark.parametrize("what,arrays,meta,match", CHECKPOINT_CASES,
                         ids=[c[0] for c in CHECKPOINT_CASES])
def test_checkpoint_arrays_and_metadata_are_validated_on_load(what, arrays, meta, match,
                                                              tmp_path):
    good = save_checkpoint(tmp_path / "checkpoint.npz", init_state(MODEL, TCFG), MODEL, TCFG,
                           task_name="needle-pk", length=16)
    bad = _rewrite(good, arrays, meta)
    with pytest.raises(ValueError, match=match):
        load_checkpoint(bad)
    # resuming from it is refused the same way, before any training step
    with pytest.raises(ValueError, match=match):
        train(MODEL, TASK, TCFG, resume=bad, progress=False)


def test_checkpoint_records_its_task_and_length(tmp_path):
    from minititans.training import checkpoint_task

    model = Model(CFG.with_(vocab_size=TASK.vocab_size))
    path = tmp_path / "run.npz"
    train(model, TASK, TrainConfig(steps=2, batch_size=1), checkpoint=path, until=1,
          progress=False, task_name="needle-pk")
    assert checkpoint_task(path) == ("needle-pk", 16)
    # resuming it on another task (or another length) is refused
    with pytest.raises(ValueError, match="trained on 'needle-pk' at length 16, not 'mqar'"):
        train(model, MQARTask(16), TrainConfig(steps=2, batch_size=1),
              resume=path, progress=False, task_name="mqar")
    with pytest.raises(ValueError, match="at length 16, not 'needle-pk' at length 20"):
        train(model, NeedleTask(length=20), TrainConfig(steps=2, batch_size=1), resume=path,
              progress=False, task_name="needle-pk")
    # and a different training config is named in a warning
    with pytest.warns(RuntimeWarning, match="differs from the checkpoint's in lr, seed"):
        train(model, TASK, TrainConfig(steps=2, batch_size=1, lr=0.5, seed=4), resume=path,
              progress=False, task_name="needle-pk")


def test_checkpoint_save_refuses_moments_of_the_wrong_shape(tmp_path):
    state = init_state(MODEL, TCFG)
    bad = type(state)(state.params, state.m[:-1], state.v, 0)
    with pytest.raises(ValueError, match=r"state.m must have shape"):
        save_checkpoint(tmp_path / "c.npz", bad, MODEL, TCFG)
    with pytest.raises(ValueError, match="task_name must be one of"):
        save_checkpoint(tmp_path / "c.npz", state, MODEL, TCFG, task_name="needle")
    assert not (tmp_path / "c.npz").exists()


P2 = mt.init_memory(np.random.default_rng(1), 3, 3, depth=2, expansion=2, residual_norm=True)

MEMORY_FILE_CASES = [
    ("depth-1 metadata over depth-2 weights", {}, dict(depth=1),
     r"holds arrays \['S1', 'W1'\] that its metadata \(depth 1\) does not describe"),
    ("depth-3 metadata over depth-2 weights", {}, dict(depth=3), r"missing arrays \['W2', "
     "'S2'\\] \\(its metadata says depth 3\\)"),
    ("depth a string", {}, dict(depth="2"), r"metadata 'depth' = '2'; expected an int >= 1"),
    ("depth missing", {}, dict(depth=None), r"missing the metadata key 'depth'"),
    ("unknown activation", {}, dict(activation="relu"), r"metadata 'activation' = 'relu'"),
    ("residual_norm a string", {}, dict(residual_norm="no"),
     r"metadata 'residual_norm' = 'no'; expected true or false"),
    ("momentum of another shape", dict(S1=lambda s: s[:, :2]), {},
     r"array 'S1' must have shape \(6, 3\)"),
    ("weights that do not chain", dict(W1=lambda w: w[:5]), {},
     r"array 'W1' must have 6 rows"),
    ("integer weights", dict(W0=lambda w: w.astype(int)), {},
     r"array 'W0' must be float32 or float64"),
    ("complex momentum", dict(S0=lambda s: s.astype(complex)), {},
     r"array 'S0' must be float32 or float64"),
    ("NaN weights", dict(W1=lambda w: w * np.nan), {}, r"array 'W1' contains NaN"),
    ("a vector for a weight", dict(W0=lambda w: w[0], S0=lambda s: s[0]), {},
     r"array 'W0' must be a matrix"),
    ("residual form that is not square", dict(W1=lambda w: w[:, :2], S1=lambda s: s[:, :2]),
     {}, r"residual_norm is true but the memory maps 3 to 2 channels"),
]


@pytest.mark.parametrize("what,arrays,meta,match", MEMORY_FILE_CASES,
                         ids=[c[0] for c in MEMORY_FILE_CASES])
def test_memory_state_file_whose_metadata_disagrees_with_its_arrays_is_refused(
        what, arrays, meta, match, tmp_path):
    good = save_memory_state(tmp_path / "m.npz", mt.MemoryState.initial(P2))
    with pytest.raises(ValueError, match=match):
        load_memory_state(_rewrite(good, arrays, meta))


def test_unreadable_metadata_is_a_value_error(tmp_path):
    np.savez(tmp_path / "x.npz", W0=np.ones((2, 2)), __meta__=np.array("[1, 2]"))
    with pytest.raises(ValueError, match="metadata that is not a JSON object"):
        load_memory_state(tmp_path / "x.npz")
    np.savez(tmp_path / "y.npz", W0=np.ones((2, 2)), __meta__=np.array("{depth"))
    with pytest.raises(ValueError, match="unreadable metadata"):
        load_memory_state(tmp_path / "y.npz")


# --- issue 14, item 9: saves never replace what is not a regular file; stale temps go -------

def _dead_pid():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(proc.stdout)  # the process has exited: its id is (almost surely) free


def test_save_refuses_a_symlink_and_leaves_link_and_target_alone(tmp_path):
    target = save_memory_state(tmp_path / "real.npz", S0)
    before = target.read_bytes()
    link = tmp_path / "link.npz"
    link.symlink_to(target)
    with pytest.raises(ValueError, match="link.npz is a symbolic link; refusing to replace it"):
        save_memory_state(link, mt.MemoryState.initial(P2))
    assert link.is_symlink() and target.read_bytes() == before
    dangling = tmp_path / "dangling.npz"
    dangling.symlink_to(tmp_path / "nowhere.npz")
    with pytest.raises(ValueError, match="is a symbolic link"):
        save_arrays(dangling, {"x": np.ones(2)}, kind="x")
    assert dangling.is_symlink() and not (tmp_path / "nowhere.npz").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling.npz", "link.npz",
                                                          "real.npz"]


def test_save_refuses_a_directory_and_a_fifo(tmp_path):
    import os
    import stat

    (tmp_path / "d.npz").mkdir()
    with pytest.raises(ValueError, match="d.npz is a directory"):
        save_checkpoint(tmp_path / "d.npz", init_state(MODEL, TCFG), MODEL, TCFG)
    fifo = tmp_path / "f.npz"
    os.mkfifo(fifo)  # a non-regular file we may create without root (like a device node)
    with pytest.raises(ValueError, match="f.npz is not a regular file"):
        save_memory_state(fifo, S0)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    with pytest.raises(ValueError, match="results.json is a directory"):
        from minititans.io import update_results_json

        (tmp_path / "out" / "results.json").mkdir(parents=True)
        update_results_json(tmp_path / "out", "x", {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.npz", "f.npz", "out"]


def test_stale_temporaries_of_a_killed_save_are_removed_at_the_next_save(tmp_path):
    import os
    import time

    path = save_memory_state(tmp_path / "m.npz", S0)
    dead, alive = _dead_pid(), os.getppid()
    stale = tmp_path / f"m.npz.{dead}-abcd1234.tmp"  # what a killed save leaves
    running = tmp_path / f"m.npz.{alive}-efgh5678.tmp"  # a save still in progress
    legacy_old = tmp_path / "m.npz.x1y2z3w4.tmp"  # older naming, hours old
    legacy_new = tmp_path / "m.npz.q1r2s3t4.tmp"  # older naming, just written
    other = tmp_path / f"n.npz.{dead}-abcd1234.tmp"  # another target's: not ours to touch
    for p in (stale, running, legacy_old, legacy_new, other):
        p.write_bytes(b"partial")
    hours_ago = time.time() - 3 * 3600
    os.utime(legacy_old, (hours_ago, hours_ago))
    save_memory_state(path, mt.MemoryState.initial(P2))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["m.npz", running.name, legacy_new.name, other.name])
    assert load_memory_state(path).params.depth == 2


def test_save_killed_mid_write_keeps_the_old_file_and_the_next_save_cleans_up(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    path = save_memory_state(tmp_path / "m.npz", S0)
    before = path.read_bytes()
    ready = tmp_path / "ready"
    script = f"""
import time, numpy as np, minititans as mt
from minititans.io import save_memory_state
def slow_savez(f, **arrays):
    f.write(b"PK partial archive")
    f.flush()
    open({str(ready)!r}, "w").close()
    time.sleep(60)
np.savez = slow_savez
st = mt.MemoryState.initial(mt.init_memory(np.random.default_rng(0), 3, 3, depth=1))
save_memory_state({str(path)!r}, st)
"""
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.time() + 60
        while not ready.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert ready.exists(), "the child never reached the write"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    left = [p.name for p in tmp_path.glob("m.npz.*.tmp")]
    assert len(left) == 1 and path.read_bytes() == before  # old file intact, one temp left
    save_memory_state(path, mt.MemoryState.initial(P2))
    assert list(tmp_path.glob("m.npz.*.tmp")) == []
    assert load_memory_state(path).params.depth == 2


# --- issue 14, items 12-13: every flag of train/ablate/recall/bench checked before any work ---

@pytest.fixture
def no_work(monkeypatch):
    """Make the heavy part of each command fail loudly: a usage error must come first."""
    import minititans.bench
    import minititans.experiments.ablation
    import minititans.experiments.recall
    import minititans.training

    def started(*args, **kwargs):
        raise AssertionError("the command started its work before checking its flags")

    monkeypatch.setattr(minititans.training, "train", started)
    monkeypatch.setattr(minititans.experiments.ablation, "ablation_experiment", started)
    monkeypatch.setattr(minititans.experiments.recall, "recall_experiment", started)
    monkeypatch.setattr(minititans.bench, "run_bench", started)
    monkeypatch.setattr(minititans.bench, "run_stream", started)


def _usage_error(argv, capsys):
    with pytest.raises(SystemExit) as info:
        cli_main([str(a) for a in argv])
    assert info.value.code == 2
    return capsys.readouterr().err


HERE = Path(__file__).resolve().parent
FILE = str(HERE.parent / "pyproject.toml")  # an existing regular file
DIR = str(HERE)  # an existing directory
USAGE_CASES = [
    # (argv, text the error must contain: the flag and what was expected)
    (["train", "--steps", "0"], "--steps must be >= 1, got 0"),
    (["train", "--steps", "-1"], "--steps must be >= 1, got -1"),
    (["train", "--eval-samples", "0"], "--eval-samples must be >= 1"),
    (["train", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["train", "--window", "0"], "--window must be >= 1"),
    (["train", "--seed", "-1"], "--seed must be >= 0, got -1"),
    (["train", "--lr", "inf"], "--lr must be a finite number > 0, got inf"),
    (["train", "--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    (["train", "--lr", "0"], "--lr must be a finite number > 0"),
    (["train", "--lr", "-1"], "--lr must be a finite number > 0"),
    (["train", "--checkpoint-every", "-1"], "--checkpoint-every must be >= 0"),
    (["train", "--checkpoint-every", "5"], "--checkpoint-every needs --checkpoint"),
    (["train", "--length", "1000000000"], "--length must be <= 16384, got 1000000000"),
    (["train", "--length", "0"], "--length must be >= 1"),
    (["train", "--length", "3"], "--length 3 does not fit the task needle-pk: length must be"),
    (["train", "--eval-lengths", "32", "0"], "--eval-lengths must be >= 1, got 0"),
    (["train", "--eval-lengths", "20000"], "--eval-lengths must be <= 16384"),
    (["train", "--out", FILE], f"--out {FILE} exists and is not a directory"),
    (["train", "--checkpoint", DIR], f"--checkpoint {DIR} exists and is not a regular file"),
    (["train", "--config", "backend=cuda"], "--config backend='cuda' conflicts with --backend"),
    (["train", "--config", "model=mac"], "--config model='mac' conflicts with --model"),
    (["train", "--model", "mac", "--config", "model=mag"], "conflicts with --model"),
    (["train", "--config", "vocab_size=3"], "--config vocab_size=3 conflicts with --task"),
    (["train", "--window", "8", "--config", "window=4"], "--config window=4 conflicts with "
     "--window"),
    (["train", "--config", "dmodel=24"], "--config has unknown ModelConfig fields: dmodel "
     "(did you mean d_model?)"),
    (["train", "--config", "bogus=1"], "--config has unknown ModelConfig fields: bogus"),
    (["train", "--config", '{"d_model": }'], "--config: not valid JSON"),
    (["train", "--config", "[1, 2]"], "--config: must be a JSON object"),
    (["train", "--config", "d_model"], "--config: items must be key=value, got 'd_model'"),
    (["train", "--config", "missing.json"], "--config: no such file: missing.json"),
    (["train", "--config", "d_model=x"], "--config: d_model must be an int, got 'x'"),
    (["train", "--config", "memory_activation=relu"], "--config: memory_activation must be"),
    (["train", "--config", "d_model=10,num_heads=3"], "--config: d_model=10 must be "
     "divisible"),
    (["ablate", "--seeds", "0"], "--seeds must be >= 1, got 0"),
    (["ablate", "--steps", "0"], "--steps must be >= 1"),
    (["ablate", "--workers", "0"], "--workers must be >= 1"),
    (["ablate", "--length", "1000000000"], "--length must be <= 16384"),
    (["ablate", "--eval-length", "0"], "--eval-length must be >= 1"),
    (["ablate", "--length", "2"], "--length 2 does not fit the task mqar"),
    (["ablate", "--out", FILE], f"--out {FILE} exists and is not a directory"),
    (["recall", "--seed", "-1"], "--seed must be >= 0"),
    (["recall", "--out", FILE], f"--out {FILE} exists and is not a directory"),
    (["bench", "--stream", "--tokens", "0"], "--tokens must be >= 1, got 0"),
    (["bench", "--stream", "--depth", "0"], "--depth must be >= 1, got 0"),
    (["bench", "--out", DIR], f"--out {DIR} exists and is not a regular file"),
]


@pytest.mark.parametrize("argv,match", USAGE_CASES,
                         ids=[" ".join(Path(a).name if "/" in a else a for a in c[0])
                              for c in USAGE_CASES])
def test_cli_flag_checked_before_any_work(argv, match, no_work, capsys):
    err = _usage_error(argv, capsys)
    assert match in err
    assert f"usage: minititans {argv[0]}" in err  # the subcommand's own usage line


def test_cli_config_file_and_results_json_are_checked_before_work(tmp_path, no_work, capsys):
    bad = tmp_path / "c.json"
    bad.write_text("{not json")
    assert "is not a readable JSON file" in _usage_error(["train", "--config", bad], capsys)
    bad.write_text(json.dumps({"not_a_field": 1}))
    assert "unknown ModelConfig fields: not_a_field" in _usage_error(
        ["train", "--config", bad], capsys)
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text("[truncated")
    for cmd in ("train", "ablate", "recall"):
        assert "results.json exists but is not readable JSON" in _usage_error(
            [cmd, "--out", out], capsys)


@pytest.fixture(scope="module")
def mqar_checkpoint(tmp_path_factory):
    """A two-step run of a tiny SWA on MQAR of length 12, with its checkpoint."""
    path = tmp_path_factory.mktemp("ck") / "ck.npz"
    assert cli_main(["train", "--task", "mqar", "--length", "12", "--model", "swa",
                     "--steps", "2", "--config", "d_model=8,num_heads=1", "--checkpoint",
                     str(path), "--eval-samples", "2", "--quiet", "--backend",
                     "reference"]) == 0
    return path


@pytest.mark.parametrize("flags,match", [
    (["--task", "needle-pk"], "--task needle-pk conflicts with the checkpoint"),
    (["--length", "16"], "--length 16 conflicts with the checkpoint"),
    (["--model", "lmm"], "--model lmm conflicts with the checkpoint"),
    (["--config", "d_model=16"], "--config d_model=16 conflicts with the checkpoint"),
    (["--config", "dmodel=16"], "unknown ModelConfig fields: dmodel"),
    (["--config", "backend=cuda"], "--config backend='cuda' conflicts with the backend of "
     "this run ('reference')"),
    (["--lr", "0.5"], "--lr 0.5 conflicts with the checkpoint"),
    (["--seed", "3"], "--seed 3 conflicts with the checkpoint"),
    (["--batch-size", "4"], "--batch-size 4 conflicts with the checkpoint"),
    (["--window", "8"], "--window 8 conflicts with the checkpoint"),
    (["--steps", "1"], "--steps 1 is below the checkpoint's step 2"),
], ids=lambda x: " ".join(x) if isinstance(x, list) else None)
def test_cli_resume_refuses_flags_that_disagree_with_the_checkpoint(flags, match, no_work,
                                                                    mqar_checkpoint, capsys):
    err = _usage_error(["train", "--resume", mqar_checkpoint, *flags], capsys)
    assert match in err


def test_cli_resume_continues_the_recorded_task_and_agreeing_flags_are_fine(
        mqar_checkpoint, tmp_path, capsys):
    import shutil

    from minititans.training import checkpoint_task

    ck = tmp_path / "ck.npz"
    shutil.copy(mqar_checkpoint, ck)
    assert checkpoint_task(ck) == ("mqar", 12)
    # no --task/--length: the checkpoint's (the defaults would be needle-pk at 32)
    assert cli_main(["train", "--resume", str(ck), "--checkpoint", str(ck), "--steps", "3",
                     "--model", "swa", "--lr", "0.003", "--eval-samples", "2", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "on mqar (length 12)" in out and "length    12:" in out
    state, _, cfg, _ = load_checkpoint(ck)
    assert state.step == 3 and cfg.steps == 3 and checkpoint_task(ck) == ("mqar", 12)
    # another backend is allowed, and said
    assert cli_main(["train", "--resume", str(ck), "--backend", "numba", "--eval-samples",
                     "2", "--quiet"]) == 0
    assert "resumes with the numba backend; the checkpoint was written with reference" in \
        capsys.readouterr().err


def test_cli_resume_of_a_checkpoint_without_a_task_needs_task_and_length(tmp_path, capsys):
    path = _rewrite(save_checkpoint(tmp_path / "old_checkpoint.npz", init_state(MODEL, TCFG),
                                    MODEL, TCFG), {}, dict(task=None, length=None))
    assert "does not record its task" in _usage_error(["train", "--resume", path], capsys)
    assert "--resume: " in _usage_error(["train", "--resume", tmp_path / "none.npz"], capsys)


def test_cli_ctrl_c_during_train_names_the_last_checkpoint_and_exits_130(tmp_path, monkeypatch,
                                                                         capsys):
    import minititans.training

    real_step = minititans.training.adamw_step
    calls = []

    def interrupted_step(state, g, cfg):
        calls.append(state.step)
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C during the third step
        return real_step(state, g, cfg)

    monkeypatch.setattr(minititans.training, "adamw_step", interrupted_step)
    ck = tmp_path / "run.npz"
    argv = ["train", "--task", "mqar", "--length", "12", "--model", "swa", "--steps", "5",
            "--config", "d_model=8,num_heads=1", "--eval-samples", "2", "--quiet",
            "--backend", "reference"]
    assert cli_main([*argv, "--checkpoint", str(ck), "--checkpoint-every", "1"]) == 130
    err = capsys.readouterr().err
    assert f"the last checkpoint is {ck} (step 2)" in err
    assert f"minititans train --resume {ck}" in err
    assert load_checkpoint(ck)[0].step == 2
    calls.clear()
    assert cli_main(argv) == 130
    assert "no checkpoint was written" in capsys.readouterr().err


def test_resume_from_a_train_state_in_memory_is_checked_like_a_file():
    from minititans.training import TrainState

    good = init_state(MODEL, TCFG)
    for bad, match in [
        (TrainState(good.params, good.m[:-2], good.v, 0), r"resume.m must be a float vector"),
        (TrainState(good.params.astype(int), good.m, good.v, 0), "resume.params must be a float"),
        (TrainState(good.params, good.m, good.v * np.nan, 0), "resume.v contains NaN"),
        (TrainState(good.params, good.m, good.v, -1), "resume.step must be >= 0"),
        (TrainState(good.params, good.m, good.v, 9), "resume.step = 9 is past cfg.steps = 1"),
    ]:
        with pytest.raises(ValueError, match=match):
            train(MODEL, TASK, TCFG, resume=bad, progress=False)


# --- one divergence rule for every recurrence (issue 14, item 4) ---------------------------

REF_DELTA = (mt.delta_rule, mt.gated_delta_rule)
NB_DELTA = (nb_attention.delta_rule, nb_attention.gated_delta_rule)


# the weight bound of a depth-L memory in float64, written out: max ** (1 / (2L + 2))
BOUND64 = {L: np.finfo(np.float64).max ** (1.0 / (2 * L + 2)) for L in (1, 2, 3)}


def _naive_first_bad_delta_token(q, k, v, beta, alpha, gated):
    """The first t at which an entry of W_t is NaN, inf or above the depth-1 bound, or
    y_t = q_t W_t is NaN or inf, by a plain loop (-1: none)."""
    W = np.zeros((k.shape[1], v.shape[1]))
    with np.errstate(all="ignore"):
        for t in range(k.shape[0]):
            kt, vt = k[t][None], v[t][None]
            Wd = (1.0 - alpha) * W if gated else W
            W = (Wd if gated else (1.0 - alpha) * W) - beta * kt.T @ (kt @ Wd - vt)
            if not (np.all(np.abs(W) <= BOUND64[1]) and np.all(np.isfinite(q[t] @ W))):
                return t
    return -1


@pytest.mark.parametrize("gated", [False, True])
def test_delta_rules_that_diverge_raise_naming_the_first_bad_token_on_both_backends(gated):
    # 2,000 unit keys with beta = 10: |1 - beta |k|^2| = 9 > 1, so W grows until it overflows
    rng = np.random.default_rng(0)
    k = rng.standard_normal((2000, 8))
    k /= np.linalg.norm(k, axis=1, keepdims=True)
    v, q = rng.standard_normal((2000, 8)), rng.standard_normal((2000, 8))
    args = (q, k, v, 10.0) + ((0.1,) if gated else ())
    expected = _naive_first_bad_delta_token(q, k, v, 10.0, 0.1 if gated else 0.0, gated)
    assert expected > 0
    for fn in (REF_DELTA[gated], NB_DELTA[gated]):
        with pytest.raises(mt.MemoryDivergenceError,
                           match=rf"delta rule's weights or outputs diverged \(a NaN, an inf "
                                 rf"or a magnitude above 1.2e\+77\) at token {expected}; "
                                 rf"lower beta") as err:
            fn(*args)
        assert err.value.token == expected
        with pytest.warns(RuntimeWarning, match=rf"at token {expected};") as record:
            y = fn(*args, on_nonfinite="warn")
        assert len(record) == 1  # once, and no NumPy overflow warning besides it
        assert np.all(np.isfinite(y[:expected])) and not np.all(np.isfinite(y))
        with pytest.raises(ValueError, match="on_nonfinite must be one of 'raise', 'warn'"):
            fn(*args, on_nonfinite="ignore")


# --- the two backends name the same divergence token (issue 14, item 3) ---------------------


def _naive_first_diverged_token(weights, K, V, alpha, eta, theta, b):
    """Eqs. 13–18 as plain loops (every surprise of a chunk at the chunk's first weights;
    b = 1 is the token loop): the first t at which a weight is NaN, inf or above the bound
    of its depth, or -1."""
    bound = BOUND64[len(weights)]
    M = [np.array(w, dtype=float) for w in weights]
    S = [np.zeros_like(w) for w in M]
    with np.errstate(all="ignore"):
        for start in range(0, len(K), b):
            M0 = [w.copy() for w in M]
            for t in range(start, min(start + b, len(K))):
                g = naive_grad(M0, K[t], V[t])
                S = [eta * s - theta * gi for s, gi in zip(S, g)]
                M = [(1.0 - alpha) * w + s for w, s in zip(M, S)]
                if not all(np.all(np.abs(w) <= bound) for w in M):
                    return t
    return -1


def _divergence_token(state, K, V, backend, b, gates):
    try:
        mt.memory_scan(state, K, V, K, chunk_size=b, backend=backend, **gates)
    except mt.MemoryDivergenceError as err:
        return err.token
    return -1


def test_both_backends_name_the_same_divergence_token():
    # the case of the issue: NaN weights from token 64 on the reference, while the kernels'
    # saturated GELU froze the weights and only the outputs overflowed, at token 246
    r = np.random.default_rng(316)
    P = mt.init_memory(r, 8, 8, depth=3)
    K, V = r.standard_normal((300, 8)), r.standard_normal((300, 8))
    gates = dict(alpha=0.0, eta=0.0, theta=0.5)
    expected = _naive_first_diverged_token(list(P), K[:250], V[:250], 0.0, 0.0, 0.5, 16)
    assert 0 < expected < 64
    for backend in ("reference", "numba"):
        with pytest.raises(mt.MemoryDivergenceError,
                           match=rf"memory weights diverged \(a NaN, an inf or a magnitude "
                                 rf"above 3.4e\+38\) at token {expected};"):
            mt.memory_scan(mt.MemoryState.initial(P), K[:250], V[:250], K[:250], chunk_size=16,
                           backend=backend, **gates)
    # a sweep like the one that found 27 disagreements in 89 diverging scans: depths 1-3,
    # token loop and chunks, plain and with momentum and forgetting
    diverged = 0
    for seed in range(24):
        r = np.random.default_rng(seed)
        depth, b = int(r.integers(1, 4)), int(r.choice([1, 4, 16]))
        P = mt.init_memory(r, 8, 8, depth=depth)
        K = r.standard_normal((120, 8)) * r.choice([1.0, 3.0])
        V = r.standard_normal((120, 8))
        gates = dict(alpha=float(r.choice([0.0, 0.01])), eta=float(r.choice([0.0, 0.9])),
                     theta=float(r.choice([0.3, 1.0, 3.0])))
        state = mt.MemoryState.initial(P)
        tokens = [_divergence_token(state, K, V, backend, b, gates)
                  for backend in ("reference", "numba")]
        naive = _naive_first_diverged_token(list(P), K, V, gates["alpha"], gates["eta"],
                                            gates["theta"], b)
        assert tokens == [naive, naive], (seed, depth, b, gates)
        diverged += naive >= 0
    assert diverged >= 12  # most of the sweep diverges: the check is not vacuous


@pytest.mark.parametrize("chunk_size", [1, 4])
@pytest.mark.parametrize("backend", ["reference", "numba"])
def test_momentum_alone_carrying_the_weights_past_the_bound_is_named(backend, chunk_size):
    # Eqs. 13–14 with theta = 0, eta = 1, alpha = 0: S_t = S_0 and W_t = W_0 + (t + 1) S_0,
    # so the first token past the bound B is known in closed form; no gradient moves the
    # weights (the kernels' running bound must carry the momentum, not only each step)
    rng = np.random.default_rng(5)
    P = mt.init_memory(rng, 4, 4, depth=1)
    S0 = P.like([np.full_like(P[0], 1e75)])
    steps = np.arange(1, 201)[:, None, None]  # token t holds W_0 + (t + 1) S_0
    past = np.abs(P[0][None] + steps * 1e75).max(axis=(1, 2)) > BOUND64[1]
    expected = int(np.argmax(past))
    assert past[expected] and 10 < expected < 150
    k = rng.standard_normal((200, 4))
    with pytest.raises(mt.MemoryDivergenceError, match=rf"at token {expected};"):
        mt.memory_scan(mt.MemoryState(P, S0), k, k, k, alpha=0.0, eta=1.0, theta=0.0,
                       chunk_size=chunk_size, backend=backend)


def test_delta_rule_and_its_memory_scan_name_the_same_divergence_token():
    # delta_rule is memory_scan with a zero depth-1 memory, theta = beta / 2, eta = 0: both
    # apply the weight bound of depth 1, so they stop at the same token (they named 780
    # and 781 when only the outputs of one and the weights of the other were checked)
    rng = np.random.default_rng(0)
    k = rng.standard_normal((2000, 8))
    k /= np.linalg.norm(k, axis=1, keepdims=True)
    v, q = rng.standard_normal((2000, 8)), rng.standard_normal((2000, 8))
    expected = _naive_first_bad_delta_token(q, k, v, 10.0, 0.0, False)
    zero = mt.MemoryState.initial(mt.MemoryParams([np.zeros((8, 8))]))
    for backend, delta in (("reference", mt.delta_rule), ("numba", nb_attention.delta_rule)):
        with pytest.raises(mt.MemoryDivergenceError) as by_delta:
            delta(q, k, v, 10.0)
        with pytest.raises(mt.MemoryDivergenceError) as by_scan:
            mt.memory_scan(zero, k, v, q, alpha=0.0, eta=0.0, theta=5.0, backend=backend)
        assert by_delta.value.token == by_scan.value.token == expected


def _linear_attention_fns():
    import importlib

    ref = importlib.import_module("minititans.linear_attention")  # the module, not the function
    return [("parallel", ref.linear_attention_parallel),
            ("recurrent", lambda *a, **kw: ref.linear_attention_recurrent(*a, **kw)[0]),
            ("numba recurrent",
             lambda *a, **kw: nb_attention.linear_attention_recurrent(*a, **kw)[0])]


@pytest.mark.parametrize("name, fn", _linear_attention_fns())
def test_linear_attention_that_overflows_raises_naming_the_first_bad_token(name, fn):
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((2, 6, 3)) for _ in range(3))
    k[1, 3] = 1e160  # phi(q_3) phi(k_3)^T v_3 overflows in the second sequence
    v[1, 3] = 1e160
    with pytest.raises(mt.MemoryDivergenceError,
                       match="linear attention's output or state became non-finite at token 3"):
        fn(q, k, v)
    with pytest.warns(RuntimeWarning, match="at token 3;") as record:
        y = fn(q, k, v, on_nonfinite="warn")
    assert len(record) == 1 and np.all(np.isfinite(y[:, :3])) and np.all(np.isfinite(y[0]))
    # Eq. 3 with the identity map divides by phi(q_t) sum_j phi(k_j)^T: 0 when q_4 = 0
    q2 = rng.standard_normal((1, 6, 3))
    q2[0, 4] = 0.0
    with pytest.raises(mt.MemoryDivergenceError, match="at token 4; .*normaliser is 0"):
        fn(q2, q2, rng.standard_normal((1, 6, 3)), normalize=True)


@pytest.mark.parametrize("name, fn", _linear_attention_fns()[1:])
def test_linear_attention_recurrent_names_the_token_where_only_its_normaliser_overflows(name, fn):
    # z_t = sum_j phi(k_j) overflows at token 3 while M_t = sum_j phi(k_j)^T v_j stays finite
    # (tiny values) and y_t = phi(q_t) M_t / phi(q_t) z_t^T is a finite 0: the state names it
    q = np.ones((1, 5, 2))
    k = np.zeros((1, 5, 2))
    k[0, 2:4] = 1e308
    v = np.full((1, 5, 2), 1e-300)
    with np.errstate(all="ignore"):
        y_naive = np.concatenate([q[0, :2], np.zeros((3, 2))])  # as computed below, finite
    assert np.all(np.isfinite(y_naive))
    with pytest.raises(mt.MemoryDivergenceError, match="at token 3;"):
        fn(q, k, v, "elu1", True)


def test_linear_attention_normalize_must_be_a_bool_on_both_backends():
    q = np.ones((4, 2))
    fns = [fn for _, fn in _linear_attention_fns()]
    for fn in fns:
        for bad in ("no", 0, None):
            with pytest.raises(TypeError, match=rf"normalize must be True or False, got "
                                                rf"{bad!r}"):
                fn(q, q, q, "identity", bad)
    np.testing.assert_allclose(fns[0](q, q, q, "elu1", np.bool_(True)), np.ones((4, 2)),
                               rtol=1e-12)


# --- one dtype rule for the memory functions (issue 14, item 5) ----------------------------

F32, F64 = np.float32, np.float64


def _state(params_dtype, momentum_dtype):
    return mt.MemoryState(MP([w.astype(params_dtype) for w in P], P.activation,
                             P.residual_norm),
                          MP([np.zeros(w.shape, momentum_dtype) for w in P], P.activation,
                             P.residual_norm))


@pytest.mark.parametrize("chunk_size", [1, 2])
@pytest.mark.parametrize("params_dtype, momentum_dtype, rows_dtype",
                         [(F32, F32, F32), (F32, F64, F32), (F64, F32, F32), (F32, F32, F64),
                          (F64, F64, F64)])
def test_memory_scan_result_dtype_is_the_result_type_of_state_and_rows_on_both_backends(
        params_dtype, momentum_dtype, rows_dtype, chunk_size):
    want = np.result_type(params_dtype, momentum_dtype, rows_dtype)
    state = _state(params_dtype, momentum_dtype)
    rows = [x.astype(rows_dtype) for x in (K, V, Q)]
    results = {}
    for backend in ("reference", "numba"):
        # a float64 gate array and a list never change the dtype: they are cast to it
        out, new = mt.memory_scan(state, *rows, alpha=np.full(5, 0.1), eta=[0.9] * 5,
                                  theta=0.1, chunk_size=chunk_size, backend=backend)
        assert out.dtype == want, backend
        assert {w.dtype for w in (*new.params, *new.momentum)} == {want}, backend
        results[backend] = out
    tol = 1e-4 if want == F32 else 1e-10
    np.testing.assert_allclose(results["numba"], results["reference"], rtol=tol, atol=tol)


def test_memory_step_follows_the_dtype_rule_of_memory_scan():
    for params_dtype, momentum_dtype, rows_dtype in [(F32, F32, F32), (F32, F64, F32),
                                                    (F32, F32, F64)]:
        state = _state(params_dtype, momentum_dtype)
        k, v = K[0].astype(rows_dtype), V[0].astype(rows_dtype)
        new = mt.memory_step(state, k, v, alpha=np.float64(0.1), eta=0.9, theta=0.1)
        want = np.result_type(params_dtype, momentum_dtype, rows_dtype)
        assert {w.dtype for w in (*new.params, *new.momentum)} == {want}
        # one token of memory_step is one token of memory_scan
        _, scanned = mt.memory_scan(state, k[None], v[None], k[None], **GATES)
        for a, b in zip(new.params, scanned.params):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ["reference", "numba"])
def test_gates_given_as_lists_equal_arrays_with_chunks_and_are_named_when_wrong(backend):
    lists = dict(alpha=[0.1, 0.0, 0.2, 0.1, 0.05], eta=[0.9] * 5, theta=[0.1, 0.2, 0.1, 0.3, 0.1])
    arrays = {g: np.array(x) for g, x in lists.items()}
    for chunk_size in (1, 2, 4):
        got, _ = mt.memory_scan(S0, K, V, Q, chunk_size=chunk_size, backend=backend, **lists)
        want, _ = mt.memory_scan(S0, K, V, Q, chunk_size=chunk_size, backend=backend, **arrays)
        np.testing.assert_allclose(got, want, rtol=0, atol=0)
    for gate in lists:
        bad = {**lists, gate: lists[gate][:3]}
        with pytest.raises(ValueError, match=rf"{gate} must be a float or have shape \(5,\)"):
            mt.memory_scan(S0, K, V, Q, chunk_size=2, backend=backend, **bad)


# --- streaming memory_scan in pieces that end inside a chunk (issue 14, item 11) -----------


@pytest.mark.parametrize("backend", ["reference", "numba"])
def test_memory_scan_continued_from_inside_a_chunk_warns_once_naming_chunk_size_and_remainder(
        backend):
    rng = np.random.default_rng(2)
    params = mt.init_memory(rng, 4, 4, depth=2, expansion=2)
    k = rng.standard_normal((80, 4))
    k /= np.linalg.norm(k, axis=1, keepdims=True)
    v, q = rng.standard_normal((80, 4)), rng.standard_normal((80, 4))
    # (theta = 0.05 here grew the weights 1e4-fold every chunk: a divergence, caught now)
    g = dict(alpha=0.01, eta=0.9, theta=0.02, chunk_size=16, backend=backend)
    s0 = mt.MemoryState.initial(params)
    whole, _ = mt.memory_scan(s0, k, v, q, **g)  # one call ending inside a chunk: no warning
    # pieces at a chunk boundary: no warning, exactly one call
    a, s = mt.memory_scan(s0, k[:32], v[:32], q[:32], **g)
    assert s.open_chunk is None
    b, _ = mt.memory_scan(s, k[32:], v[32:], q[32:], **g)
    np.testing.assert_allclose(np.concatenate([a, b]), whole, rtol=1e-12, atol=1e-12)
    # a piece of 45 tokens ends 13 tokens into its third chunk: continuing from it warns once
    a, s = mt.memory_scan(s0, k[:45], v[:45], q[:45], **g)
    assert s.open_chunk == (13, 16)
    with pytest.warns(UserWarning, match=r"ended 13 tokens into a chunk of chunk_size=16") as rec:
        b, _ = mt.memory_scan(s, k[45:], v[45:], q[45:], **g)
    assert len(rec) == 1
    assert np.max(np.abs(np.concatenate([a, b]) - whole)) > 1e-6  # which is why it warns
    b_ok, _ = mt.memory_scan(s, k[45:], v[45:], q[45:], partial_chunk="ok", **g)  # no warning
    np.testing.assert_allclose(b_ok, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="partial_chunk must be one of 'warn', 'ok'"):
        mt.memory_scan(s, k, v, q, partial_chunk="yes", **g)


def test_models_that_carry_the_partial_chunk_do_not_warn():
    # MAC restarts the chunks at every segment (6 tokens, chunks of 4); its stream replays
    # the open chunk: neither warns (the test suite turns every warning into an error)
    cfg = ModelConfig(model="mac", vocab_size=8, d_model=8, num_heads=2, segment_len=6,
                      window=6, chunk_size=4, num_persistent=2)
    model = Model(cfg)
    params = model.init(np.random.default_rng(0))
    tokens = np.random.default_rng(1).integers(0, 8, (1, 15))
    full = model.apply(params, tokens)
    state, parts = model.initial_state(1), []
    for lo, hi in ((0, 5), (5, 11), (11, 15)):
        logits, state = model.stream(params, tokens[:, lo:hi], state)
        parts.append(logits)
    np.testing.assert_allclose(np.concatenate(parts, axis=1), full, rtol=1e-9, atol=1e-9)


# --- issue 14 items 1-2: the outputs obey the divergence rule too --------------------------------


@pytest.mark.parametrize("backend", ["reference", "numba"])
def test_memory_scan_whose_read_overflows_with_finite_weights_raises(backend):
    # a depth-2 memory whose weights are large (1e10, within the weight bound 2.4e51) read
    # with huge queries: the read overflows to inf while every weight is fine
    rng = np.random.default_rng(0)
    params = mt.init_memory(rng, 4, 4, depth=2, expansion=2)
    params = params.like([w * 1e10 for w in params])
    k = np.zeros((3, 4))  # zero keys: no surprise, the weights stay as they are (finite)
    q = rng.standard_normal((3, 4)) * 1e300
    with pytest.raises(mt.MemoryDivergenceError, match="outputs became non-finite at token 0"):
        mt.memory_scan(mt.MemoryState.initial(params), k, k, q, alpha=0.0, eta=0.0,
                       theta=0.0, backend=backend)
    with pytest.warns(RuntimeWarning, match="outputs became non-finite at token 0"):
        out, _ = mt.memory_scan(mt.MemoryState.initial(params), k, k, q, alpha=0.0, eta=0.0,
                                theta=0.0, backend=backend, on_nonfinite="warn")
    assert not np.isfinite(out).all()


def test_numba_scan_with_nan_rows_raises_where_it_returned_them():
    # issue 14 item 2: this configuration returned NaN rows 246, 248, 249 without an error
    r = np.random.default_rng(316)
    P = mt.init_memory(r, 8, 8, depth=3)
    K = r.standard_normal((300, 8))
    V = r.standard_normal((300, 8))
    with pytest.raises(mt.MemoryDivergenceError):
        mt.memory_scan(mt.MemoryState.initial(P), K[:250], V[:250], K[:250], alpha=0.0,
                       eta=0.0, theta=0.5, chunk_size=16, backend="numba")


def test_mac_whose_memory_read_overflows_raises_a_divergence_error_naming_the_token():
    # issue 14 item 1: surfaced as "x contains NaN or inf" deep in a later layer
    model = mt.Model(mt.ModelConfig(model="mac", vocab_size=8, d_model=8, num_heads=2,
                                    segment_len=4, window=4, chunk_size=2, num_persistent=2,
                                    theta_max=50.0, theta_init=10.0))
    params = model.init(np.random.default_rng(0))
    tokens = np.random.default_rng(1).integers(0, 8, (2, 40))
    with pytest.raises(mt.MemoryDivergenceError, match=r"at token \d+"):
        model.apply(params, tokens)
