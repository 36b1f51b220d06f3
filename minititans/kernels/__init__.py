"""Numba twins of the hot loops (the ``backend="numba"`` of :func:`minititans.memory_scan`).

* :mod:`.mlp` — the memory's building blocks: packed weights, activations, the inner loss,
  forward / backward over rows.
* :mod:`.scan` — the memory scan: token loop (Eqs. 13-14) and chunked form (Eqs. 16-18),
  one sequence or a batch in parallel.
* :mod:`.attention` — sliding-window softmax attention, linear attention, the delta rule.
* :mod:`._jit` — the one helper that owns every compilation option.

Each kernel has a readable reference twin elsewhere in the package and a parity test in
``tests/``. Modules are imported lazily so ``import minititans`` compiles nothing.
"""
