"""The numba backend on a read-only installation with no writable numba cache (issue 14).

numba caches a kernel in ``NUMBA_CACHE_DIR``, next to its source (``__pycache__``) or in its
own per-user cache (``$XDG_CACHE_HOME/numba``); when it can write none of them it refuses
to decorate the kernel ("no locator available") and every numba call dies.
``minititans.kernels._jit`` then caches the kernels in ``$XDG_CACHE_HOME/minititans/numba``,
or compiles them uncached, and says so once.

Each test runs a fresh interpreter on a copy of the package made read-only. File
permissions do not stop root, so each place numba would write is also made impossible in a
way that holds for root too: the ``__pycache__`` of the copy's kernels and numba's user
cache directory are regular files, so they cannot be created as directories.
"""

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import minititans as mt
from minititans.training import numba_available

PACKAGE = Path(mt.__file__).parent

SCAN = """
import json, warnings, numpy as np
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as said:
    import minititans as mt
    P = mt.MemoryParams([np.array([[0.5, -0.2], [0.1, 0.3]])], "gelu", False)
    k = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    y, _ = mt.memory_scan(mt.MemoryState.initial(P), k, k[::-1], k, alpha=0.1, eta=0.5,
                          theta=0.2, backend="numba")
print(json.dumps({"file": mt.__file__, "y": y.tolist(),
                  "said": [str(w.message) for w in said]}))
"""

DELTA = """
import json, warnings, numpy as np
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as said:
    from minititans.kernels.attention import delta_rule
    k = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    y = delta_rule(k, k, k[::-1], 0.5)
print(json.dumps({"y": y.tolist(), "said": [str(w.message) for w in said]}))
"""


def _read_only_install(tmp_path):
    """A copy of the package that numba cannot cache next to, and a cache home where numba's
    own user cache cannot be created."""
    site = tmp_path / "site"
    shutil.copytree(PACKAGE, site / "minititans",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (site / "minititans" / "kernels" / "__pycache__").write_text("not a directory\n")
    for path in [site, *site.rglob("*")]:
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    home = tmp_path / "cache"
    home.mkdir()
    (home / "numba").write_text("not a directory\n")  # numba's user cache cannot be made
    return site, home


def _run(code, site, home, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_")}
    env.update(PYTHONPATH=str(site), XDG_CACHE_HOME=str(home), HOME=str(tmp_path),
               PYTHONDONTWRITEBYTECODE="1")
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _make_writable(root):
    for path in [root, *root.rglob("*")]:
        path.chmod(path.stat().st_mode | stat.S_IWUSR)


@pytest.mark.slow
def test_numba_scan_on_a_read_only_install_caches_in_the_minititans_user_cache(tmp_path):
    site, home = _read_only_install(tmp_path)
    try:
        first = _run(SCAN, site, home, tmp_path)
        assert first["file"] == str(site / "minititans" / "__init__.py")  # the copy ran
        P = mt.MemoryParams([np.array([[0.5, -0.2], [0.1, 0.3]])], "gelu", False)
        k = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
        want, _ = mt.memory_scan(mt.MemoryState.initial(P), k, k[::-1], k, alpha=0.1,
                                 eta=0.5, theta=0.2)
        np.testing.assert_allclose(first["y"], want, rtol=1e-12, atol=1e-12)
        cache = home / "minititans" / "numba"
        notes = [s for s in first["said"] if "cache" in s]
        assert notes == [f"numba cannot write its cache next to minititans "
                         f"({site / 'minititans' / 'kernels'}) nor in its own user cache: the "
                         f"kernels are cached in {cache} instead (set NUMBA_CACHE_DIR to "
                         "choose the directory)"]
        files = {p: p.stat().st_mtime_ns for p in cache.rglob("*.nb[ic]")}
        assert any(p.name.startswith("token.token_loop") for p in files)
        # a second process loads the kernels from there: nothing is written again
        second = _run(SCAN, site, home, tmp_path)
        np.testing.assert_allclose(second["y"], want, rtol=1e-12, atol=1e-12)
        assert {p: p.stat().st_mtime_ns for p in cache.rglob("*.nb[ic]")} == files
    finally:
        _make_writable(tmp_path)


@pytest.mark.slow
def test_numba_on_a_read_only_install_without_any_writable_cache_runs_uncached(tmp_path):
    site, home = _read_only_install(tmp_path)
    (home / "minititans").write_text("not a directory either\n")
    try:
        out = _run(DELTA, site, home, tmp_path)
        k = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
        W, want = np.zeros((2, 2)), []
        for t in range(3):  # the delta rule, W_t = W_{t-1} - beta k_t^T (k_t W_{t-1} - v_t)
            W = W - 0.5 * np.outer(k[t], k[t] @ W - k[::-1][t])
            want.append(k[t] @ W)
        np.testing.assert_allclose(out["y"], want, rtol=1e-12, atol=1e-12)
        notes = [s for s in out["said"] if "cache" in s]
        assert len(notes) == 1 and "the kernels are compiled uncached" in notes[0]
        assert not list(tmp_path.rglob("*.nbi"))
    finally:
        _make_writable(tmp_path)


def test_numba_available_says_once_why_numba_is_not_used(monkeypatch):
    import minititans.memory
    import minititans.training

    def broken(*args, backend="reference", **kwargs):
        raise RuntimeError("cannot cache function 'token_loop': no locator available")

    monkeypatch.setattr(minititans.memory, "memory_scan", broken)
    monkeypatch.setattr(minititans.training, "_NUMBA_OK", None)
    with pytest.warns(RuntimeWarning, match=r"the numba backend does not work here "
                                            r"\(RuntimeError: cannot cache function "
                                            r"'token_loop': no locator available\); "
                                            r"backend='auto' uses the slower reference") as rec:
        assert numba_available() is False
        assert numba_available() is False  # cached: said once
    assert len(rec) == 1
