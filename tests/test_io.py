"""Safe files: .npz with allow_pickle=False, atomic saves, clear errors on bad files."""

import os
import pickle

import numpy as np
import pytest

import minititans as mt
from minititans.io import (
    load_arrays,
    load_memory_state,
    save_arrays,
    save_memory_state,
)


def _state(rng):
    params = mt.init_memory(rng, 3, 3, depth=2, activation="silu", residual_norm=True)
    K = rng.standard_normal((4, 3))
    return mt.memory_scan(mt.MemoryState.initial(params), K, K, K, alpha=0.1, eta=0.9,
                          theta=0.05)[1]


def test_memory_state_round_trip_is_exact_and_streams_on(tmp_path, rng):
    state = _state(rng)
    path = save_memory_state(tmp_path / "m.npz", state)
    loaded = load_memory_state(path)
    assert loaded.params.activation == "silu" and loaded.params.residual_norm
    for a, b in zip(list(loaded.params) + list(loaded.momentum),
                    list(state.params) + list(state.momentum)):
        np.testing.assert_array_equal(a, b)
    K = rng.standard_normal((3, 3))
    y1, _ = mt.memory_scan(state, K, K, K, alpha=0.1, eta=0.9, theta=0.05)
    y2, _ = mt.memory_scan(loaded, K, K, K, alpha=0.1, eta=0.9, theta=0.05)
    np.testing.assert_array_equal(y1, y2)


def test_truncated_file_is_a_clear_error(tmp_path, rng):
    path = save_memory_state(tmp_path / "m.npz", _state(rng))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a valid minititans file"):
        load_memory_state(path)


def test_pickled_file_is_refused(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, x=np.array([{"a": 1}], dtype=object), __meta__=np.array("{}"))
    with pytest.raises(ValueError, match="pickled"):
        load_arrays(path, kind="memory_state")
    raw = tmp_path / "raw.npz"  # a bare pickle renamed .npz
    raw.write_bytes(pickle.dumps({"W0": 1}))
    with pytest.raises(ValueError, match="pickled"):
        load_arrays(raw, kind="memory_state")


def test_wrong_version_and_wrong_kind(tmp_path):
    path = save_arrays(tmp_path / "a.npz", {"x": np.ones(2)}, kind="checkpoint",
                       meta={"format_version": 99})
    with pytest.raises(ValueError, match="format version 99"):
        load_arrays(path, kind="checkpoint")
    path = save_arrays(tmp_path / "b.npz", {"x": np.ones(2)}, kind="checkpoint")
    with pytest.raises(ValueError, match="expected a 'memory_state'"):
        load_arrays(path, kind="memory_state")
    with pytest.raises(FileNotFoundError):
        load_arrays(tmp_path / "missing.npz", kind="checkpoint")


def test_interrupted_save_keeps_the_previous_file(tmp_path, monkeypatch, rng):
    path = save_arrays(tmp_path / "c.npz", {"x": np.arange(3.0)}, kind="checkpoint")

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(KeyboardInterrupt):
        save_arrays(path, {"x": np.zeros(3)}, kind="checkpoint")
    arrays, _ = load_arrays(path, kind="checkpoint")
    np.testing.assert_array_equal(arrays["x"], np.arange(3.0))
    assert [p.name for p in tmp_path.iterdir()] == ["c.npz"]  # no temporary left behind
    assert os.path.getsize(path) > 0


def test_a_bare_npy_file_is_refused(tmp_path):
    path = tmp_path / "x.npz"
    with open(path, "wb") as f:
        np.save(f, np.ones(3))
    with pytest.raises(ValueError, match="not an .npz archive"):
        load_arrays(path, kind="checkpoint")


def test_object_arrays_are_not_saved(tmp_path):
    with pytest.raises(TypeError, match="object array"):
        save_arrays(tmp_path / "d.npz", {"x": np.array([None])}, kind="checkpoint")


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_saved_files_get_the_mode_of_the_umask_not_0600(tmp_path, umask):
    import os
    import stat

    from minititans.io import update_results_json

    old = os.umask(umask)
    try:
        params = mt.init_memory(np.random.default_rng(0), 4, 4, depth=1)
        path = mt.save_memory_state(tmp_path / "m.npz", mt.MemoryState.initial(params))
        json_path = update_results_json(tmp_path, "x", {"a": 1})
    finally:
        os.umask(old)
    for p in (path, json_path):
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o666 & ~umask, p


def test_an_anchored_memory_state_round_trips_with_its_anchor(tmp_path):
    rng = np.random.default_rng(3)
    params = mt.init_memory(rng, 4, 4, depth=2, expansion=2)
    k = rng.standard_normal((5, 4))
    _, state = mt.memory_scan(mt.MemoryState.initial(params, anchored=True), k, k, k,
                              alpha=0.2, eta=0.5, theta=0.05)
    back = mt.load_memory_state(mt.save_memory_state(tmp_path / "a.npz", state))
    assert back.anchor is not None
    for a, b in zip(back.anchor, params):
        np.testing.assert_array_equal(a, b)
    # continuing from the loaded state is continuing from the saved one, bit for bit
    q = rng.standard_normal((3, 4))
    out1, _ = mt.memory_scan(state, q, q, q, alpha=0.2, eta=0.5, theta=0.05)
    out2, _ = mt.memory_scan(back, q, q, q, alpha=0.2, eta=0.5, theta=0.05)
    np.testing.assert_array_equal(out1, out2)
    plain = mt.load_memory_state(mt.save_memory_state(tmp_path / "p.npz",
                                                      mt.MemoryState.initial(params)))
    assert plain.anchor is None
