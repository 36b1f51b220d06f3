"""Bad input to the memory API: a clear ValueError/TypeError that names the argument."""

import numpy as np
import pytest

import minititans as mt

RNG = np.random.default_rng(0)
P = mt.init_memory(RNG, 3, 2, depth=2, expansion=2)
S0 = mt.MemoryState.initial(P)
K, V, Q = RNG.standard_normal((5, 3)), RNG.standard_normal((5, 2)), RNG.standard_normal((5, 3))
GATES = dict(alpha=0.1, eta=0.9, theta=0.1)


def scan(**over):
    args = dict(state=S0, keys=K, values=V, queries=Q, **GATES)
    args.update(over)
    state, keys, values, queries = (args.pop(n) for n in ("state", "keys", "values", "queries"))
    return mt.memory_scan(state, keys, values, queries, **args)


CASES = [
    # (description, callable, exception, message fragment)
    ("keys wrong width", lambda: scan(keys=np.ones((5, 4))), ValueError, "keys"),
    ("values wrong width", lambda: scan(values=np.ones((5, 3))), ValueError, "values"),
    ("queries wrong width", lambda: scan(queries=np.ones((5, 2))), ValueError, "queries"),
    ("lengths differ", lambda: scan(values=np.ones((4, 2))), ValueError, "same length"),
    ("keys 1-D", lambda: scan(keys=np.ones(3)), ValueError, "keys must have 2"),
    ("keys 3-D", lambda: scan(keys=np.ones((1, 5, 3))), ValueError, "keys must have 2"),
    ("keys as list", lambda: scan(keys=[[1.0, 2.0, 3.0]]), TypeError, "keys"),
    ("integer keys", lambda: scan(keys=np.ones((5, 3), dtype=int)), TypeError, "keys"),
    ("float16 keys", lambda: scan(keys=np.ones((5, 3), np.float16)), TypeError, "keys"),
    ("NaN in keys", lambda: scan(keys=np.full((5, 3), np.nan)), ValueError, "keys contains NaN"),
    ("inf in values", lambda: scan(values=np.full((5, 2), np.inf)), ValueError, "values"),
    ("alpha > 1", lambda: scan(alpha=1.5), ValueError, "alpha must be <= 1"),
    ("alpha < 0", lambda: scan(alpha=-0.1), ValueError, "alpha must be >= 0"),
    ("eta > 1", lambda: scan(eta=1.01), ValueError, "eta must be <= 1"),
    ("theta < 0", lambda: scan(theta=-1e-3), ValueError, "theta must be >= 0"),
    ("theta NaN", lambda: scan(theta=float("nan")), ValueError, "theta contains NaN"),
    ("gate wrong length", lambda: scan(eta=np.full(4, 0.5)), ValueError, r"eta .*\(5,\)"),
    ("gate None", lambda: scan(alpha=None), TypeError, "alpha"),
    ("chunk_size 0", lambda: scan(chunk_size=0), ValueError, "chunk_size must be >= 1"),
    ("chunk_size float", lambda: scan(chunk_size=2.0), TypeError, "chunk_size must be an int"),
    ("unknown read", lambda: scan(read="during"), ValueError, "read must be one of"),
    ("unknown backend", lambda: scan(backend="cuda"), ValueError, "backend must be one of"),
    ("unknown loss", lambda: scan(loss="l3"), ValueError, "loss must be one of"),
    ("max_grad_norm 0", lambda: scan(max_grad_norm=0.0), ValueError, "max_grad_norm"),
    ("on_nonfinite", lambda: scan(on_nonfinite="ignore"), ValueError, "on_nonfinite"),
    ("state not a state", lambda: scan(state=P), TypeError, "state must be a MemoryState"),
    ("depth 0", lambda: mt.init_memory(RNG, 3, 3, depth=0), ValueError, "depth must be >= 1"),
    ("d_in 0", lambda: mt.init_memory(RNG, 0, 3), ValueError, "d_in must be >= 1"),
    ("unknown activation", lambda: mt.init_memory(RNG, 3, 3, activation="relu"), ValueError,
     "activation must be one of"),
    ("residual needs square", lambda: mt.init_memory(RNG, 3, 2, residual_norm=True), ValueError,
     "residual_norm"),
    ("rng is a seed", lambda: mt.init_memory(0, 3, 3), TypeError, "rng"),
    ("float16 memory", lambda: mt.init_memory(RNG, 3, 3, dtype=np.float16), TypeError, "dtype"),
    ("forward wrong width", lambda: mt.memory_forward(P, np.ones((2, 2))), ValueError, "x"),
    ("forward params tuple", lambda: mt.memory_forward((np.ones((3, 2)),), np.ones(3)),
     TypeError, "params must be a MemoryParams"),
    ("loss k/v lengths", lambda: mt.associative_loss(P, np.ones((2, 3)), np.ones((3, 2))),
     ValueError, "same leading shape"),
    ("lp p < 1", lambda: mt.associative_loss(P, K, V, "lp", p=0.5), ValueError, "p must be"),
    ("huber delta", lambda: mt.surprise(P, K, V, "huber", delta=0.0), ValueError, "delta"),
    ("step k 2-D", lambda: mt.memory_step(S0, K, V, **GATES), ValueError, "k must have 1"),
    ("step alpha", lambda: mt.memory_step(S0, K[0], V[0], alpha=2.0, eta=0.0, theta=0.1),
     ValueError, "alpha"),
]


@pytest.mark.parametrize("what,call,exc,match", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_a_clear_error(what, call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_non_contiguous_and_read_only_inputs_work():
    Kf = np.asfortranarray(K)
    Vr = V.copy()
    Vr.setflags(write=False)
    out, _ = mt.memory_scan(S0, Kf, Vr, Q[:, :], **GATES)
    ref, _ = mt.memory_scan(S0, K, V, Q, **GATES)
    np.testing.assert_allclose(out, ref, rtol=1e-14)


def test_one_token_sequence(rng):
    out, state = mt.memory_scan(S0, K[:1], V[:1], Q[:1], **GATES)
    manual = mt.memory_step(S0, K[0], V[0], **GATES)
    np.testing.assert_allclose(out[0], mt.memory_forward(manual.params, Q[0]), rtol=1e-13)
