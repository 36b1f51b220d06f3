"""Saving and loading arrays safely: ``.npz`` files read with ``allow_pickle=False``.

Memory states and training checkpoints are plain ``.npz`` archives of float arrays plus one
JSON string of metadata (kind, format version, anything else). Loading never unpickles, so
a file from an untrusted source cannot run code. Saving is atomic: the archive is written to
a temporary file in the same folder, flushed to disk, then renamed over the target, so an
interrupted save leaves the previous file intact rather than a truncated one.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from .memory.models import MemoryParams
from .memory.update import MemoryState

FORMAT_VERSION = 1
_META = "__meta__"


def save_arrays(path, arrays: dict, *, kind: str, meta: dict | None = None) -> Path:
    """Write ``arrays`` (name -> array) and a JSON ``meta`` dict to ``path`` atomically."""
    path = Path(path)
    for name, value in arrays.items():
        if name == _META:
            raise ValueError(f"arrays must not use the reserved name {_META!r}")
        if np.asarray(value).dtype == object:
            raise TypeError(f"arrays[{name!r}] is an object array; only numeric arrays are saved")
    header = {"kind": kind, "format_version": FORMAT_VERSION, **(meta or {})}
    payload = {name: np.asarray(value) for name, value in arrays.items()}
    payload[_META] = np.array(json.dumps(header))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_arrays(path, *, kind: str) -> tuple[dict, dict]:
    """Read a file written by :func:`save_arrays`; returns ``(arrays, meta)``.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` with the reason for a
    truncated or corrupt file, a file holding pickled objects, a file of another kind, or a
    format version this code does not read.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        # open the file ourselves: np.load(path) leaks its handle when the file is corrupt
        with open(path, "rb") as f:
            data = np.load(f, allow_pickle=False)
            if not hasattr(data, "files"):  # a bare .npy array, not an archive
                raise ValueError("it is a single .npy array, not an .npz archive")
            with data:
                arrays = {name: data[name] for name in data.files}
    except ValueError as e:
        if "allow_pickle" in str(e) or "pickled" in str(e):
            raise ValueError(f"{path} holds pickled Python objects; refusing to load it") from e
        raise ValueError(f"{path} is not a valid minititans file ({e})") from e
    except (zipfile.BadZipFile, OSError, EOFError, KeyError) as e:
        reason = f"truncated or corrupt: {e}"
        raise ValueError(f"{path} is not a valid minititans file ({reason})") from e
    if _META not in arrays:
        raise ValueError(f"{path} has no minititans metadata; was it written by save_arrays?")
    meta = json.loads(str(arrays.pop(_META)))
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} has format version {meta.get('format_version')!r}; this "
                         f"minititans reads version {FORMAT_VERSION}")
    if meta.get("kind") != kind:
        raise ValueError(f"{path} holds a {meta.get('kind')!r}, expected a {kind!r}")
    return arrays, meta


def save_memory_state(path, state: MemoryState) -> Path:
    """Save a MemoryState (weights, momentum, activation, residual flag) to ``path``."""
    if not isinstance(state, MemoryState):
        raise TypeError(f"state must be a MemoryState, got {type(state).__name__}")
    arrays = {f"W{i}": w for i, w in enumerate(state.params)}
    arrays.update({f"S{i}": s for i, s in enumerate(state.momentum)})
    meta = {"depth": len(state.params), "activation": state.params.activation,
            "residual_norm": state.params.residual_norm}
    return save_arrays(path, arrays, kind="memory_state", meta=meta)


def load_memory_state(path) -> MemoryState:
    """Load a MemoryState written by :func:`save_memory_state`."""
    arrays, meta = load_arrays(path, kind="memory_state")
    depth = meta["depth"]
    names = [f"W{i}" for i in range(depth)] + [f"S{i}" for i in range(depth)]
    missing = [n for n in names if n not in arrays]
    if missing:
        raise ValueError(f"{path} is missing arrays {missing}")
    spec = MemoryParams([], meta["activation"], meta["residual_norm"])
    return MemoryState(spec.like(arrays[f"W{i}"] for i in range(depth)),
                       spec.like(arrays[f"S{i}"] for i in range(depth)))


def update_results_json(out, key: str, payload: dict) -> Path:
    """Add ``payload`` under ``key`` in ``out/results.json``, keeping the other keys.

    The demo's parts write one key each (``"recall"``, ``"needle"``); the file is replaced
    atomically, like the ``.npz`` files.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results[key] = payload
    fd, tmp = tempfile.mkstemp(prefix="results.", suffix=".tmp", dir=out)
    with os.fdopen(fd, "w") as f:
        json.dump(results, f, indent=2)
    os.replace(tmp, path)
    return path
