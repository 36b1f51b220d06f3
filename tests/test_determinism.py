"""The same seed gives bit-identical results in two separate processes."""

import subprocess
import sys

import pytest

SCRIPT = """
import hashlib, numpy as np, minititans as mt
rng = np.random.default_rng(42)
params = mt.init_memory(rng, 8, 8, depth=2)
K = rng.standard_normal((40, 8)); K /= np.linalg.norm(K, axis=1, keepdims=True)
g = mt.init_gates(rng, 8)
alpha, eta, theta = mt.compute_gates(g, K)
out, state = mt.memory_scan(mt.MemoryState.initial(params), K, K, K, alpha=alpha, eta=eta,
                            theta=theta, chunk_size={b}, backend="{backend}")
h = hashlib.sha256(out.tobytes())
for w in list(state.params) + list(state.momentum):
    h.update(w.tobytes())
print(h.hexdigest())
"""


def _run(backend, b):
    code = SCRIPT.format(backend=backend, b=b)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.mark.parametrize("b", [1, 4])
def test_reference_backend_is_bit_identical_across_processes(b):
    first, second = _run("reference", b), _run("reference", b)
    assert len(first) == 64 and first == second


NUMBA = """
import hashlib, numpy as np, minititans as mt
from minititans.memory.scan import numba_memory_scan_batched
rng = np.random.default_rng(42)
params = mt.init_memory(rng, 8, 8, depth=2)
K = rng.standard_normal((2, 40, 8)); K /= np.linalg.norm(K, axis=-1, keepdims=True)
g = mt.init_gates(rng, 8)
alpha, eta, theta = mt.compute_gates(g, K[0])
for b in (1, 16):
    out, state = mt.memory_scan(mt.MemoryState.initial(params), K[0], K[0], K[0], alpha=alpha,
                                eta=eta, theta=theta, chunk_size=b, backend="numba")
    h = hashlib.sha256(out.tobytes())
    for w in list(state.params) + list(state.momentum):
        h.update(w.tobytes())
    print(h.hexdigest())
    # a batch of two sequences on numba's threads (prange)
    pb = params.like(np.stack([w, 0.5 * w]) for w in params)
    out, state = numba_memory_scan_batched(mt.MemoryState.initial(pb), K, K, K, alpha=0.01,
                                           eta=0.9, theta=0.02, chunk_size=b)
    h = hashlib.sha256(out.tobytes())
    for w in list(state.params) + list(state.momentum):
        h.update(w.tobytes())
    print(h.hexdigest())
"""


def test_numba_backend_is_bit_identical_across_processes():
    """Forward at chunk 1 and 16, single and batched: the same bits in two processes."""
    runs = [subprocess.run([sys.executable, "-c", NUMBA], capture_output=True, text=True,
                           check=True).stdout.split() for _ in range(2)]
    assert len(runs[0]) == 4 and all(len(h) == 64 for h in runs[0])
    assert runs[0] == runs[1]
