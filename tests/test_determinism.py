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
