"""Saving and loading arrays safely: ``.npz`` files read with ``allow_pickle=False``.

Memory states and training checkpoints are plain ``.npz`` archives of float arrays plus one
JSON string of metadata (kind, format version, anything else). Loading never unpickles, so
a file from an untrusted source cannot run code, and every array is checked against the
metadata before it is used. Saving is atomic: the archive is written to a temporary file in
the same folder (named ``NAME.PID-RANDOM.tmp``), flushed to disk, then renamed over the
target, so an interrupted save leaves the previous file intact rather than a truncated one.
A save refuses a target that is not a regular file (a symbolic link, a directory, a device)
and removes the temporary files that earlier, killed saves to the same target left behind.
"""

from __future__ import annotations

import json
import os
import re
import stat
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

from ._checks import FLOAT_DTYPES
from .activations import ACTIVATIONS
from .memory.models import MemoryParams
from .memory.update import MemoryState

FORMAT_VERSION = 1
_META = "__meta__"
# a temporary file older than this is stale even if its process id is alive again (reused)
STALE_SECONDS = 3600.0


def check_save_target(path) -> Path:
    """Return ``path`` as a Path if a save may replace it: absent, or a regular file.

    A symbolic link (even to a regular file), a directory, a device node, a FIFO or a socket
    is refused with a ``ValueError``: renaming over it would replace the link or the node
    itself rather than write where the user meant.
    """
    path = Path(path)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return path
    if stat.S_ISLNK(info.st_mode):
        raise ValueError(f"{path} is a symbolic link; refusing to replace it (save to the "
                         f"file it points to, {os.path.realpath(path)}, instead)")
    if stat.S_ISDIR(info.st_mode):
        raise ValueError(f"{path} is a directory; give a file name to save to")
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{path} is not a regular file (a device, FIFO or socket); "
                         "refusing to replace it")
    return path


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # another thread of this process may be saving right now
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # alive, owned by someone else (or we cannot tell: keep the file)
    return True


def remove_stale_temporaries(path) -> list[Path]:
    """Delete the temporary files that killed saves to ``path`` left in its folder.

    Only files of our own naming for this target are touched: ``NAME.PID-RANDOM.tmp`` whose
    process is gone (or that are older than :data:`STALE_SECONDS`), and the
    ``NAME.RANDOM.tmp`` of earlier versions once they are that old. Returns what was removed.
    """
    path = Path(path)
    ours = re.compile(re.escape(path.name) + r"\.(\d+)-[a-z0-9_]+\.tmp")
    legacy = re.compile(re.escape(path.name) + r"\.[a-z0-9_]{8}\.tmp")
    removed = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        m = ours.fullmatch(entry.name)
        if m is None and legacy.fullmatch(entry.name) is None:
            continue
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if not stat.S_ISREG(info.st_mode):
            continue
        old = now - info.st_mtime > STALE_SECONDS
        if old or (m is not None and not _pid_alive(int(m.group(1)))):
            try:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
            except OSError:
                pass  # gone already, or not ours to delete
    return removed


def _umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic_write(path: Path, write) -> Path:
    """``write(f)`` into a temporary file next to ``path``, fsync, rename over ``path``."""
    path = check_save_target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f"{path.name}.{os.getpid()}-", suffix=".tmp",
                               dir=path.parent)
    try:
        # mkstemp creates the file 0600; the saved file gets the mode a plain open() would
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        check_save_target(path)  # it may have been replaced by a link while we wrote
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def save_arrays(path, arrays: dict, *, kind: str, meta: dict | None = None) -> Path:
    """Write ``arrays`` (name -> array) and a JSON ``meta`` dict to ``path`` atomically.

    Raises ``ValueError`` when ``path`` is a symbolic link, a directory or another
    non-regular file (see :func:`check_save_target`), before anything is written.
    """
    path = check_save_target(path)
    for name, value in arrays.items():
        if name == _META:
            raise ValueError(f"arrays must not use the reserved name {_META!r}")
        if np.asarray(value).dtype == object:
            raise TypeError(f"arrays[{name!r}] is an object array; only numeric arrays are saved")
    header = {"kind": kind, "format_version": FORMAT_VERSION, **(meta or {})}
    payload = {name: np.asarray(value) for name, value in arrays.items()}
    payload[_META] = np.array(json.dumps(header))
    return _atomic_write(path, lambda f: np.savez(f, **payload))


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
    try:
        meta = json.loads(str(arrays.pop(_META)))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} has unreadable metadata (not JSON: {e})") from e
    if not isinstance(meta, dict):
        raise ValueError(f"{path} has metadata that is not a JSON object: {meta!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} has format version {meta.get('format_version')!r}; this "
                         f"minititans reads version {FORMAT_VERSION}")
    if meta.get("kind") != kind:
        raise ValueError(f"{path} holds a {meta.get('kind')!r}, expected a {kind!r}")
    return arrays, meta


def save_memory_state(path, state: MemoryState) -> Path:
    """Save a MemoryState (weights, momentum, the forgetting anchor if any, activation,
    residual flag) to ``path``."""
    if not isinstance(state, MemoryState):
        raise TypeError(f"state must be a MemoryState, got {type(state).__name__}")
    arrays = {f"W{i}": w for i, w in enumerate(state.params)}
    arrays.update({f"S{i}": s for i, s in enumerate(state.momentum)})
    if state.anchor is not None:
        arrays.update({f"A{i}": a for i, a in enumerate(state.anchor)})
    meta = {"depth": len(state.params), "activation": state.params.activation,
            "residual_norm": state.params.residual_norm, "anchored": state.anchor is not None}
    return save_arrays(path, arrays, kind="memory_state", meta=meta)


def meta_value(path, meta: dict, key: str, check, expected: str):
    """``meta[key]``, or a ``ValueError`` naming the key when it is missing or fails ``check``."""
    if key not in meta:
        raise ValueError(f"{path} is missing the metadata key {key!r}")
    value = meta[key]
    if not check(value):
        raise ValueError(f"{path} has metadata {key!r} = {value!r}; expected {expected}")
    return value


def check_float_array(path, name: str, arr, *, shape=None, finite: bool = True) -> np.ndarray:
    """A loaded array that must be a real float32/float64 array (of ``shape``), finite."""
    if arr.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{path}: array {name!r} must be float32 or float64, got dtype "
                         f"{arr.dtype}")
    if shape is not None and arr.shape != tuple(shape):
        raise ValueError(f"{path}: array {name!r} must have shape {tuple(shape)}, got "
                         f"{arr.shape}")
    if finite and arr.size and not np.all(np.isfinite(arr)):
        raise ValueError(f"{path}: array {name!r} contains NaN or inf")
    return arr


def load_memory_state(path) -> MemoryState:
    """Load a MemoryState written by :func:`save_memory_state`.

    The metadata (depth, activation, residual flag) must describe the arrays exactly:
    ``W0..W{depth-1}`` and ``S0..S{depth-1}``, no more and no fewer, float and finite, each
    weight chaining into the next, each momentum of its weight's shape. Anything else is a
    ``ValueError`` naming the array or key (a depth-1 header over depth-2 weights would
    otherwise drop ``W1`` silently).
    """
    arrays, meta = load_arrays(path, kind="memory_state")
    depth = meta_value(path, meta, "depth",
                       lambda d: isinstance(d, int) and not isinstance(d, bool) and d >= 1,
                       "an int >= 1")
    activation = meta_value(path, meta, "activation", lambda a: a in ACTIVATIONS,
                            f"one of {sorted(ACTIVATIONS)}")
    residual = meta_value(path, meta, "residual_norm", lambda r: isinstance(r, bool),
                          "true or false")
    # files written before the anchor existed have no "anchored" key: not anchored
    anchored = meta.get("anchored", False)
    if not isinstance(anchored, bool):
        raise ValueError(f"{path} has metadata 'anchored' = {anchored!r}; expected true or "
                         "false")
    names = [f"{n}{i}" for n in ("WSA" if anchored else "WS") for i in range(depth)]
    missing = [n for n in names if n not in arrays]
    if missing:
        raise ValueError(f"{path} is missing arrays {missing} (its metadata says depth "
                         f"{depth})")
    extra = sorted(set(arrays) - set(names))
    if extra:
        raise ValueError(f"{path} holds arrays {extra} that its metadata (depth {depth}) does "
                         "not describe; refusing to drop them")
    W, S = [], []
    prev = None
    for i in range(depth):
        w = check_float_array(path, f"W{i}", arrays[f"W{i}"])
        if w.ndim != 2:
            raise ValueError(f"{path}: array 'W{i}' must be a matrix, got shape {w.shape}")
        if prev is not None and w.shape[0] != prev:
            raise ValueError(f"{path}: array 'W{i}' must have {prev} rows (the width of "
                             f"'W{i - 1}'), got shape {w.shape}")
        prev = w.shape[1]
        W.append(w)
        S.append(check_float_array(path, f"S{i}", arrays[f"S{i}"], shape=w.shape))
    if residual and W[0].shape[0] != W[-1].shape[1]:
        raise ValueError(f"{path}: residual_norm is true but the memory maps "
                         f"{W[0].shape[0]} to {W[-1].shape[1]} channels (it must be square)")
    spec = MemoryParams([], activation, residual)
    anchor = (spec.like(check_float_array(path, f"A{i}", arrays[f"A{i}"], shape=W[i].shape)
                        for i in range(depth)) if anchored else None)
    return MemoryState(spec.like(W), spec.like(S), anchor)


def save_json(path, payload) -> Path:
    """Write ``payload`` as JSON to ``path``, atomically (the file is whole or absent)."""
    text = json.dumps(payload, indent=1)
    return _atomic_write(Path(path), lambda f: f.write(text.encode()))


def update_results_json(out, key: str, payload: dict) -> Path:
    """Add ``payload`` under ``key`` in ``out/results.json``, keeping the other keys.

    The demo's parts write one key each (``"recall"``, ``"needle"``); the file is replaced
    atomically, like the ``.npz`` files (and refused, like them, when it is not a regular
    file).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = check_save_target(out / "results.json")
    results = json.loads(path.read_text()) if path.exists() else {}
    results[key] = payload
    text = json.dumps(results, indent=2)
    return _atomic_write(path, lambda f: f.write(text.encode()))
